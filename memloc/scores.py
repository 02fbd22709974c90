"""``python -m memloc.scores ...`` = ``memloc scores ...`` (per-example memorisation scores; the code lives in :mod:`memloc.analyses.scores`).

An entry file only: ``memloc.scores`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("scores")
