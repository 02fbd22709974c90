"""``python -m memloc.demo ...`` = ``memloc demo ...`` (the whole pipeline on MNIST-5k; the code lives in :mod:`memloc.cli.demo`).

An entry file only: ``memloc.demo`` in Python is the package face's name, never this module.
"""
if __name__ == "__main__":
    from memloc.cli import module_main
    module_main("demo")
