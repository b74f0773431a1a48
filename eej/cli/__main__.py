"""`python -m eej.cli` is `eej`."""

import sys

from eej.cli import main

sys.exit(main())
