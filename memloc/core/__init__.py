"""Layer 1, the core: what every analysis stands on.

Run directories (:mod:`.run` reads them, :mod:`.recorder` writes them), data (:mod:`.data`,
:mod:`.datasets`, :mod:`.examples`, :mod:`.labels`, :mod:`.inputs`, :mod:`.stream`), models
(:mod:`.models`, :mod:`.dropout` for example-tied dropout), token sequences and causal language models
(:mod:`.sequences`, :mod:`.canaries`, :mod:`.lm`), layers and units (:mod:`.units`,
:mod:`.selection`), evaluation (:mod:`.evaluate`), optimisers (:mod:`.optim`), precision
(:mod:`.precision`), results and their schemas (:mod:`.results`, :mod:`.schemas`, :mod:`.h5`),
errors and small helpers (:mod:`.errors`, :mod:`.runtime`). Imports only ``torch`` and the
standard scientific stack; never a module of a higher layer.
"""
__version__ = "0.2.0"
