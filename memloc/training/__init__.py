"""Layer 3, training: memloc's trainer (:mod:`.train`), the paper's recipe (:mod:`.recipes`) and
on-device augmentation (:mod:`.augment`). Imports the core and scale layers only.
"""
