"""`python -m proxykd_fast.teacher {collect,serve-teacher} ...` until the main CLI wires them in."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
