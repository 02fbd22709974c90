"""Layer 2, scale: work split across processes and reused between passes.

torch.distributed sharding (:mod:`.distributed`), resumable part files (:mod:`.parts`), DDP
training of one run (:mod:`.ddp`) and frozen-prefix reuse (:mod:`.prefix`). Imports the core only.
"""
