"""Building and loading the compiled kernels (``csrc/``); the calls into them: :mod:`.calls`.

Nothing here imports PyTorch, so the kernel engine (:mod:`mnistlab.train.kernel_engine`) can
run without it. The library is compiled once per machine with the system's C compiler
(``cc -O3 -march=native``) into a cache folder and loaded with ctypes; without a compiler, or
where it fails, :func:`available` is False. ``MNISTLAB_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..data import mnist

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "seedcnn.c", CSRC / "fastcnn.c"]
HEADERS = [CSRC / "kernels.h", CSRC / "bf16.h"]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC"]  # compiling; linking adds -shared
# OpenMP where the compiler has it: the library then shares PyTorch's OpenMP runtime (libgomp.so.1,
# already loaded by torch) and its thread count; without it, the kernels run on one thread.
OPENMP = ["-fopenmp"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def cache_dir() -> Path:
    """Where the compiled library is kept: ``native/`` in the data cache (``mnistlab.data.mnist.cache_dir``)."""
    return mnist.cache_dir() / "native"


def _cpu_key() -> str:
    """What the compiled code depends on: the source, the flags, and this CPU's instruction sets."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    key = b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(FLAGS + OPENMP).encode()
    key += flags.encode() + platform.machine().encode()
    return hashlib.sha256(key).hexdigest()[:16]


def _compile(compiler: str, extra: list[str], objects: Path, out: str) -> subprocess.CompletedProcess:
    """Each source into an object file, all at once (one process per core's worth of work), then
    one shared library linked from them: about half the time of one compiler call on 2 cores."""
    procs = [subprocess.Popen([compiler, *FLAGS, *extra, "-c", str(src), "-o", str(objects / f"{src.stem}.o")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in SOURCES]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    link = [compiler, "-shared", *extra, "-o", out, *(str(objects / f"{src.stem}.o") for src in SOURCES), "-lm"]
    return subprocess.run(link, capture_output=True, text=True)


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) found")
    target = cache_dir() / f"kernels-{_cpu_key()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            with tempfile.TemporaryDirectory(dir=target.parent) as objects:
                for extra in (OPENMP, []):
                    done = _compile(compiler, extra, Path(objects), tmp)
                    if done.returncode == 0:
                        break
                else:
                    raise OSError(f"{compiler} failed: {done.stderr.strip()[:300]}")
            os.replace(tmp, target)  # atomic: concurrent builds leave one whole library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    f = ctypes.c_void_p
    lib.seedcnn_forward.argtypes = [ctypes.c_int, ctypes.c_int] + [f] * 11
    lib.seedcnn_backward.argtypes = [ctypes.c_int, ctypes.c_int] + [f] * 17
    lib.fastcnn_forward.argtypes = [ctypes.c_int] * 5 + [f] * 19 + [ctypes.c_int]
    lib.fastcnn_backward.argtypes = [ctypes.c_int] * 4 + [f] * 31 + [ctypes.c_int]
    lib.fastcnn_bf16.argtypes = []
    lib.fastcnn_bf16.restype = ctypes.c_int
    lib.fastcnn_head.argtypes = [ctypes.c_int] * 3 + [f] * 4 + [ctypes.c_float] + [f] * 5
    for fn in (lib.seedcnn_forward, lib.seedcnn_backward, lib.fastcnn_head):
        fn.restype = None
    lib.fastcnn_forward.restype = lib.fastcnn_backward.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None where it cannot be had."""
    global _lib, _tried, _error
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("MNISTLAB_NATIVE", "1") == "0":
                _error = "turned off by MNISTLAB_NATIVE=0"
            elif sys.platform == "win32":
                _error = "not built on Windows"
            else:
                try:
                    _lib = _build()
                except OSError as e:
                    _error = str(e)
        return _lib


def available() -> bool:
    return library() is not None


def why_unavailable() -> str | None:
    library()
    return _error
