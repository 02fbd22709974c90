"""``python -m memloc.report ...`` = ``memloc report ...`` (figures and report.md; the code lives in :mod:`memloc.reporting`).

An entry file only: ``memloc.report`` in Python is the package face's function, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("report")
