"""``python -m memloc.demo OUT``: the whole pipeline on MNIST-5k (see :mod:`memloc.commands.demo`)."""

if __name__ == "__main__":
    from .commands import module_main
    module_main("demo")
