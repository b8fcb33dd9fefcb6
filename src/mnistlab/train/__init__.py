"""Training: the epoch loop and ``fit`` (:mod:`.loop`), the two engines behind one interface
(:mod:`.engine`, :mod:`.kernel_engine`, :mod:`.torch_engine`), the optimizer, the learning-rate
schedule and augmentation."""
