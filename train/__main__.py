"""`python -m train CONFIG [--key=value ...]`: the same as `mm train`."""

import sys

from mm.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
