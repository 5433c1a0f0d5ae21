"""`python run.py <command> ...` from a clone: the commands and flags of the installed `frmdn`."""

import sys

from frmdn_worldmodels.cli import main

if __name__ == "__main__":
    sys.exit(main())
