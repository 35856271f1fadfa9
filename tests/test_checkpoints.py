"""pipeline.checkpoints: content hashes, fingerprints, stale folders, save/load, checked steps,
and pretraining's separate clipping of the generator and the VSD regulariser."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoints as C
from pipeline.distributed import make_accelerator
from pipeline.pretrain import PairSource, build_model, parameter_groups, stage_config
from tests.onestep_helpers import TINY, TINY_MODEL, make_pairs


def _fingerprint(tmp_path: Path, **changes) -> C.Fingerprint:
    table = tmp_path / "table.parquet"
    if not table.exists():
        table.write_bytes(b"rows")
    arguments = {
        "settings": {"lr": 1e-3, "model": {"lambda_l2": 1.0}},
        "seed": 0,
        "inputs": {"pairs": table},
        "weights": {"unet.safetensors": "ab"},
        "processes": 1,
        "device": "cpu",
    }
    return C.run_fingerprint("pretrain", **{**arguments, **changes})


def test_content_hash_streams_files_and_covers_a_folders_files(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CHUNK", 1000)  # many chunks
    payload = np.random.default_rng(0).bytes(25_000)
    (tmp_path / "big.bin").write_bytes(payload)
    assert C.content_hash(tmp_path / "big.bin") == hashlib.sha256(payload).hexdigest()
    store = tmp_path / "masks.zarr"
    (store / "img_a").mkdir(parents=True)
    (store / "img_a" / "0.0").write_bytes(b"labels")
    before = C.content_hash(store)
    (store / "img_a" / "0.0").write_bytes(b"labelz")  # same size, same path, other bytes
    assert C.content_hash(store) != before
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        C.content_hash(tmp_path / "nope.parquet")


def test_fingerprint_names_every_field_that_decides_the_run(tmp_path):
    base = _fingerprint(tmp_path)
    assert set(base.fields) == {"stage", "settings", "seed", "code", "inputs", "weights", "layout"}
    assert len(base.fields["code"]) == 16 and json.loads(json.dumps(base.fields)) == base.fields
    assert _fingerprint(tmp_path).hash == base.hash
    changed = {
        "settings.lr": {"settings": {"lr": 2e-3, "model": {"lambda_l2": 1.0}}},
        "settings.model.lambda_l2": {"settings": {"lr": 1e-3, "model": {"lambda_l2": 2.0}}},
        "seed": {"seed": 1},
        "weights.unet.safetensors": {"weights": {"unet.safetensors": "cd"}},
        "layout.processes": {"processes": 2},
    }
    for field, change in changed.items():
        other = _fingerprint(tmp_path, **change)
        assert other.hash != base.hash
        assert C.differing_fields(base.fields, other.fields) == [field]
    (tmp_path / "table.parquet").write_bytes(b"swap")  # same path, other content
    assert C.differing_fields(base.fields, _fingerprint(tmp_path).fields) == ["inputs.pairs"]


def test_default_location_is_results_checkpoints_stage():
    assert C.default_location("pretrain", Path("results/models/onestep/base")) == Path(
        "results/checkpoints/pretrain/onestep/base"
    )
    assert C.default_location("train", Path("/x/results/aligned/onestep/dspo/united")) == Path(
        "/x/results/checkpoints/train/onestep/dspo/united"
    )
    assert C.default_location("train", Path("/tmp/run/out")) == Path(
        "/tmp/run/checkpoints/train/out"
    )


def test_save_load_restores_weights_optimizer_rng_and_prunes(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    named = dict(model.named_parameters())
    fingerprint = _fingerprint(tmp_path)
    folder = tmp_path / "ckpt"
    for step in (1, 2, 3):
        C.save(folder, step, named, optimizer, [{"step": step}], fingerprint, keep=2)
    assert [p.name for p in C.complete_checkpoints(folder)] == ["step-00000002", "step-00000003"]
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*/*.pt"))
    expected = (torch.rand(3), np.random.rand(), random.random())  # draws after the save
    copy = torch.nn.Linear(3, 2)
    copy_optimizer = torch.optim.AdamW(copy.parameters(), lr=1e-2)
    step, log = C.load(
        folder / "step-00000003", dict(copy.named_parameters()), copy_optimizer, fingerprint
    )
    assert step == 3 and log == [{"step": 3}]
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters(), strict=True)
    )
    state = copy_optimizer.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


def test_a_folder_of_another_run_is_moved_aside_with_one_log_line(tmp_path, caplog):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    old = _fingerprint(tmp_path)
    folder = tmp_path / "ckpt"
    C.save(folder, 2, dict(model.named_parameters()), optimizer, [], old)
    assert C.resume_point(folder, old) == folder / "step-00000002"
    new = _fingerprint(tmp_path, seed=5)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        assert C.resume_point(folder, new) is None
    stale = tmp_path / f"ckpt.stale-{old.short}"
    assert not folder.exists() and (stale / "step-00000002" / "state.json").is_file()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.checkpoints"]
    assert len(lines) == 1 and "differing: seed" in lines[0] and str(stale) in lines[0]
    with pytest.raises(ValueError, match="another run"):
        C.load(stale / "step-00000002", dict(model.named_parameters()), optimizer, new)


def test_clip_gradients_without_a_limit_reports_the_norm_and_leaves_gradients():
    accelerator = make_accelerator("cpu")
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    norms = C.clip_gradients(accelerator, [[a], [b]], 0.0)
    assert [float(n) for n in norms] == [5.0, 12.0] and C.total_norm(norms) == 13.0
    assert torch.equal(a.grad, torch.tensor([3.0, 4.0]))
    with pytest.raises(FloatingPointError, match="bad at step 7"):
        C.check_finite(accelerator, float("nan"), "bad at step 7")
    b.data[0] = float("inf")
    with pytest.raises(FloatingPointError, match="weights"):
        C.check_finite(accelerator, C.weights_flag([a, b]), "weights")


def test_pretraining_clips_generator_and_regulariser_separately(tmp_path):
    # OSEDiff clips its two optimizers (generator, VSD regulariser) each to max_grad_norm
    data = make_pairs(tmp_path / "data")
    config = stage_config(
        {
            "batch_size": 2,
            "crop_size": 32,
            "device": "cpu",
            "tiny": TINY,
            "model": {**TINY_MODEL, "lambda_vsd": 1.0},
        },
        "onestep",
    )
    model = build_model("onestep", config, "base", seed=0)
    params = model.pretrain_parameters()
    groups = parameter_groups(model, params)
    regulariser = {id(p) for p in model.regulariser.parameters()}
    assert len(groups) == 2 and len(groups[0]) + len(groups[1]) == len(params)
    assert all(id(p) not in regulariser for p in groups[0])
    assert all(id(p) in regulariser for p in groups[1])
    lq, hq = PairSource(data).batch(0, "base", 0, 2, 32, hflip=False)
    loss, _ = model.pretrain_loss(lq, hq, ["", ""], torch.Generator().manual_seed(0))
    loss.backward()
    grads = [[p.grad.clone() for p in group] for group in groups]

    def group_norms():
        return [float(C._grad_norm(group)) for group in groups]

    unclipped = group_norms()
    assert min(unclipped) > 0
    limit = 0.5 * min(unclipped)  # both groups are over the limit
    C.clip_gradients(make_accelerator("cpu"), groups, limit)
    separate = group_norms()
    assert all(n <= limit * (1 + 1e-5) for n in separate)
    for group, saved in zip(groups, grads, strict=True):  # back to the raw gradients
        for p, g in zip(group, saved, strict=True):
            p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, limit)  # the old joint clipping
    joint = group_norms()
    assert joint != pytest.approx(separate, rel=1e-3)  # jointly, the smaller group shrinks more
    assert min(joint) < 0.999 * limit


def test_without_the_regulariser_there_is_one_group():
    config = stage_config({"device": "cpu", "tiny": TINY, "model": TINY_MODEL}, "onestep")
    model = build_model("onestep", config, "base", seed=0)
    params = model.pretrain_parameters()
    assert parameter_groups(model, params) == [params]
