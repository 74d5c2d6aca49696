"""``python -m moe_mlora.export``: the command; the code is :mod:`moe_mlora.serving.export`."""

import sys

from moe_mlora.serving.export import main

if __name__ == "__main__":
    sys.exit(main())
