#!/usr/bin/env python
"""Strip outputs from the notebooks before committing them (tests/test_notebooks.py checks it).

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb, in place
    python scripts/strip_notebooks.py path.ipynb ...  # the named ones

Code cells lose their outputs and execution counts, notebook metadata keeps only the kernel spec
(`python3`) and the language info's name, cell metadata is dropped: a notebook run in place leaves
no diff once stripped again.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strip(nb: dict) -> dict:
    """`nb` (a notebook as JSON) without outputs, execution counts or per-run metadata."""
    for cell in nb["cells"]:
        cell["metadata"] = {}
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return nb


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="notebooks (default: every notebooks/*.ipynb)")
    paths = ap.parse_args(argv).paths or sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = json.dumps(strip(json.loads(text)), indent=1, ensure_ascii=False) + "\n"
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            print(f"stripped {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
