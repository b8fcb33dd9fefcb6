"""The compiled kernels: building the C library (:mod:`.build`), NumPy-facing calls into it
(:mod:`.calls`), FastCNN's training step and evaluation on NumPy arrays (:mod:`.fastcnn`), and
the bridge into PyTorch's autograd (:mod:`.autograd`). C sources in ``csrc/``."""
