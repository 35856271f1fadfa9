"""GPU lease: give each concurrent local job its own devices through file locks.

Snakemake's ``resources: gpu=N`` is only a counter; it never says *which* GPUs a job may use
(snakemake/snakemake#281). This module closes that gap on a local workstation: a job takes an
exclusive ``fcntl.flock`` on one lock file per device (``<lock_dir>/gpu<id>.lock``) and runs
with ``CUDA_VISIBLE_DEVICES`` set to exactly those devices. The kernel drops a flock when the
last process holding the open file dies, even by SIGKILL, so a killed job never leaks a GPU.

The lock folder is one per machine and user (``/tmp/dspo-gpu-leases-<uid>``, mode 0700), not
per working directory: two runs started from two checkouts share the same devices, so they must
share the same locks. ``$DSPO_GPU_LEASE_DIR`` (or ``lock_dir``) overrides it.

Under Slurm (``SLURM_JOB_ID`` set) two cases differ by what the job sees:

* a job the Slurm executor submitted sees exactly the GPUs it asked for
  (``CUDA_VISIBLE_DEVICES``, else ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``): the lease keeps
  Slurm's assignment (mode ``"slurm"``) and takes no lock; with cgroup confinement two jobs on
  one node may both see a device called ``0``, so a node-wide lock would wrongly serialise them;
* a local Snakemake run inside an allocation (``salloc``, an interactive ``srun``) sees more GPUs
  than the job asked for: the lease takes ``n_gpus`` of the allocation's devices with the same
  locks (mode ``"lease"``), by default in a folder of that allocation
  (``.../dspo-gpu-leases-<uid>/slurm-<SLURM_JOB_ID>``), since device names are only meaningful
  inside one allocation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# Not tempfile.gettempdir(): $TMPDIR is often per job (Slurm) or per session, and two runs must
# find the same folder. Not $XDG_RUNTIME_DIR either: it is absent outside login sessions (cron,
# nohup after logout, su), so one user's runs would again disagree on the folder.
DEFAULT_LOCK_ROOT = "/tmp"
LOCK_DIR_ENV = "DSPO_GPU_LEASE_DIR"
SLURM_GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


class GpuLeaseError(RuntimeError):
    """A lease that cannot be granted: more GPUs than the pool has, or a timeout."""


def parse_pool(pool: str | Sequence[str | int]) -> list[str]:
    """Device ids from ``"0,1,2"`` or a sequence; ids stay strings (UUIDs and MIG ids allowed)."""
    items = pool.split(",") if isinstance(pool, str) else [str(item) for item in pool]
    return [item.strip() for item in items if item.strip()]


def count_devices() -> int:
    """Number of CUDA devices on the host: ``nvidia-smi -L``, else ``torch.cuda.device_count()``."""
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, check=False, timeout=60
        )
        if listing.returncode == 0:
            return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def visible_pool(pool: str | Sequence[str | int] | None = None) -> list[str]:
    """The devices this job may lease from: ``pool``, else ``CUDA_VISIBLE_DEVICES``, else all."""
    if pool is not None:
        return parse_pool(pool)
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return parse_pool(os.environ["CUDA_VISIBLE_DEVICES"])
    return [str(index) for index in range(count_devices())]


def slurm_job_id() -> str | None:
    """The Slurm job (allocation) this process runs in, or None outside Slurm."""
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_visible_devices() -> list[str]:
    """The GPUs Slurm gave this job or step, as the job's CUDA runtime will number them."""
    for variable in SLURM_GPU_VARIABLES:
        if variable in os.environ:
            return parse_pool(os.environ[variable])
    return []


def default_lock_dir() -> Path:
    """One folder per machine and user; inside a Slurm allocation, one per allocation in it."""
    base = Path(DEFAULT_LOCK_ROOT) / f"dspo-gpu-leases-{os.getuid()}"
    job = slurm_job_id()
    return base / f"slurm-{re.sub(r'[^A-Za-z0-9_.-]', '_', job)}" if job else base


def resolve_lock_dir(lock_dir: str | os.PathLike | None = None) -> Path:
    """``lock_dir``, else ``$DSPO_GPU_LEASE_DIR``, else :func:`default_lock_dir`."""
    explicit = lock_dir or os.environ.get(LOCK_DIR_ENV)
    return Path(explicit) if explicit else default_lock_dir()


def prepare_lock_dir(lock_dir: Path) -> None:
    """Create the lock folder with mode 0700; refuse a default folder that others control.

    The default folder lies in the world-writable /tmp, where another user could have created it
    first (to hold this user's devices for ever, or as a symlink elsewhere): each of its levels
    must be a real directory owned by this user that nobody else can write to. A folder named
    by ``lock_dir`` or ``$DSPO_GPU_LEASE_DIR`` is the caller's choice and only created.
    """
    default = default_lock_dir()
    if lock_dir != default:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    base = Path(DEFAULT_LOCK_ROOT) / f"dspo-gpu-leases-{os.getuid()}"
    for folder in dict.fromkeys((base, default)):
        try:
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # whatever the umask
        except FileExistsError:
            pass
        info = os.lstat(folder)
        problem = None
        if not stat.S_ISDIR(info.st_mode):
            problem = "is not a directory (a symlink or a file)"
        elif info.st_uid != os.getuid():
            problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
        elif info.st_mode & 0o022:
            problem = f"is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
        if problem:
            raise GpuLeaseError(
                f"GPU lease folder {folder} {problem}; remove it or set ${LOCK_DIR_ENV} "
                "to a folder of your own"
            )


def _lock_file(lock_dir: Path, device: str) -> Path:
    # UUIDs ("GPU-8f3...") and MIG ids ("MIG-GPU-.../1/0") must become one safe file name.
    return lock_dir / f"gpu{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"


def _try_lock_all(lock_dir: Path, pool: list[str], n_gpus: int) -> list[tuple[str, int]] | None:
    """Non-blocking pass over the pool; all ``n_gpus`` locks or none (no hold-and-wait)."""
    held: list[tuple[str, int]] = []
    for device in pool:
        fd = os.open(_lock_file(lock_dir, device), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((device, fd))
        if len(held) == n_gpus:
            return held
    _release(held)
    return None


def _release(held: list[tuple[str, int]]) -> None:
    for _, fd in held:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _note_holder(held: list[tuple[str, int]]) -> None:
    # For a human looking at a stuck run: who holds which device.
    devices = ",".join(device for device, _ in held)
    for _, fd in held:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} devices={devices}\n".encode(), 0)


@contextlib.contextmanager
def _cuda_visible_devices(value: str | None) -> Iterator[None]:
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


class Lease:
    """What a job got: ``devices`` (ids, empty on the CPU), the lock ``fds`` it holds, and how.

    ``mode`` is ``"lease"`` (locks held; also inside a Slurm allocation shared by a local run),
    ``"slurm"`` (the Slurm job's own assignment kept), or ``"cpu"``.
    """

    def __init__(self, devices: list[str], fds: list[int], mode: str) -> None:
        self.devices = devices
        self.fds = fds
        self.mode = mode

    def __repr__(self) -> str:
        return f"Lease(devices={self.devices!r}, mode={self.mode!r})"


@contextlib.contextmanager
def lease(
    n_gpus: int,
    pool: str | Sequence[str | int] | None = None,
    lock_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> Iterator[Lease]:
    """Hold ``n_gpus`` free devices from the pool and set ``CUDA_VISIBLE_DEVICES`` to them.

    Waits (polling with jitter) while other jobs hold the devices; ``timeout`` in seconds, None
    waits for ever. ``n_gpus=0`` or an empty pool runs on the CPU (``CUDA_VISIBLE_DEVICES=""``).
    Asking for more devices than the pool has raises ``GpuLeaseError``, never a silent shrink.
    On exit the locks are released and ``CUDA_VISIBLE_DEVICES`` is restored.

    Inside a Slurm job the pool is always Slurm's assignment (``pool`` is ignored): kept as it is
    when it has at most ``n_gpus`` devices (a job the executor submitted), leased from when it
    has more (a local run inside an allocation). See the module docstring.
    """
    if n_gpus < 0:
        raise GpuLeaseError(f"number of GPUs must be >= 0, got {n_gpus}")
    if n_gpus > 0 and slurm_job_id():
        assigned = slurm_visible_devices()
        if assigned and len(assigned) <= n_gpus:
            if len(assigned) < n_gpus:
                print(
                    f"gpu_lease: {n_gpus} GPU(s) requested, Slurm job {slurm_job_id()} has "
                    f"{len(assigned)} ({','.join(assigned)}): keeping Slurm's assignment",
                    file=sys.stderr,
                )
            yield Lease(assigned, [], "slurm")
            return
        pool = assigned  # more than asked for: share the allocation through the locks
    devices = visible_pool(pool) if n_gpus > 0 else []
    if not devices:
        if n_gpus > 0:
            print(
                f"gpu_lease: {n_gpus} GPU(s) requested, none visible: running on the CPU",
                file=sys.stderr,
            )
        with _cuda_visible_devices(""):
            yield Lease([], [], "cpu")
        return
    if n_gpus > len(devices):
        raise GpuLeaseError(
            f"{n_gpus} GPUs requested but the pool has only {len(devices)} "
            f"(devices {','.join(devices)}); lower the rule's resources.gpu or widen the pool"
        )
    held = _acquire(resolve_lock_dir(lock_dir), devices, n_gpus, timeout)
    leased = [device for device, _ in held]
    try:
        _record("acquire", leased)
        with _cuda_visible_devices(",".join(leased)):
            yield Lease(leased, [fd for _, fd in held], "lease")
    finally:
        _record("release", leased)  # before the locks go: the record never over-counts
        _release(held)


#: a file that every lease appends its acquire and release to (one JSON line each, in the order
#: they happened: O_APPEND writes of one line are atomic), for checking how many devices a run
#: keeps busy (tests/test_gpu_lease.py); unset, nothing is recorded
RECORD_ENV = "DSPO_GPU_LEASE_RECORD"


def _record(event: str, devices: list[str]) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    line = (
        json.dumps({"event": event, "devices": devices, "pid": os.getpid(), "time": time.time()})
        + "\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def most_held_at_once(records: str | os.PathLike) -> int:
    """The most devices held at one moment, from a :data:`RECORD_ENV` file (events in order)."""
    held = most = 0
    for line in Path(records).read_text().splitlines():
        event = json.loads(line)
        held += len(event["devices"]) * (1 if event["event"] == "acquire" else -1)
        most = max(most, held)
    return most


def _acquire(
    lock_dir: Path, devices: list[str], n_gpus: int, timeout: float | None
) -> list[tuple[str, int]]:
    prepare_lock_dir(lock_dir)
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    while True:
        held = _try_lock_all(lock_dir, devices, n_gpus)
        if held is not None:
            _note_holder(held)
            return held
        if deadline is not None and time.monotonic() >= deadline:
            raise GpuLeaseError(
                f"timed out after {timeout} s waiting for {n_gpus} free GPU(s) of "
                f"{','.join(devices)} (locks in {lock_dir})"
            )
        if not announced:
            print(
                f"gpu_lease: waiting for {n_gpus} free GPU(s) of {','.join(devices)}",
                file=sys.stderr,
            )
            announced = True
        # Jitter keeps jobs that started together from retrying in lockstep.
        time.sleep(0.05 + random.random() * 0.2)


def threads_per_process(threads: int | None, n_processes: int) -> int:
    """OpenMP threads for each of ``n_processes`` workers sharing ``threads`` cores (>= 1).

    ``threads`` None falls back to the inherited ``OMP_NUM_THREADS`` (Snakemake exports the
    rule's ``threads`` there), else 1.
    """
    if threads is None:
        inherited = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(inherited) if inherited.isdigit() else 1
    return max(1, threads // max(1, n_processes))
