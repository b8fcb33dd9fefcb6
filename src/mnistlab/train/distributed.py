"""Data-parallel training of one run over several processes, on PyTorch's own distributed engine.

``mnistlab train --nproc N`` starts N processes through torchrun's standalone mode (a free port
of its own, so jobs never collide); the same command started by an outside ``torchrun --nnodes
...`` trains across machines. Backend: gloo on the CPU, NCCL on CUDA. Every process draws the same
shuffled order of each epoch from the seeded generator and takes its slice of every global batch,
so ``--batch-size`` and the learning rate mean what they mean in one process; gradients are summed
across the processes each step (one all-reduce of one flat buffer) and divided by the global
batch's size, a process with no image of a last partial batch contributing zeros. BatchNorm's
running statistics are rank 0's, sent to the others after every step (as DDP does); ``--sync-bn``
normalises with the statistics of the whole global batch instead (CUDA only). Only rank 0 writes
the run directory and prints.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys

from ..errors import MnistlabError, UsageError, first_line

ARGV = "MNISTLAB_JOB_ARGV"  # the command each process of a job runs, as JSON
DEFAULT_TIMEOUT = 120.0  # seconds a collective waits for a silent process before the job ends


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1


def restarted() -> bool:
    """Whether torchrun restarted the job after a process failed (then every process resumes)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def active():
    """The process group when training over several processes, else None."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
        else None


def setup(device: str, timeout: float) -> None:
    """Join the job's process group (gloo on the CPU, NCCL on CUDA; ``timeout`` seconds for any collective)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend, wait = "nccl" if device == "cuda" else "gloo", datetime.timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # torchrun's own store, under a prefix per attempt: after a restart no process may read the
        # addresses the processes of the attempt before published there
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                              is_master=False, timeout=wait)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"mnistlab/attempt-{attempt}/", store)
        dist.init_process_group(backend, store=store, rank=rank(), world_size=world_size(), timeout=wait)
    else:
        dist.init_process_group(backend, timeout=wait)


def teardown() -> None:
    if "torch.distributed" not in sys.modules:  # never joined a job (and PyTorch maybe never imported)
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def launch(argv: list[str], nproc: int, max_restarts: int) -> None:
    """Run ``mnistlab ARGV`` in ``nproc`` processes through torchrun's standalone mode, until it ends.

    The processes' standard output (rank 0's lines) passes through. A failure raises one line: the
    failing process's own, or one saying which process died (torchrun's report is left out)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--shutdown-timeout=5", "-m", "mnistlab"]
    # The command's arguments travel in the environment: torchrun would take some of them for its own.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), ARGV: json.dumps(argv)}
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, env=env)
    if done.returncode == 0:
        return
    for line in done.stderr.splitlines():  # a process's own one-line error: "mnistlab COMMAND: error: ..."
        own = re.match(r"mnistlab \S+: (?:error: )?(.*)", line)
        if own:
            raise MnistlabError(own.group(1))
    died = [line.strip() for line in done.stderr.splitlines() if "exitcode" in line or "Signal" in line]
    what = died[0] if died else f"torchrun exited with status {done.returncode}"
    raise MnistlabError(f"a training process failed ({what}); every complete epoch is saved: resume with "
                        f"mnistlab train --resume RUN_DIR")


def job_argv() -> list[str] | None:
    """In a process of a job :func:`launch` started, the command it runs."""
    text = os.environ.get(ARGV)
    return json.loads(text) if text and launched() else None


def check_world(config_nproc: int) -> None:
    """In a job torchrun started, refuse to continue a run with another number of processes than it had."""
    if launched() and world_size() != config_nproc:
        raise UsageError(f"--resume: this run trained in {config_nproc} processes; continue it with the same number "
                         f"(this job has {world_size()})")


def all_reduce_(tensor) -> None:
    import torch.distributed as dist

    dist.all_reduce(tensor)


def sum_grads_(params, scale: float) -> None:
    """Sum the processes' gradients of ``params`` (None counts as zeros) and multiply by ``scale``."""
    import torch
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    all_reduce_(flat)
    flat.mul_(scale)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        p.grad = g


def broadcast_buffers_(module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) to every process."""
    import torch.distributed as dist

    for b in module.buffers():
        dist.broadcast(b, 0)


def gather_rows(local, total: int):
    """The processes' contiguous slices of a (n_r, ...) tensor, joined in rank order into (total, ...)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    size = -(-total // world)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    sizes = [len(s) for s in torch.arange(total).tensor_split(world)]
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def failed(exc: BaseException) -> MnistlabError:
    """A collective that failed (a process died, or stayed silent past the timeout), as the one line
    the job ends with."""
    text = re.sub(r"\[[^\]]*\]:?\s*", "", str(exc)).strip()  # gloo's source paths and addresses
    first = first_line(text or exc, limit=100)
    if "reset by peer" in text or "closed" in text.lower() or "broken pipe" in text.lower():
        what = "another training process died"
    else:
        what = "a training process stopped answering for longer than --dist-timeout"
    return MnistlabError(f"{what} (rank {rank()}: {first}); every complete epoch is saved: resume with "
                         f"mnistlab train --resume RUN_DIR")
