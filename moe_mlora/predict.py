"""``python -m moe_mlora.predict``: the command; the code is :mod:`moe_mlora.serving.predict`."""

import sys

from moe_mlora.serving.predict import main

if __name__ == "__main__":
    sys.exit(main())
