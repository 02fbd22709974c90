"""Layer 4, analyses: one module (or package) per analysis, each returning a :class:`memloc.Result`.

Localisation: :mod:`.gradients`, :mod:`.rewind`, :mod:`.retrain`, :mod:`.flip`, :mod:`.importance`;
finding: :mod:`.scores`, :mod:`.detect`, :mod:`.label_issues`, :mod:`.agreement`; example-tied
dropout: :mod:`.etd`; language models: :mod:`.memorisation` (memorised sequences), :mod:`.exposure`,
:mod:`.localise` (which MLP neurons hold a sequence) and :mod:`.inj` (its known-answer benchmark).
This package re-exports nothing (a module and the function users call never share a dotted name):
call them as ``memloc.rewind(...)`` etc.
"""
