"""Entry point for `ray job submit -- python jobs/phantoms.py --config configs/….yaml [section.key=value …]`."""

import sys

from cfgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["phantoms", *sys.argv[1:]]))
