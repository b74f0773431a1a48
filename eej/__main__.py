"""`python -m eej ...` is the `eej` command (useful where the console script is not on PATH)."""

import sys

from eej.cli import main

sys.exit(main())
