"""``python -m moe_mlora.report``: the command; the code is :mod:`moe_mlora.reporting.report`."""

import sys

from moe_mlora.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
