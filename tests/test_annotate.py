"""The annotation app without a browser: tasks, store, a real server killed with SIGKILL,
export into select, win-rate statistics against hand counts, simulated votes."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.annotate import report_section, tasks, winrates
from pipeline.annotate.cli import SIMULATED_AT, WINRATE_FILES
from pipeline.annotate.cli import main as annotate
from pipeline.annotate.store import Store, db_path
from pipeline.annotate.synthetic import write_synthetic_results
from pipeline.io.tables import SCHEMAS, read_table, write_table
from pipeline.select import (
    AnnotationError,
    finish_pairs,
    human_flagged_prompts,
    read_annotations,
    vote,
)

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = "onestep"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_synthetic_results(tmp_path / "results", FRAMEWORK)


def settings(results: Path, **changes) -> tasks.RoundSettings:
    base = dict(
        round=1,
        seed=0,
        testsets={"synthetic": str(results / "data/test")},
        models=(),
        focus="dspo_fidelity",
        repeat_fraction=0.25,
        gold_count=1,
    )
    return tasks.RoundSettings(**{**base, **changes})


# ---------------------------------------------------------------- tasks


def test_instance_tasks_take_the_k_largest_per_image_in_a_seeded_order(results):
    all_tasks = tasks.instance_tasks(results, FRAMEWORK, top_k=5)
    assert len(all_tasks) == 6  # 2 images x 3 box instances; the remainder is never asked
    two = tasks.instance_tasks(results, FRAMEWORK, top_k=2)
    assert [t.task_id for t in two] == ["train0:2", "train0:1", "train1:2", "train1:1"]
    assert two[0].bbox == (36, 8, 24, 40)
    assert sorted(two[0].candidates) == ["grad1", "grad4", "rank16", "rank64"]
    again = tasks.instance_tasks(results, FRAMEWORK, top_k=2)
    assert [t.candidates for t in again] == [t.candidates for t in two]
    orders = {tasks.instance_tasks(results, FRAMEWORK, 2, seed)[0].candidates for seed in range(6)}
    assert len(orders) > 1  # the seed sets the display order


def test_compare_tasks_are_seeded_complete_and_repeat_with_swapped_sides(results):
    chosen = settings(results)
    alice = tasks.compare_tasks(chosen, results, FRAMEWORK, "alice")
    assert alice == tasks.compare_tasks(chosen, results, FRAMEWORK, "alice")
    regular = [t for t in alice if not t.repeated and not t.gold]
    assert len(regular) == 3 * 3  # dspo against 3 models on 3 images
    assert all("dspo_fidelity" in (t.left, t.right) for t in regular)
    repeats = [t for t in alice if t.repeated]
    assert len(repeats) == math.ceil(0.25 * 9)
    for repeat in repeats:
        first = next(t for t in alice if t.task_id == repeat.task_id.removesuffix(":repeat"))
        assert (repeat.left, repeat.right) == (first.right, first.left)
        assert alice.index(repeat) > alice.index(first)
    gold = [t for t in alice if t.gold]
    assert len(gold) == 1 and {gold[0].left, gold[0].right} == {"hq", "bicubic"}
    bob = tasks.compare_tasks(chosen, results, FRAMEWORK, "bob")
    assert {t.task_id for t in bob} == {t.task_id for t in alice}  # every pair of the round
    assert [t.task_id for t in bob] != [t.task_id for t in alice]  # in its own order
    other_seed = tasks.compare_tasks(settings(results, seed=1), results, FRAMEWORK, "alice")
    assert [(t.task_id, t.left) for t in other_seed] != [(t.task_id, t.left) for t in alice]
    everything = tasks.compare_tasks(
        settings(results, focus="", gold_count=0, repeat_fraction=0), results, FRAMEWORK, "a"
    )
    assert len(everything) == 6 * 3 and not any(t.gold or t.repeated for t in everything)
    two = tasks.compare_tasks(
        settings(results, models=("pretrained", "dspo_fidelity"), gold_count=0),
        results,
        FRAMEWORK,
        "a",
    )
    assert {frozenset((t.left, t.right)) for t in two} == {
        frozenset(("pretrained", "dspo_fidelity"))
    }
    with pytest.raises(tasks.TaskError, match="no SR outputs of models"):
        tasks.compare_tasks(
            settings(results, models=("nope", "dspo_fidelity")), results, FRAMEWORK, "a"
        )


def test_store_is_wal_and_keeps_only_token_hashes(tmp_path):
    store = Store(tmp_path / "a.sqlite")
    token = store.add_annotator("alice")
    assert store.annotator_for(token) == "alice"
    assert store.annotator_for("wrong") is None and store.annotator_for(None) is None
    raw = sqlite3.connect(tmp_path / "a.sqlite")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    dump = "\n".join(raw.iterdump())
    assert token not in dump
    new_token = store.add_annotator("alice")
    assert store.annotator_for(token) is None and store.annotator_for(new_token) == "alice"
    with pytest.raises(ValueError, match="annotator name"):
        store.add_annotator("../evil")


# ---------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m pipeline annotate serve`` as a subprocess on a free local port."""

    def __init__(self, results: Path, *extra: str, port: int | None = None):
        self.results, self.extra = results, extra
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "annotate",
            "serve",
            "--results",
            str(self.results),
            "--framework",
            FRAMEWORK,
            "--port",
            str(self.port),
            "--testset",
            f"synthetic={self.results / 'data/test'}",
            *self.extra,
        ]
        self.log = open(self.results.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=1)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start within 60 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.log.close()

    def request(self, path: str, token: str | None = None, body=None, method=None):
        """(status, parsed JSON or bytes)."""
        headers = {"X-Annotator-Token": token} if token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                status, raw, kind = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, raw, kind = error.code, error.read(), error.headers
        is_json = "json" in kind.get("content-type", "")
        return status, json.loads(raw) if is_json else raw


def raw_exchange(url: str, head: str, parts=(), timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send ``head`` (request line and headers) and each of ``parts`` as written, stop sending,
    and read one response: (status, headers with lower-case names, body). A server that waits
    for more body than was sent runs into the timeout."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n")
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed before reading it all
                break
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(65536) or b"\r\n\r\n"
        top, _, body = raw.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        pairs = [line.split(": ", 1) for line in lines[1:] if ": " in line]
        headers = {name.lower(): value for name, value in pairs}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536) or b"x" * int(headers["content-length"])
        return int(lines[0].split()[1]), headers, body


def raw_get(url: str, path: str, token: str) -> int:
    """Status of a GET whose path is sent exactly as written (no client normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Annotator-Token: {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        return int(sock.recv(64).split()[1])


@pytest.mark.slow
def test_sigkilled_server_loses_no_acknowledged_vote_and_resumes(results):
    token = Store(db_path(results, FRAMEWORK)).add_annotator("alice")
    server = Server(results, "--gold", "1").start()
    try:
        assert server.request("/api/me")[0] == 401
        assert server.request("/api/me", "not-a-token")[0] == 401
        assert server.request("/api/images/instance/0/lq")[0] == 401
        for path in (
            "/api/images/instance/0/..%2F..%2Fetc%2Fpasswd",
            "/api/images/instance/0/../../../../etc/passwd",
            "/api/images/instance/0//etc/passwd",
            "/api/images/instance/99/lq",
            "/api/images/instance/0/7",
            "/api/images/compare/0/hq",
        ):
            assert raw_get(server.url, path, token) == 404, path
        status, image = server.request("/api/images/instance/0/0", token)
        assert status == 200 and image[:8] == b"\x89PNG\r\n\x1a\n"
        assert server.request("/api/instances/0", token, method="GET")[0] == 405  # POST only
        long_text = {"best": 0, "worst": 1, "description": "x" * 501}
        assert server.request("/api/instances/0", token, long_text)[0] == 422
        assert server.request("/api/instances/0", token, {"best": 1, "worst": 1})[0] == 422
        assert server.request("/api/instances/0", token, b"x" * 9000)[0] == 413
        acknowledged = []
        for n, answer in enumerate(
            (
                {"best": 0, "worst": 1, "flagged": [2], "description": "fake  text"},
                {"best": 2, "worst": 3},
                {"skip": True},
            )
        ):
            assert server.request("/api/instances/next", token)[1]["task"]["n"] == n
            status, reply = server.request(f"/api/instances/{n}", token, answer)
            assert status == 200 and reply["stored"]
            acknowledged.append(n)
        for answer in ("left", "tie"):
            n = server.request("/api/compare/next", token)[1]["task"]["n"]
            assert server.request(f"/api/compare/{n}", token, {"answer": answer})[0] == 200
        assert server.request("/api/compare/0", token, {"answer": "maybe"})[0] == 422
        server.kill()  # right after the last acknowledged vote
        restarted = Server(results, "--gold", "1", port=server.port).start()
        try:
            status, reply = restarted.request("/api/instances/next", token)
            assert reply["task"]["n"] == 3 and reply["progress"] == {"done": 3, "total": 6}
            assert restarted.request("/api/compare/next", token)[1]["progress"]["done"] == 2
        finally:
            restarted.kill()
    finally:
        if server.process.poll() is None:
            server.kill()
    assert annotate(["export", "--results", str(results), "--framework", FRAMEWORK]) == 0
    out = results / "annotations" / FRAMEWORK
    annotations = read_table(out / "annotations.parquet", "annotations")
    assert len(annotations) == 2  # the skip is not an annotation
    first = tasks.instance_tasks(results, FRAMEWORK)[0]
    row = annotations[annotations["instance_id"] == first.instance_id].iloc[0]
    assert (row["best"], row["worst"], row["flagged"]) == first.candidates[:3]
    assert row["description"] == "fake text"  # whitespace runs collapsed
    votes = read_table(out / "votes.parquet", "votes")
    assert sorted(votes["answer"]) == ["left", "tie"] and not votes["simulated"].any()
    assert votes["shown_at"].notna().all() and (votes["answered_at"] >= votes["shown_at"]).all()


@pytest.mark.slow
def test_server_refuses_big_bodies_before_reading_them_and_names_bad_utf8(results):
    token = Store(db_path(results, FRAMEWORK)).add_annotator("alice")
    server = Server(results).start()
    head = (
        f"POST /api/instances/0 HTTP/1.1\r\nHost: x\r\nX-Annotator-Token: {token}\r\n"
        "Content-Type: application/json\r\n"
    )
    try:
        # 400 MiB announced, nothing sent: refused by Content-Length, the body never read
        started = time.monotonic()
        status, _, body = raw_exchange(server.url, head + f"Content-Length: {400 << 20}\r\n")
        assert status == 413 and b"8192" in body and time.monotonic() - started < 5
        # chunked: 12 chunks of 1 KiB and no last chunk; 413 once 8 KiB are passed
        chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
        status, _, _ = raw_exchange(
            server.url, head + "Transfer-Encoding: chunked\r\n", [chunk] * 12
        )
        assert status == 413
        # invalid UTF-8 in the JSON: 400 naming it (it was a 500 with a traceback)
        status, reply = server.request("/api/instances/0", token, b'{"description": "\xff"}')
        assert status == 400 and "UTF-8" in reply["error"], reply
        # a small chunked body is still read and answered
        small = json.dumps({"skip": True}).encode()
        parts = [f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"]
        status, _, body = raw_exchange(server.url, head + "Transfer-Encoding: chunked\r\n", parts)
        assert status == 200 and json.loads(body)["stored"]
    finally:
        server.kill()


SECURITY_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff"}


@pytest.mark.slow
def test_every_response_forbids_framing_and_sniffing(results):
    token = Store(db_path(results, FRAMEWORK)).add_annotator("alice")
    server = Server(results).start()
    try:
        cases = [
            ("GET", "/", None, 200),
            ("GET", "/static/app.js", None, 200),
            ("GET", "/static/nope.js", None, 404),
            ("GET", "/api/me", None, 401),
            ("GET", "/api/me", token, 200),
            ("GET", "/api/images/instance/0/lq", token, 200),
            ("GET", "/api/images/instance/0/9", token, 404),
            ("GET", "/api/instances/0", token, 405),
        ]
        for method, path, who, expected in cases:
            auth = f"X-Annotator-Token: {who}\r\n" if who else ""
            status, headers, _ = raw_exchange(
                server.url, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n"
            )
            assert status == expected, path
            assert {k: headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, path
            policy = [rule.strip() for rule in headers["content-security-policy"].split(";")]
            assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy, path
            assert not any("unsafe" in rule for rule in policy), policy
    finally:
        server.kill()
    # the policy allows no inline code: the page has none (no <style>, style=, on...=, inline
    # <script>)
    page = (ROOT / "pipeline/annotate/static/index.html").read_text()
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", page)
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/app.js">']


def test_vote_database_and_its_wal_files_are_private(tmp_path):
    old_umask = os.umask(0o022)
    try:
        store = Store(tmp_path / "new.sqlite")
        store.add_annotator("alice")
        files = [tmp_path / name for name in ("new.sqlite", "new.sqlite-wal", "new.sqlite-shm")]
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {
            f.name: "0o600" for f in files
        }
        store.close()
        old = tmp_path / "old.sqlite"  # made by an earlier version, readable by everyone
        sqlite3.connect(old).close()
        old.chmod(0o644)
        Store(old).add_annotator("bob")
        assert oct(old.stat().st_mode & 0o777) == "0o600"
    finally:
        os.umask(old_umask)


def serve_argv(results: Path, host: str, port: int, *extra: str) -> list[str]:
    return [
        "serve",
        "--results",
        str(results),
        "--framework",
        FRAMEWORK,
        "--no-compare",
        "--host",
        host,
        "--port",
        str(port),
        *extra,
    ]


def test_serving_beyond_loopback_needs_allow_remote_and_warns(results, monkeypatch, capsys):
    import threading

    import uvicorn

    from pipeline.annotate import cli

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert cli.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org", ""):
        assert not cli.is_loopback(host), host
    # refused before anything binds (uvicorn.run is replaced: no test binds 0.0.0.0)
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    with pytest.raises(SystemExit, match="--allow-remote"):
        annotate(serve_argv(results, "0.0.0.0", free_port()))
    assert ran == []
    monkeypatch.undo()
    # with the flag it serves and warns: bound for real on a second loopback address, which
    # the test has the check treat as remote
    monkeypatch.setattr(cli, "is_loopback", lambda host: host == "127.0.0.1")
    servers = []
    startup = uvicorn.Server.startup

    async def recorded(self, *args, **kwargs):
        servers.append(self)
        return await startup(self, *args, **kwargs)

    monkeypatch.setattr(uvicorn.Server, "startup", recorded)
    port = free_port()
    with pytest.raises(SystemExit, match="--allow-remote"):
        annotate(serve_argv(results, "127.0.0.2", port))
    argv = serve_argv(results, "127.0.0.2", port, "--allow-remote")
    thread = threading.Thread(target=annotate, args=(argv,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.2:{port}/", timeout=1) as response:
                    assert response.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.1)
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()
    assert "warning: listening on 127.0.0.2" in capsys.readouterr().err


def test_a_round_cannot_change_its_settings(results):
    store = Store(db_path(results, FRAMEWORK))
    store.round_settings(1, settings(results, repeat_fraction=0.5).to_json())
    with pytest.raises(SystemExit, match="round 1 was started with settings"):
        annotate(
            [
                "serve",
                "--results",
                str(results),
                "--framework",
                FRAMEWORK,
                "--testset",
                f"synthetic={results / 'data/test'}",
                "--focus",
                "dspo_fidelity",
                "--repeat-fraction",
                "0.25",
                "--gold",
                "1",
                "--port",
                str(free_port()),
            ]
        )


# ---------------------------------------------------------------- export into select


def test_descriptions_become_negative_prompts_of_human_pairs(results, tmp_path):
    rows = [
        ("alice", "train0", 2, "rank16", "grad4", "grad4", "melted face"),
        ("bob", "train0", 2, "rank16", "grad4", "", ""),
        ("alice", "train1", 1, "rank64", "grad1", "", "  "),
    ]
    path = tmp_path / "annotations.parquet"
    write_table(
        pd.DataFrame(rows, columns=[*SCHEMAS["annotations"].names, "description"]),
        path,
        "annotations",
    )
    annotations = read_annotations(path)
    prompts = human_flagged_prompts(annotations, None)
    assert prompts == {"train0": "melted face"}  # blank descriptions are dropped
    instances = read_table(results / "masks" / FRAMEWORK / "instances.parquet", "instances")
    pairs = finish_pairs(vote(annotations), instances, prompts, "human")
    assert pairs.set_index("image_id")["negative_prompt"].to_dict() == {
        "train0": "melted face",
        "train1": "",
    }
    # a file without the column (written before it existed) reads with empty descriptions
    old = tmp_path / "old.csv"
    old.write_text("annotator,image_id,instance_id,best,worst,flagged\na,train0,2,rank16,grad4,\n")
    assert read_annotations(old)["description"].tolist() == [""]


def test_annotation_csv_names_every_missing_column_and_the_file(tmp_path):
    path = tmp_path / "no_ids.csv"
    path.write_text("annotator,image_id,worst,flagged\na,train0,grad4,\n")
    with pytest.raises(AnnotationError) as error:
        read_annotations(path)
    message = str(error.value)
    assert str(path) in message and "must be integers" not in message
    assert "missing columns" in message and "'instance_id'" in message and "'best'" in message
    assert "'description'" not in message  # optional: older files lack it
    bad = tmp_path / "bad_ids.csv"
    bad.write_text("annotator,image_id,instance_id,best,worst,flagged\na,train0,two,r,g,\n")
    with pytest.raises(AnnotationError, match=r"bad_ids\.csv: instance_id must be integers"):
        read_annotations(bad)


# ---------------------------------------------------------------- statistics


def votes_frame(rows) -> pd.DataFrame:
    stamp = pd.Timestamp("2026-01-01", tz="UTC")
    full = [(*row, False, stamp, stamp) for row in rows]
    return pd.DataFrame(full, columns=SCHEMAS["votes"].names)


def hand_wilson(score: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = score / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_win_rates_count_ties_half_and_match_hand_computed_intervals():
    answers = ["left"] * 6 + ["right"] * 2 + ["tie", "both_bad"]
    rows = [
        (("alice", "bob")[i % 2], 1, "s", f"i{i}", "dspo_x", "pretrained", a, False, False)
        for i, a in enumerate(answers)
    ]
    rows += [("alice", 1, "s", "i0", "pretrained", "dspo_x", "right", True, False)]  # a repeat
    rows += [("alice", 1, "s", "g", "hq", "bicubic", "right", False, True)]  # gold, missed
    votes = votes_frame(rows)
    rates = winrates.win_rates(votes, resamples=500)
    row = rates.iloc[0]
    assert (row["model"], row["opponent"]) == ("dspo_x", "pretrained")
    assert (row["wins"], row["losses"], row["ties"], row["n"]) == (6, 2, 2, 10)
    assert row["win_rate"] == pytest.approx(0.7)
    assert (row["wilson_low"], row["wilson_high"]) == pytest.approx(hand_wilson(7.0, 10))
    assert row["clusters"] == 2 and row["boot_low"] <= row["boot_high"]
    flipped = winrates.win_rates(votes, focus="pretrained", resamples=100).iloc[0]
    assert flipped["win_rate"] == pytest.approx(0.3)
    single = winrates.win_rates(votes[votes["annotator"] == "alice"], resamples=100).iloc[0]
    assert np.isnan(single["boot_low"])  # one (annotator, round) cluster: no bootstrap
    consistency = winrates.consistency(votes).set_index("annotator")
    assert consistency.loc["alice", "repeats"] == 1
    assert consistency.loc["alice", "consistency"] == 1.0  # i0: dspo_x both times
    gold = winrates.gold_accuracy(votes).set_index("annotator")
    assert gold.loc["*", "gold"] == 1 and gold.loc["*", "accuracy"] == 0.0
    bt = winrates.bradley_terry(votes, resamples=20).set_index("model")
    assert bt.loc["pretrained", "score"] == 0.0 and bt.loc["dspo_x", "score"] > 0
    # hand count of BT's equation: log(wins + ties/2) - log(losses + ties/2), shrunk by the ridge
    assert bt.loc["dspo_x", "score"] == pytest.approx(math.log(7 / 3), rel=0.05)


def test_fleiss_kappa_is_one_for_full_agreement_and_lower_otherwise():
    pairs = [("i0", "a", "b"), ("i1", "a", "b"), ("i2", "a", "b"), ("i3", "a", "b")]
    labels = ["left", "right", "tie", "left"]
    same = [
        (who, 1, "s", i, a, b, ans, False, False)
        for who in ("p", "q", "r")
        for (i, a, b), ans in zip(pairs, labels, strict=True)
    ]
    assert winrates.agreement(votes_frame(same))["fleiss_kappa"].iloc[0] == pytest.approx(1.0)
    # q sees the sides swapped but means the same model: still full agreement
    swapped = [
        (w, n, s, i, b, a, {"left": "right", "right": "left"}.get(c, c), *rest)
        if w == "q"
        else (w, n, s, i, a, b, c, *rest)
        for w, n, s, i, a, b, c, *rest in same
    ]
    assert winrates.agreement(votes_frame(swapped))["fleiss_kappa"].iloc[0] == pytest.approx(1.0)
    noisy = [row if row[0] != "r" else (*row[:6], "right", *row[7:]) for row in same]
    assert winrates.agreement(votes_frame(noisy))["fleiss_kappa"].iloc[0] < 1.0


def test_simulated_votes_follow_the_metric_and_are_labelled(results, tmp_path):
    base = [
        "simulate",
        "--results",
        str(results),
        "--framework",
        FRAMEWORK,
        "--testset",
        f"synthetic={results / 'data/test'}",
        "--annotators",
        "2",
        "--rounds",
        "3",
        "--gold",
        "1",
    ]
    clean, noisy = tmp_path / "clean.parquet", tmp_path / "noisy.parquet"
    assert annotate([*base, "--noise", "0", "--out", str(clean)]) == 0
    assert annotate([*base, "--noise", "1", "--out", str(noisy)]) == 0
    votes = read_table(clean, "votes")
    assert votes["simulated"].all() and set(votes["round"]) == {1, 2, 3}
    # the synthetic SR noise falls with the model's index: dspo_fidelity beats the first two
    rates = winrates.win_rates(votes, resamples=100).set_index("opponent")
    assert rates.loc["pretrained", "win_rate"] == 1.0 and rates.loc["sft_fidelity", "win_rate"] == 0
    assert winrates.gold_accuracy(votes).set_index("annotator").loc["*", "accuracy"] == 1.0
    assert winrates.consistency(votes).set_index("annotator").loc["*", "consistency"] == 1.0
    random_votes = read_table(noisy, "votes")
    assert (random_votes["answer"] != votes["answer"]).any()
    out = tmp_path / "report"
    assert (
        annotate(
            [
                "winrate",
                "--votes",
                str(clean),
                "--out-dir",
                str(out),
                "--bootstrap",
                "200",
                "--bt-bootstrap",
                "20",
            ]
        )
        == 0
    )
    assert "SIMULATED" in (out / "winrates.md").read_text()
    assert (out / "winrates.png").stat().st_size > 0
    table = pd.read_csv(out / "winrates.csv")
    assert table["simulated"].all() and (table["boot_low"] <= table["win_rate"]).all()


# ---------------------------------------------------------------- the workflow's rules


def simulate_and_winrate(results: Path, folder: Path, *extra: str) -> dict[str, bytes]:
    """What annotate_simulate and annotate_winrate write (their CLI calls), by file name."""
    votes, out = folder / "votes_simulated.parquet", folder / "winrates"
    assert (
        annotate(
            [
                "simulate",
                "--results",
                str(results),
                "--framework",
                FRAMEWORK,
                "--testset",
                f"synthetic={results / 'data/test'}",
                "--seed",
                "0",
                "--out",
                str(votes),
                *extra,
            ]
        )
        == 0
    )
    assert (
        annotate(
            [
                "winrate",
                "--votes",
                str(votes),
                "--out-dir",
                str(out),
                "--seed",
                "0",
                "--bootstrap",
                "200",
                "--bt-bootstrap",
                "20",
            ]
        )
        == 0
    )
    files = {"votes": votes.read_bytes()}
    files.update((name, (out / name).read_bytes()) for name in WINRATE_FILES)
    return files


def test_winrate_rule_outputs_are_deterministic_and_follow_the_settings(results, tmp_path):
    first = simulate_and_winrate(results, tmp_path / "run")
    again = simulate_and_winrate(results, tmp_path / "run")  # a rerun over the same paths
    assert again == first  # byte-identical votes, tables, markdown, plot and summary
    votes = read_table(tmp_path / "run/votes_simulated.parquet", "votes")
    assert (votes["shown_at"] == SIMULATED_AT).all()
    assert (votes["answered_at"] == SIMULATED_AT).all()
    summary = json.loads(first["summary.json"])
    assert summary["simulated"] and summary["simulation"]["noise"] == 0.2
    for extra in (("--noise", "0.6"), ("--annotators", "2")):
        changed = simulate_and_winrate(results, tmp_path / "run", *extra)
        assert changed["votes"] != first["votes"], extra
        assert changed["winrates.csv"] != first["winrates.csv"], extra
    fewer = read_table(tmp_path / "run/votes_simulated.parquet", "votes")
    assert set(fewer["annotator"]) == {"simulated-1", "simulated-2"}


def test_report_section_shows_the_plot_and_table_and_says_simulated(results, tmp_path):
    simulate_and_winrate(results, tmp_path / "run")
    report_md = tmp_path / "eval/report.md"
    report_md.parent.mkdir()
    report_md.write_text("# Report\n\nearlier sections\n")
    assert report_section.append_to_report(report_md, tmp_path / "run/winrates") == [
        report_section.PLOT_NAME
    ]
    text = report_md.read_text()
    assert text.startswith("# Report\n\nearlier sections\n")
    assert "## Human evaluation (Fig. 3) — SIMULATED" in text and "**SIMULATED annotators" in text
    assert f"]({report_section.PLOT_NAME})" in text
    assert (report_md.parent / report_section.PLOT_NAME).read_bytes() == (
        tmp_path / "run/winrates/winrates.png"
    ).read_bytes()
    rates = pd.read_csv(tmp_path / "run/winrates/winrates.csv")
    assert len(rates) == 3 and "| synthetic | dspo_fidelity | pretrained |" in text
    # real votes: no SIMULATED anywhere
    human = votes_frame(
        [
            (who, 1, "s", f"i{i}", "dspo_x", "pretrained", answer, False, False)
            for who in ("ann", "bob")
            for i, answer in enumerate(["left", "right", "tie", "left"])
        ]
    )
    write_table(human, tmp_path / "human.parquet", "votes")
    assert (
        annotate(
            [
                "winrate",
                "--votes",
                str(tmp_path / "human.parquet"),
                "--out-dir",
                str(tmp_path / "human"),
                "--bootstrap",
                "100",
                "--bt-bootstrap",
                "10",
            ]
        )
        == 0
    )
    section = report_section.section(tmp_path / "human")
    assert "SIMULATED" not in section and "Votes of 2 annotators" in section


def test_browser_tests_fail_without_chromium_and_skip_only_when_told(monkeypatch):
    from tests import test_annotate_browser as browser

    monkeypatch.setattr(browser, "CHROMIUM", Path("/nonexistent/chromium"))
    reason = browser.missing_browser()
    assert reason and "apt-get install -y chromium" in reason
    assert f"{browser.SKIP_VARIABLE}=1" in reason
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests/test_annotate_browser.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, browser.SKIP_VARIABLE: "1"},
    )
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout[-2000:]
    assert f"{browser.SKIP_VARIABLE}=1 skips the browser tests" in result.stdout


def test_preflight_names_missing_votes_and_an_unevaluated_simulation_metric(tmp_path):
    from pipeline import preflight

    config = {
        "human_eval": {"votes": {"onestep": "nope.parquet"}, "simulate": {"metric": "x"}},
        "evaluate": {"metrics": ["psnr"]},
    }
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check(config, tmp_path)
    assert "human_eval.votes.onestep" in str(error.value)
    assert "human_eval.simulate.metric" in str(error.value)
