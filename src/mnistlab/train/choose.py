"""The one rule that chooses an engine for a run, and an engine made for it.

``kernels`` for a FastCNN model (``fastcnn``, ``widecnn``) where the compiled kernels compute it
(:func:`mnistlab.kernels.calls.applies`: the CPU, the library available), ``autograd`` otherwise.
``summary.json`` and the checkpoint record the engine; a resumed run continues on the one that
started it.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import FASTCNN_WIDTHS, TrainConfig
from ..errors import RunError, UsageError
from ..kernels.calls import FASTCNN, applies, bf16_available
from .engine import AUTOGRAD, BATCHED, ENGINES, FORMER_NAMES, KERNELS, Engine


def choose_engine(config: TrainConfig, device: str) -> str:
    """The rule: ``kernels`` for a FastCNN model where the compiled kernels compute it, else ``autograd``."""
    fits = config.model in FASTCNN_WIDTHS and applies(FASTCNN, device, widths=FASTCNN_WIDTHS[config.model])
    return KERNELS if fits else AUTOGRAD


def resolve_precision(config: TrainConfig, device: str, engine: str | None = None) -> TrainConfig:
    """``config`` with its precision settled: ``auto`` becomes ``bf16`` where the kernel engine trains it
    (``engine``, default by the rule) and the CPU has the bf16 kernels, ``fp32`` elsewhere; fp32 and
    bf16 stay as they are."""
    if config.precision != "auto":
        return config
    fast = (engine or choose_engine(config, device)) == KERNELS and config.nproc == 1 and bf16_available()
    return replace(config, precision="bf16" if fast else "fp32")


def check_processes(config: TrainConfig, device: str, name: str | None = None) -> None:
    """Refuse, in one line, a setting the engine (``name``, default by the rule) cannot train: several
    processes on the kernel engine, bf16 elsewhere or without the instructions, --sync-bn on the CPU."""
    if config.nproc > 1 and (name or choose_engine(config, device)) == KERNELS:
        raise UsageError(f"the {KERNELS} engine ({', '.join(FASTCNN_WIDTHS)} on the CPU) trains in one process; "
                         f"leave out --nproc, or train them with autograd (MNISTLAB_NATIVE=0, or CUDA)")
    if config.precision == "bf16" and (name or choose_engine(config, device)) != KERNELS:
        raise UsageError(f"--precision bf16 runs on the {KERNELS} engine ({', '.join(FASTCNN_WIDTHS)} on the CPU with "
                         f"the compiled kernels); here the {AUTOGRAD} engine trains")
    if config.precision == "bf16" and not bf16_available():
        raise UsageError("--precision bf16: no bf16 kernels here (the CPU lacks AVX512-BF16, or MNISTLAB_BF16=0); "
                         "use --precision fp32")
    if config.sync_bn and device != "cuda":
        raise UsageError("--sync-bn synchronises BatchNorm across GPUs; on the CPU each process keeps its own "
                         "statistics (leave out --sync-bn)")


def create_engine(config: TrainConfig, num_classes: int, device: str, name: str | None = None) -> Engine:
    """A fresh engine for ``config`` (``name``: the one a checkpoint names; default :func:`choose_engine`)."""
    name = FORMER_NAMES.get(name, name) or choose_engine(config, device)
    config = resolve_precision(config, device)
    if name == BATCHED:
        raise RunError("this run trained in a batch with other seeds; resume the batch: mnistlab train --resume "
                       "OUT (the folder holding its batch.json)")
    if name not in ENGINES:
        raise RunError(f"unknown engine {name!r}; this version has {', '.join(ENGINES)}")
    check_processes(config, device, name)
    if name == KERNELS:
        if choose_engine(config, device) != KERNELS:
            from ..kernels.build import why_unavailable

            why = why_unavailable()
            raise RunError(f"the {KERNELS} engine trains {', '.join(FASTCNN_WIDTHS)} on the CPU with the compiled "
                           f"kernels; here: model {config.model}, device {device}"
                           + (f", kernels unavailable: {why}" if why else ""))
        from .kernel_engine import KernelEngine

        return KernelEngine(config, num_classes)
    from .autograd_engine import AutogradEngine

    return AutogradEngine.create(config, num_classes, device)
