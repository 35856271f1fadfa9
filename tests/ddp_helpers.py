"""Run a function in K forked gloo processes, as ``accelerate launch`` would on K GPUs."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, function: Callable, args: tuple) -> None:
    from accelerate.state import AcceleratorState

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a single-process parent
    torch.set_num_threads(1)
    function(*args)


def run_in_gloo_processes(world: int, function: Callable, *args) -> None:
    """``function(*args)`` in ``world`` forked processes joined by gloo (raises if one fails)."""
    torch.multiprocessing.start_processes(
        _worker, args=(world, _free_port(), function, args), nprocs=world, start_method="fork"
    )
