"""The device rule, decided once per run by the run driver.

``cpu``; ``cuda`` (a one-line error where PyTorch sees no GPU); ``auto``: the GPU where the
operating system shows one (an NVIDIA or AMD GPU driver's device files) and PyTorch can use it,
else the CPU. A machine with no GPU device files answers ``cpu`` without importing PyTorch, so
kernel-engine runs start in a fraction of a second.
"""

from __future__ import annotations

import glob
import os

from ..config import check_device
from ..errors import UsageError

# What a GPU driver leaves on Linux: NVIDIA's, AMD's (ROCm, which PyTorch also calls cuda), WSL's.
GPU_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_visible() -> bool:
    """Whether this machine shows a GPU driver's device files (no PyTorch imported)."""
    return any(os.path.exists(p) for p in GPU_FILES) or bool(glob.glob("/dev/nvidia[0-9]*"))


def set_deterministic(on: bool) -> None:
    """CUDA's arithmetic repeatable (``on``: a seed gives bit-identical weights, a resumed run ends
    as an uninterrupted one) or as fast as cuDNN's autotuner makes it. Called by the run driver
    before the run's first CUDA work: cuBLAS reads its workspace setting when it starts.

    Operations without a deterministic CUDA kernel warn instead of failing; PyTorch's filling of new
    memory with NaN (a debugging aid of deterministic mode) stays off: every buffer here is written
    before it is read, and the filling costs time on every allocation.
    """
    import torch

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def resolve_device(name: str = "auto") -> str:
    """``"cpu"`` or ``"cuda"`` for a configured device name (see the module's rule)."""
    check_device(name)
    if name == "cpu" or (name == "auto" and not gpu_visible()):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise UsageError("device 'cuda' requested but CUDA is not available here; use --device cpu or auto")
    return "cpu"
