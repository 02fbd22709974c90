"""``python -m memloc.retrain ...`` = ``memloc retrain ...`` (layer retraining; the code lives in :mod:`memloc.analyses.retrain`).

An entry file only: ``memloc.retrain`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("retrain")
