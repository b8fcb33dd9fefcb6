"""Data: MNIST-format IDX files (:mod:`.idx`), the shipped MNIST and the splits (:mod:`.mnist`)."""
