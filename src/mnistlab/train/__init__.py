"""Training: the epoch loop and ``fit`` (:mod:`.loop`), the two engines behind one interface
(:mod:`.engine`, :mod:`.kernel_engine`, :mod:`.autograd_engine`) and the rule that chooses one
(:mod:`.choose`), the device rule, the optimizer, the learning-rate schedule and augmentation."""
