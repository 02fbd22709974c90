"""Acting on the findings: retraining experiments built on a parent run (pruning, cleaning, JTT).

Each trains fresh child runs with the parent's recipe (:mod:`memloc.experiments.children`:
reused when finished, resumed when interrupted, ``jobs`` in parallel) and returns a Result.
"""
from .children import parent_config, train_children
from .clean import clean, cleanlab_flags
from .jtt import jtt
from .prune import kept_ids, prune

__all__ = ["parent_config", "train_children", "prune", "kept_ids", "clean", "cleanlab_flags", "jtt"]
