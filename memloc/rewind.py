"""``python -m memloc.rewind ...`` = ``memloc rewind ...`` (layer rewinding; the code lives in :mod:`memloc.analyses.rewind`).

An entry file only: ``memloc.rewind`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("rewind")
