"""What the two training stages (pretrain, train) share about running on several processes.

Both run the same code with one process or with K processes under ``accelerate launch`` (which
``run-gpu --accelerate`` starts, one process per leased GPU; gloo DDP on the CPU). The
:class:`accelerate.Accelerator` made here decides the device and wraps the model in DDP.
"""

from __future__ import annotations

import torch


def make_accelerator(device: str, mixed_precision: str = "no"):
    """An ``Accelerator`` on the CPU when ``device`` is "cpu" (or "auto" without CUDA), else on
    this process's GPU. ``mixed_precision="auto"`` means bf16 on GPUs and none on the CPU."""
    from accelerate import Accelerator

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def gather_objects(accelerator, values: list) -> list:
    """``values`` (picklable) of every process, in process order (as is on one process)."""
    if accelerator.num_processes == 1:
        return list(values)
    gathered: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, list(values))
    return [value for part in gathered for value in part]


def finite_everywhere(accelerator, value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every process (so all processes stop together)."""
    flag = torch.tensor([float(torch.isfinite(value).all())], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)
