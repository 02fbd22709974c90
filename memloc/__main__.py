"""``python -m memloc <command> [args]`` (see :mod:`memloc.cli`)."""
import sys

from memloc.cli import main

if __name__ == "__main__":
    sys.exit(main())
