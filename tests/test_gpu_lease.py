"""GPU lease and the run-gpu wrapper, on a fake device pool (no GPU needed)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import gpu_lease, run_gpu
from pipeline.gpu_lease import GpuLeaseError, lease, threads_per_process
from tests.workflow_helpers import copy_workflow, snakemake

REPO = Path(__file__).resolve().parents[1]
FORK = multiprocessing.get_context("fork")


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for variable in ("SLURM_JOB_ID", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("DSPO_GPU_LEASE_DIR", raising=False)


@pytest.fixture
def lock_root(tmp_path, monkeypatch):
    """The default lock folder's parent (normally /tmp) moved into the test's own folder."""
    root = tmp_path / "tmp_root"
    root.mkdir()
    monkeypatch.setattr(gpu_lease, "DEFAULT_LOCK_ROOT", str(root), raising=False)
    return root


def _hold_and_report(n_gpus, lock_dir, barrier, results):
    with lease(n_gpus, pool="0,1,2,3", lock_dir=lock_dir, timeout=20) as held:
        results.put((held.devices, os.environ["CUDA_VISIBLE_DEVICES"]))
        barrier.wait(timeout=20)  # every job holds its devices at the same moment


@pytest.mark.parametrize("requests", [[1, 1, 1, 1], [2, 2], [1, 2, 1]])
def test_concurrent_jobs_get_disjoint_devices(tmp_path, requests):
    barrier, results = FORK.Barrier(len(requests)), FORK.Queue()
    jobs = [
        FORK.Process(target=_hold_and_report, args=(n, tmp_path, barrier, results))
        for n in requests
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=30)
        assert job.exitcode == 0
    granted = [results.get(timeout=1) for _ in requests]
    devices = [device for held, _ in granted for device in held]
    assert sorted(devices) == sorted(set(devices))  # disjoint
    assert sorted(len(held) for held, _ in granted) == sorted(requests)
    assert all(env == ",".join(held) for held, env in granted)


def test_busy_device_waits_then_times_out(tmp_path):
    with lease(2, pool="0,1", lock_dir=tmp_path, timeout=5):
        start = time.monotonic()
        expected = "timed out after 0.3 s waiting for 1 free GPU"
        with pytest.raises(GpuLeaseError, match=expected), lease(1, "0,1", tmp_path, 0.3):
            pass
        assert time.monotonic() - start >= 0.3
    with lease(2, pool="0,1", lock_dir=tmp_path, timeout=1) as again:
        assert again.devices == ["0", "1"]


def test_killed_holder_frees_its_devices(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import time
            from pipeline.gpu_lease import lease
            with lease(2, pool="0,1", lock_dir={str(tmp_path)!r}):
                print("held", flush=True)
                time.sleep(60)
        """),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GpuLeaseError, match="timed out"), lease(1, "0,1", tmp_path, 0.2):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        with lease(2, pool="0,1", lock_dir=tmp_path, timeout=2) as after:
            assert after.devices == ["0", "1"]
    finally:
        holder.kill()
        holder.wait()


def test_under_slurm_the_lease_keeps_slurms_assignment(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with lease(2, pool="0,1", lock_dir=tmp_path / "locks") as held:
        assert (held.mode, held.devices) == ("slurm", ["3"])
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (tmp_path / "locks").exists()


def test_zero_gpus_or_empty_pool_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with lease(0, lock_dir=tmp_path) as held:
        assert (held.mode, held.devices) == ("cpu", [])
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # the job must not touch a GPU
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    with lease(2, pool="", lock_dir=tmp_path) as held:
        assert (held.mode, held.devices) == ("cpu", [])


def test_pool_defaults_to_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with lease(2, lock_dir=tmp_path, timeout=5) as held:
        assert held.devices == ["5", "7"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu5.lock", "gpu7.lock"]
    with lease(1, lock_dir=tmp_path, timeout=5) as held:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"


def test_lock_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPO_GPU_LEASE_DIR", str(tmp_path / "env_locks"))
    with lease(1, pool="2", timeout=5):
        assert (tmp_path / "env_locks" / "gpu2.lock").read_text().startswith(f"pid={os.getpid()}")


def test_more_gpus_than_the_pool_is_an_error(tmp_path):
    expected = r"3 GPUs requested but the pool has only 2 \(devices 0,1\)"
    with pytest.raises(GpuLeaseError, match=expected), lease(3, pool="0,1", lock_dir=tmp_path):
        pass


def test_threads_per_process(monkeypatch):
    assert threads_per_process(8, 3) == 2
    assert threads_per_process(1, 4) == 1
    assert threads_per_process(6, 0) == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert threads_per_process(None, 2) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_process(None, 2) == 1


def test_launch_command_wraps_accelerate_only_for_several_processes():
    command = ["python", "-m", "pipeline", "train", "--seed", "1"]
    assert run_gpu.launch_command(command, 1, use_accelerate=True) == command
    assert run_gpu.launch_command(command, 2, use_accelerate=False) == command
    launched = run_gpu.launch_command(command, 2, use_accelerate=True)
    assert launched[1:3] == ["-m", "accelerate.commands.launch"]
    assert launched[launched.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" in launched
    assert launched[-len(command) - 1 :] == ["--no_python", *command]


ENV_PROBE = (
    "import os, sys; open(sys.argv[1] + os.environ.get('RANK', 'single'), 'w').write("
    "os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + os.environ['OMP_NUM_THREADS'] + ' ' "
    "+ os.environ.get('WORLD_SIZE', '-'))"
)


def test_run_gpu_sets_devices_and_threads_and_forwards_exit_code(tmp_path):
    probe = str(tmp_path / "env_")
    common = ["--pool", "0,1,2", "--lock-dir", str(tmp_path / "locks"), "--threads", "4"]
    common += ["--timeout", "10"]
    assert run_gpu.main(["--gpus", "2", *common, "--", sys.executable, "-c", ENV_PROBE, probe]) == 0
    assert (tmp_path / "env_single").read_text() == "0,1 4 -"
    exit_seven = [sys.executable, "-c", "raise SystemExit(7)"]
    assert run_gpu.main(["--gpus", "1", *common, "--", *exit_seven]) == 7
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert run_gpu.main(["--gpus", "0", "--", *killed]) == 128 + signal.SIGKILL
    assert run_gpu.main(["--gpus", "4", *common, "--", *exit_seven]) == 2  # pool too small


def test_run_gpu_accelerate_runs_one_process_per_gpu(tmp_path):
    probe = str(tmp_path / "rank_")
    argv = ["--gpus", "2", "--pool", "0,1", "--lock-dir", str(tmp_path), "--threads", "4"]
    argv += ["--timeout", "10"]
    command = [sys.executable, "-c", ENV_PROBE, probe]
    assert run_gpu.main([*argv, "--accelerate", "--", *command]) == 0
    assert sorted(p.name for p in tmp_path.glob("rank_*")) == ["rank_0", "rank_1"]
    assert {p.read_text() for p in tmp_path.glob("rank_*")} == {"0,1 2 2"}


def test_run_gpu_forwards_sigterm_to_the_command(tmp_path):
    marker = tmp_path / "got_sigterm"
    child_code = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(signum, frame):
            pathlib.Path({str(marker)!r}).write_text(str(signum))
            sys.exit(5)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """)
    wrapper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run-gpu",
            "--gpus",
            "0",
            "--",
            sys.executable,
            "-c",
            child_code,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert wrapper.stdout.readline().strip() == "ready"
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=20) == 5
        assert marker.read_text() == str(int(signal.SIGTERM))
    finally:
        wrapper.kill()
        wrapper.wait()


def test_run_gpu_needs_a_command_after_double_dash():
    with pytest.raises(SystemExit, match="missing '--'"):
        run_gpu.main(["--gpus", "1", "echo"])


def test_killed_wrapper_stops_its_command_and_frees_the_devices(tmp_path):
    sleeper = "import time; print('ready', flush=True); time.sleep(60)"
    wrapper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run-gpu",
            "--gpus",
            "2",
            "--pool",
            "0,1",
            "--lock-dir",
            str(tmp_path),
            "--",
            sys.executable,
            "-c",
            sleeper,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert wrapper.stdout.readline().strip() == "ready"
        wrapper.send_signal(signal.SIGKILL)
        wrapper.wait(timeout=10)
        # The command got SIGTERM from the kernel (parent-death signal) and released the locks.
        with lease(2, pool="0,1", lock_dir=tmp_path, timeout=10) as after:
            assert after.devices == ["0", "1"]
    finally:
        wrapper.kill()
        wrapper.wait()


def test_workflow_refuses_more_gpus_than_the_cap(tmp_path):
    # Snakemake itself would start the job with the cap: the Snakefile says so instead
    workdir = copy_workflow(tmp_path / "wf")
    asking = ("--dry-run", "--set-resources", "train:gpu=3", "pretrain:gpu=2")
    refused = snakemake(workdir, *asking, "--resources", "gpu=2", check=False)
    assert refused.returncode != 0
    assert "--resources gpu=2 is fewer GPUs than rules ask for (train asks for 3)" in (
        refused.stdout + refused.stderr
    )
    for cap in ("gpu=3", "gpu=0"):  # enough GPUs; or the CPU for every GPU rule
        snakemake(workdir, *asking, "--resources", cap)


# --- one lock folder per machine and user, not per working directory ---------------------------

INTERVAL_PROBE = (
    "import os, sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
    "open(sys.argv[1], 'w').write(f\"{os.environ['CUDA_VISIBLE_DEVICES']} {start} {time.time()}\")"
)


def test_runs_from_two_working_directories_never_share_a_device(tmp_path):
    # Two checkouts, two runs each, one pool of 2 devices: a device is never held twice at once.
    # The default folder (/tmp/dspo-gpu-leases-UID) is used for real; device ids unique to this
    # test keep it from waiting on anything else.
    pool = [f"test{os.getpid()}a", f"test{os.getpid()}b"]
    environment = {k: v for k, v in os.environ.items() if k != "DSPO_GPU_LEASE_DIR"}
    environment["PYTHONPATH"] = str(REPO)
    runs = []
    for index in range(4):
        workdir = tmp_path / f"checkout{index % 2}"
        workdir.mkdir(exist_ok=True)
        runs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "run-gpu",
                    "--gpus",
                    "1",
                    "--pool",
                    ",".join(pool),
                    "--timeout",
                    "60",
                    "--",
                    sys.executable,
                    "-c",
                    INTERVAL_PROBE,
                    str(tmp_path / f"interval{index}"),
                    "0.8",
                ],
                cwd=workdir,
                env=environment,
            )
        )
    try:
        assert [run.wait(timeout=90) for run in runs] == [0, 0, 0, 0]
    finally:
        for run in runs:
            run.kill()
        for device in pool:
            (gpu_lease.default_lock_dir() / f"gpu{device}.lock").unlink(missing_ok=True)
    held = []
    for index in range(4):
        device, start, end = (tmp_path / f"interval{index}").read_text().split()
        held.append((device, float(start), float(end)))
    assert {device for device, _, _ in held} <= set(pool)
    for first in range(4):
        for second in range(first + 1, 4):
            (d1, s1, e1), (d2, s2, e2) = held[first], held[second]
            overlap = min(e1, e2) > max(s1, s2)
            assert not (overlap and d1 == d2), f"runs {first} and {second} both held {d1}"
    assert not list(tmp_path.glob("checkout*/.gpu_leases"))


def test_default_lock_folder_is_per_user_and_private(tmp_path, lock_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with lease(1, pool="0", timeout=5) as held:
        assert (held.mode, held.devices) == ("lease", ["0"])
    folder = lock_root / f"dspo-gpu-leases-{os.getuid()}"
    assert gpu_lease.resolve_lock_dir() == folder
    assert sorted(p.name for p in folder.iterdir()) == ["gpu0.lock"]
    assert folder.stat().st_mode & 0o777 == 0o700
    assert not (tmp_path / ".gpu_leases").exists()
    monkeypatch.setenv("DSPO_GPU_LEASE_DIR", str(tmp_path / "mine"))
    assert gpu_lease.resolve_lock_dir() == tmp_path / "mine"  # still overridable


@pytest.mark.parametrize("plant", ["open_folder", "symlink"])
def test_default_lock_folder_someone_else_could_control_is_refused(tmp_path, lock_root, plant):
    folder = lock_root / f"dspo-gpu-leases-{os.getuid()}"
    if plant == "open_folder":
        folder.mkdir()
        folder.chmod(0o777)
        expected = r"is writable by others \(mode 777\)"
    else:
        (tmp_path / "elsewhere").mkdir()
        folder.symlink_to(tmp_path / "elsewhere")
        expected = "is not a directory"
    with pytest.raises(GpuLeaseError, match=expected), lease(1, pool="0", timeout=1):
        pass
    if plant == "symlink":
        assert not list((tmp_path / "elsewhere").iterdir())  # nothing written through it


# --- Slurm: a job's own GPUs are kept; a local run inside an allocation leases its share ----------


def test_slurm_job_with_its_own_gpus_keeps_them(tmp_path, lock_root, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with lease(1, pool="0,1") as held:
        assert (held.mode, held.devices, held.fds) == ("slurm", ["3"], [])
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_STEP_GPUS", "2,5")
    with lease(2) as held:
        assert (held.mode, held.devices) == ("slurm", ["2", "5"])
    assert not list(lock_root.iterdir())  # no lock taken for a job Slurm confined itself


def _hold_from_allocation(barrier, results):
    # A job Snakemake started inside the allocation: it inherits all of the allocation's GPUs.
    with lease(2, timeout=20) as held:
        results.put((held.mode, held.devices, os.environ["CUDA_VISIBLE_DEVICES"]))
        barrier.wait(timeout=20)  # both jobs hold their devices at the same moment


def test_local_run_inside_an_allocation_leases_its_share(lock_root, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    barrier, results = FORK.Barrier(2), FORK.Queue()
    jobs = [FORK.Process(target=_hold_from_allocation, args=(barrier, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=30)
        assert job.exitcode == 0
    first, second = results.get(timeout=1), results.get(timeout=1)
    assert (first[0], second[0]) == ("lease", "lease")
    assert sorted(first[1] + second[1]) == ["0", "1", "2", "3"]  # two of four each, disjoint
    assert first[2] == ",".join(first[1]) and second[2] == ",".join(second[1])
    folder = lock_root / f"dspo-gpu-leases-{os.getuid()}" / "slurm-4242"
    assert gpu_lease.resolve_lock_dir() == folder  # device names mean something per allocation
    assert sorted(p.name for p in folder.iterdir()) == [f"gpu{i}.lock" for i in range(4)]
    with lease(0) as none:
        assert (none.mode, os.environ["CUDA_VISIBLE_DEVICES"]) == ("cpu", "")


def test_run_gpu_inside_an_allocation_starts_one_process_per_requested_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    probe = str(tmp_path / "rank_")
    argv = ["--gpus", "1", "--lock-dir", str(tmp_path / "locks"), "--threads", "4"]
    argv += ["--timeout", "10", "--accelerate", "--", sys.executable, "-c", ENV_PROBE, probe]
    assert run_gpu.main(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("rank_*")) == ["rank_single"]  # no DDP launch
    device, threads, world = (tmp_path / "rank_single").read_text().split()
    assert device in {"0", "1", "2", "3"} and (threads, world) == ("4", "-")


# --- shards keep every GPU busy (docs/design.md §15) ------------------------------------------


@pytest.mark.slow
def test_sharded_data_stage_keeps_eight_gpus_leased_at_once(tmp_path):
    # Eight fake devices, --resources gpu=8 and 8 shards: the 8 segment shards of the ci preset
    # run at once, each holding its own device. Counted from the leases' own record (every
    # acquire and release, in the order they happened), not from timing.
    workdir = copy_workflow(tmp_path / "wf")
    record = tmp_path / "leases.jsonl"
    pool = [f"fake{index}" for index in range(8)]
    environment = {
        "CUDA_VISIBLE_DEVICES": ",".join(pool),
        "DSPO_GPU_LEASE_DIR": str(tmp_path / "locks"),
        gpu_lease.RECORD_ENV: str(record),
    }
    snakemake(
        workdir,
        "--configfile",
        "workflow/presets/ci.yaml",
        "--config",
        "shards=8",
        "frameworks=[onestep]",
        "--resources",
        "gpu=8",
        "--until",
        "segment",
        cores=8,
        env=environment,
    )
    events = [json.loads(line) for line in record.read_text().splitlines()]
    acquired = [event for event in events if event["event"] == "acquire"]
    assert len(acquired) == 8  # one lease per segment shard
    assert sorted(device for event in acquired for device in event["devices"]) == sorted(pool)
    assert gpu_lease.most_held_at_once(record) == 8


def test_most_held_at_once_counts_overlapping_leases(tmp_path, monkeypatch):
    record = tmp_path / "leases.jsonl"
    monkeypatch.setenv(gpu_lease.RECORD_ENV, str(record))
    with lease(1, pool="0,1,2", lock_dir=tmp_path), lease(2, pool="0,1,2", lock_dir=tmp_path):
        pass
    with lease(1, pool="0,1,2", lock_dir=tmp_path):
        pass
    assert gpu_lease.most_held_at_once(record) == 3
    assert [json.loads(line)["event"] for line in record.read_text().splitlines()] == [
        "acquire",
        "acquire",
        "release",
        "release",
        "acquire",
        "release",
    ]
