"""``python -m pipeline run-gpu --gpus N [--threads T] [--accelerate] -- COMMAND ARGS...``

The wrapper every GPU rule runs its command through. It leases N devices (``pipeline.gpu_lease``:
file locks in one folder per machine and user; a Slurm job's own GPUs kept as they are; N of an
allocation's GPUs leased when a local run inside ``salloc`` sees more; the CPU when there is no
GPU), sets ``CUDA_VISIBLE_DEVICES`` and a per-process thread count, runs COMMAND, forwards
signals to it and exits with its exit code.

With ``--accelerate`` and K > 1 leased devices, COMMAND runs once per device through
``accelerate launch --multi_gpu --num_processes K`` (DDP), each process with
``OMP_NUM_THREADS = max(1, threads // K)``: Snakemake exports the rule's ``threads`` to every job,
and K processes each using all of them would oversubscribe the cores K-fold.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys

from pipeline.gpu_lease import GpuLeaseError, lease, threads_per_process

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port the OS reports free, so concurrent launches on one host do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(command: list[str], n_processes: int, use_accelerate: bool) -> list[str]:
    """COMMAND as is, or wrapped in ``accelerate launch`` for K > 1 processes (one per GPU)."""
    if not use_accelerate or n_processes <= 1:
        return list(command)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n_processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        # Only silences the launcher's warning: Accelerator(mixed_precision=...) in the
        # training code takes precedence over this setting.
        "--mixed_precision",
        "no",
        "--no_python",
        *command,
    ]


def job_environment(threads: int) -> dict[str, str]:
    """The current environment (with the lease's CUDA_VISIBLE_DEVICES) and the thread count."""
    environment = dict(os.environ)
    for variable in THREAD_VARIABLES:
        environment[variable] = str(threads)
    return environment


def _die_with_parent() -> None:
    # Runs in the child before exec: if the wrapper dies (even by SIGKILL), the job gets SIGTERM
    # instead of running on as an orphan nobody waits for (it still holds the lock fds, so its
    # devices stay leased until it has actually exited).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_forwarding_signals(command: list[str], environment: dict[str, str], fds: list[int]) -> int:
    """Run ``command`` in its own process group, forward signals to that group, return its code.

    The child inherits the lock fds, so the devices stay leased until the command itself ends.
    A command killed by signal S returns 128 + S, as a shell would report it.
    """
    child = subprocess.Popen(
        command,
        env=environment,
        pass_fds=fds,
        process_group=0,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):  # the child has just exited
            os.killpg(child.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - returncode if returncode < 0 else returncode


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("run-gpu: missing '--' before the command, e.g. run-gpu --gpus 1 -- CMD")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m pipeline run-gpu", description=__doc__)
    parser.add_argument("--gpus", type=int, required=True, help="devices to lease (0: CPU)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cores of the job (Snakemake's {threads}); default: inherited OMP_NUM_THREADS",
    )
    parser.add_argument("--accelerate", action="store_true", help="one process per leased GPU")
    parser.add_argument("--pool", default=None, help="device ids, default CUDA_VISIBLE_DEVICES")
    parser.add_argument(
        "--lock-dir",
        default=None,
        help="default $DSPO_GPU_LEASE_DIR, else /tmp/dspo-gpu-leases-UID (per Slurm allocation)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for devices")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("no command after '--'")
    return args, command


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        with lease(args.gpus, pool=args.pool, lock_dir=args.lock_dir, timeout=args.timeout) as held:
            n_processes = max(1, len(held.devices)) if args.accelerate else 1
            threads = threads_per_process(args.threads, n_processes)
            final_command = launch_command(command, n_processes, args.accelerate)
            devices = ",".join(held.devices) or "none (CPU)"
            print(
                f"run-gpu: devices {devices} [{held.mode}], {n_processes} process(es), "
                f"OMP_NUM_THREADS={threads}",
                file=sys.stderr,
            )
            environment = job_environment(threads)
            return run_forwarding_signals(final_command, environment, held.fds)
    except GpuLeaseError as error:
        print(f"run-gpu: {error}", file=sys.stderr)
        return 2
