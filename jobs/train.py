"""Entry point for `ray job submit -- python jobs/train.py --config configs/….yaml [section.key=value …]`."""

import sys

from cfgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
