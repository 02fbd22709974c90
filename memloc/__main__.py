"""``python -m memloc <command> [args]`` (see :mod:`memloc.commands`)."""
import sys

from memloc.commands import main

if __name__ == "__main__":
    sys.exit(main())
