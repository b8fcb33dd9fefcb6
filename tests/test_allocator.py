"""The malloc settings that let training steps reuse freed buffers instead of page-faulting."""

import platform
import resource

import pytest
import torch
import torch.nn.functional as F

from mnistlab.evaluation import prepare
from mnistlab.models import create_model
from mnistlab.train.allocator import keep_freed_memory
from mnistlab.train.optim import SGD

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt thresholds are glibc's")


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@glibc
def test_settings_apply_once_and_report_it():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


@glibc
def test_training_steps_reuse_their_buffers():
    """Batches sliced from uint8 images as training does: with glibc's defaults this loop
    page-faulted about 700-800 times a step (buffers handed back to the kernel and zero-filled
    again on reuse); with the settings the buffers stay and are reused."""
    keep_freed_memory()
    torch.manual_seed(0)
    model = create_model("cnn").to(memory_format=torch.channels_last)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randint(0, 256, (1000, 784), dtype=torch.uint8)
    labels = torch.randint(0, 10, (1000,))

    def step():
        F.cross_entropy(model(prepare(images[:64])), labels[:64]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up: the heap grows to the step's peak once
        step()
    before = _page_faults()
    steps = 40
    for _ in range(steps):
        step()
    per_step = (_page_faults() - before) / steps
    assert per_step < 20, f"{per_step:.0f} page faults per step"
