"""What every bench shares: pinned threads, interleaved repeats, summaries, targets, saved-tensor peak.

A bench builds a dict of variants (name -> zero-argument callable), times them with
:func:`interleave` (one warm-up round, then A B C, A B C, ... so that load which comes and
goes hits every variant alike), summarises each variant's seconds with :func:`summarize`
(min, median, IQR and max - min), compares variants with :func:`paired_ratio` (one ratio per
repeat, from the same round, then summarised), states its targets as :class:`Target` and
ends with :func:`finish`, which prints one JSON object and returns the exit status
(non-zero under ``--check`` when a target fails).

Threads are pinned (:func:`pin_threads`, 1 by default): on a shared 2-core machine, several
intra-op threads spin-waiting on one core made a step 20x slower in one run and not the next.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

#: environment variables read by the thread pools of torch/OpenMP, MKL, OpenBLAS, numexpr,
#: Accelerate and OpenCV in processes started after :func:`pin_threads`
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)

_OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def pin_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads here (``torch.set_num_threads``) and in child processes
    (the :data:`THREAD_VARIABLES`, inherited by spawned workers); returns ``threads``.

    Also usable as a process pool's ``initializer`` (a top-level function)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    return threads


def add_arguments(parser: argparse.ArgumentParser, repeats: int = 5) -> None:
    """The options every bench takes: ``--repeats``, ``--warmup``, ``--threads``, ``--check``
    and ``--target NAME=BOUND`` (replaces a target's bound, e.g. to try ``--check``)."""
    group = parser.add_argument_group("timing")
    group.add_argument(
        "--repeats", type=int, default=repeats, help="interleaved rounds timed per variant"
    )
    group.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    group.add_argument(
        "--threads", type=int, default=1, help="intra-op threads, here and in child processes"
    )
    group.add_argument(
        "--check", action="store_true", help="exit 1 when a target fails (default: report only)"
    )
    group.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=BOUND",
        help="replace the bound of target NAME (repeatable)",
    )


def parse_overrides(pairs: Iterable[str]) -> dict[str, float]:
    """``["a=3", "b=0.5"]`` -> ``{"a": 3.0, "b": 0.5}``; a malformed entry raises ValueError."""
    overrides = {}
    for pair in pairs:
        name, sep, bound = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--target expects NAME=BOUND, got {pair!r}")
        overrides[name] = float(bound)
    return overrides


def interleave(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each variant per round: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds, each calling every variant once in the mapping's order (A B A B ...)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for function in variants.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            start = clock()
            function()
            times[name].append(clock() - start)
    return times


def summarize(values: Sequence[float], digits: int = 5) -> dict[str, float]:
    """``n``, ``min``, ``median``, ``max``, ``iqr`` (inclusive quartiles) and ``range``
    (max - min) of ``values``, rounded to ``digits``."""
    if not values:
        raise ValueError("no values to summarize")
    ordered = sorted(values)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "n": len(ordered),
        "min": round(ordered[0], digits),
        "median": round(statistics.median(ordered), digits),
        "max": round(ordered[-1], digits),
        "iqr": round(q3 - q1, digits),
        "range": round(ordered[-1] - ordered[0], digits),
    }


def paired_ratio(
    numerator: Sequence[float], denominator: Sequence[float], scale: float = 1.0
) -> dict[str, float]:
    """Summary of ``numerator[r] / (scale * denominator[r])`` over the rounds ``r``: both
    sides of each ratio come from the same round, so they saw the same load."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} rounds against {len(denominator)}")
    return summarize([a / (scale * b) for a, b in zip(numerator, denominator, strict=True)], 4)


@dataclass(frozen=True)
class Target:
    """``value op bound``, e.g. a median ratio ``>= 3``; ``what`` says it in words."""

    name: str
    value: float
    op: str
    bound: float
    what: str = ""

    def __post_init__(self) -> None:
        if self.op not in _OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}; expected one of {list(_OPERATORS)}")

    @property
    def passed(self) -> bool:
        return bool(_OPERATORS[self.op](self.value, self.bound))

    def as_dict(self) -> dict[str, object]:
        return {
            "value": round(self.value, 4),
            "op": self.op,
            "bound": round(self.bound, 4),
            "passed": self.passed,
            "what": self.what,
        }


def apply_overrides(targets: Sequence[Target], overrides: Mapping[str, float]) -> list[Target]:
    """``targets`` with the bounds named in ``overrides`` replaced; an unknown name raises."""
    names = {target.name for target in targets}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; this bench has {sorted(names)}")
    return [Target(t.name, t.value, t.op, overrides.get(t.name, t.bound), t.what) for t in targets]


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def timing_fields(
    args: argparse.Namespace,
    times: Mapping[str, Sequence[float]],
    order: Iterable[str] | None = None,
) -> dict:
    """The common part of every report: threads, rounds, the order of the calls in a round
    (default: the variants of ``times``) and each variant's summary."""
    return {
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "order": "interleaved: " + " ".join(order or times) + " per round",
        "seconds": {name: summarize(values) for name, values in times.items()},
    }


def finish(result: dict, targets: Sequence[Target], args: argparse.Namespace) -> int:
    """Add the targets (with ``--target`` bounds applied), the verdict and the load average to
    ``result``, print it as one JSON object, and return 1 if ``--check`` and a target failed."""
    targets = apply_overrides(targets, parse_overrides(args.target))
    result["targets"] = {target.name: target.as_dict() for target in targets}
    failed = [target.name for target in targets if not target.passed]
    result["verdict"] = "fail" if failed else "pass"
    result["failed"] = failed
    result["load_average_1min"] = load_average()
    print(json.dumps(result, indent=1))
    return 1 if args.check and failed else 0


# -- memory: tensors saved for backward --------------------------------------------------------


class _Saved:
    """What the pack hook hands autograd; freed (and counted out) when autograd drops it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorPeak:
    """Live and peak bytes of the distinct storages autograd holds for backward.

    Each saved tensor counts its whole storage (a saved view keeps all of it alive), once
    however many saved tensors share it; a storage is counted out when the last saved tensor
    on it is released (after its node's backward, or when the graph is dropped). Storages of
    the ``exclude`` tensors (e.g. the model's parameters, alive anyway) are not counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {self._key(tensor) for tensor in exclude}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._count: dict[tuple, int] = {}
        self._bytes: dict[tuple, int] = {}

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr(), storage.nbytes())

    def pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)
        key = self._key(tensor)
        if key in self.excluded or key[2] == 0:
            return saved
        if self._count.get(key, 0) == 0:
            self._bytes[key] = key[2]
            self.live_bytes += key[2]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._count[key] = self._count.get(key, 0) + 1
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key: tuple) -> None:
        self._count[key] -= 1
        if self._count[key] == 0:
            del self._count[key]
            self.live_bytes -= self._bytes.pop(key)


def saved_tensor_peak(function: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes of the distinct storages saved for backward while ``function()`` runs (a
    forward, or a whole step with its backward), not counting those of ``exclude``."""
    tracker = SavedTensorPeak(exclude)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        function()
    return tracker.peak_bytes
