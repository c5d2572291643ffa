"""`python -m trtnet.inspect`: the command lives in trtnet/inspection.py.

This folder holds only this file and no `__init__.py`, so nothing named `inspect` can shadow the standard library's
module when trtnet/ itself is on sys.path (running `python trtnet/build.py`).
"""

import sys

from trtnet.inspection import cli

if __name__ == "__main__":
    sys.exit(cli())
