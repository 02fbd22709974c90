"""Layer 5, actions built on the analyses: pruning, cleaning and JTT on fresh child runs
(:mod:`.prune`, :mod:`.clean`, :mod:`.jtt`, :mod:`.children`), unlearning (:mod:`.unlearn`) and
within-task forgetting order (:mod:`.forgetting`). Re-exports nothing: ``memloc.prune(...)`` etc.
"""
