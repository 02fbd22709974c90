"""``python -m memloc.flip ...`` = ``memloc flip ...`` (greedy gradient-guided unit zeroing; the code lives in :mod:`memloc.analyses.flip`).

An entry file only: ``memloc.flip`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("flip")
