"""``python -m memloc.detect ...`` = ``memloc detect ...`` (noise-detection metrics; the code lives in :mod:`memloc.analyses.detect`).

An entry file only: ``memloc.detect`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("detect")
