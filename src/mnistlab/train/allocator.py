"""Keep freed memory in the process, so a training step does not page-fault its buffers back in.

With glibc's default settings, every training step frees activation buffers of a few
hundred kB to a few MB and the allocator hands them back to the kernel (``munmap`` or
trimming the heap); the next step's buffers are then fresh pages, zero-filled by the
kernel on first touch. For the seed's CNN at batch 64 that is hundreds of page faults a
step, close to half of the step's time. Raising glibc's mmap and trim thresholds makes freed
buffers stay in the heap for reuse (``benchmarks/bench_choices.py`` measures it).

Elsewhere (macOS, musl) :func:`keep_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: blocks above it are mmap'ed
TRIM_THRESHOLD = 1 << 30  # free space kept at the top of the heap before it is given back
TOP_PAD = 64 << 20  # extra space requested from the kernel each time the heap grows

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds once per process; returns whether they are in effect.

    Memory in use is unchanged; freed memory up to the peak already reached stays mapped
    (plus at most ``TOP_PAD``) instead of going back to the kernel.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt()
    return _applied


def _mallopt() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
