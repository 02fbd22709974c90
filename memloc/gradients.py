"""``python -m memloc.gradients ...`` = ``memloc gradients ...`` (per-layer gradient accounting; the code lives in :mod:`memloc.analyses.gradients`).

An entry file only: ``memloc.gradients`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("gradients")
