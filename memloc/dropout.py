"""``python -m memloc.dropout ...`` = ``memloc dropout ...`` (example-tied dropout evaluation; the code lives in :mod:`memloc.analyses.etd`).

An entry file only: ``memloc.dropout`` in Python is the package face's name, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("dropout")
