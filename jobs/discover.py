"""Entry point for `ray job submit -- python jobs/discover.py --config configs/….yaml [section.key=value …]`."""

import sys

from cfgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["discover", *sys.argv[1:]]))
