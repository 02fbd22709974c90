"""``python -m memloc.train ...`` = ``memloc train ...`` (train a run; the code lives in :mod:`memloc.training.train`).

An entry file only: ``memloc.train`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("train")
