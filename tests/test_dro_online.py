"""pipeline.training.dro_online: Diffusion-DRO's online negatives (method dro_online).

The loss is the hinge of error maps computed here by hand; the buffer holds the snapshot's own
trajectories; the snapshot syncs at its period; positives, every dro_* key and the one-step
definition change what trains; a killed run resumes bit for bit (buffer and snapshot in the
checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import checkpoints, contracts, settings
from pipeline import policy as online
from pipeline import train as T
from pipeline.io.images import read_rgb, signed_tensor, write_png
from pipeline.io.masks import write_label_maps
from pipeline.io.tables import read_metadata, read_table, write_table
from pipeline.models import build_tiny_model, load_model
from pipeline.seeding import torch_generator
from pipeline.training import dro_online, session
from pipeline.training.config import TrainConfig
from tests.data_helpers import write_data_table
from tests.resume_helpers import assert_resume_kept_the_metadata

SETTINGS = ("s1", "s2", "s3")
IMAGES = ("img_a", "img_b", "img_c")
SIZE = 16
SEED = 5
BASE = {
    "max_steps": 2,
    "batch_size": 2,
    "checkpoint_every": 2,
    "learning_rate": 1e-3,
    "dro_buffer_size": 2,
    "dro_sampler_steps": 2,
    "dro_sampler_batch_size": 2,
    "device": "cpu",
}


def tiny(framework: str = "multistep"):
    if framework == "onestep":
        return build_tiny_model("onestep", seed=0)
    return build_tiny_model("multistep", block_out_channels=(8, 16), seed=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Three LQs (4 px, x4) with their HQ (16 px), three candidates each, a 3-instance
    partition per image with winners and losers that vary by instance, and a prompts table."""
    root = tmp_path_factory.mktemp("dro")
    rng = np.random.default_rng(0)
    data = root / "data" / "train"
    candidates, pairs, label_maps, prompts = [], [], {}, []
    for n, image_id in enumerate(IMAGES):
        write_png(data / "lq" / f"{image_id}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        write_png(
            data / "hq" / f"{image_id}.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        )
        for setting in SETTINGS:
            path = Path(setting) / f"{image_id}.png"
            write_png(
                root / "candidates" / path, rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            )
            candidates.append(
                {
                    "image_id": image_id,
                    "setting": setting,
                    "variant": "base",
                    "steps": 20,
                    "cfg": 4.5,
                    "seed": 0,
                    "negative_prompt": "",
                    "path": str(path),
                }
            )
        labels = np.full((SIZE, SIZE), 3, dtype=np.uint16)
        labels[: 6 + 2 * n, :8] = 1
        labels[12:, 4:] = 2
        label_maps[image_id] = labels
        wins = [(0, 1), (2, 0), (1, 2)] if n % 2 == 0 else [(1, 2), (1, 0), (0, 2)]
        for instance_id, (win, lose) in zip((1, 2, 3), wins, strict=True):
            pairs.append(
                {
                    "image_id": image_id,
                    "instance_id": instance_id,
                    "weight": float((labels == instance_id).mean()),
                    "winner": SETTINGS[win],
                    "loser": SETTINGS[lose],
                    "margin": 0.5,
                    "negative_prompt": "",
                    "source": "iqa",
                }
            )
        pairs.append(
            {
                "image_id": image_id,
                "instance_id": -1,
                "weight": 1.0,
                "winner": SETTINGS[n % 3],
                "loser": SETTINGS[(n + 1) % 3],
                "margin": 1.0,
                "negative_prompt": "",
                "source": "iqa",
            }
        )
        prompts.append((image_id, f"a photo of thing {n}", "blurry", "fixed", "none"))
    write_table(pd.DataFrame(candidates), root / "candidates" / "candidates.parquet", "candidates")
    write_table(pd.DataFrame(pairs), root / "pairs.parquet", "preference_pairs")
    image_pairs = pd.DataFrame(pairs)
    write_table(
        image_pairs[image_pairs["instance_id"] == -1],
        root / "image_pairs.parquet",
        "preference_pairs",
    )
    write_label_maps(root / "masks.zarr", label_maps, {"backend": "test"})
    write_data_table(data, IMAGES)
    columns = ["image_id", "prompt", "negative_prompt", "source", "model"]
    write_table(
        pd.DataFrame(prompts, columns=columns),
        root / "prompts.parquet",
        "prompts",
        {"source": "fixed", "model": "none"},
    )
    return {
        "root": root,
        "objective": "fidelity",
        "pairs_path": root / "pairs.parquet",
        "candidates_path": root / "candidates" / "candidates.parquet",
        "data_dir": data,
        "masks_path": root / "masks.zarr",
        "model_dir": "in-memory tiny model",
        "prompts_path": root / "prompts.parquet",
    }


def arguments(inputs: dict, framework: str = "multistep", **changes) -> dict:
    base = {k: v for k, v in inputs.items() if k != "root"}
    return {**base, "framework": framework, "method": "dro_online", "seed": SEED, **changes}


def run(inputs, out: Path, config: dict, framework: str = "multistep", **changes) -> Path:
    """The stage through pipeline.train.train with the offline methods' arguments."""
    return T.train(
        **arguments(inputs, framework, **changes), out_dir=out, config=config, model=tiny(framework)
    )


def prepared(inputs, tmp_path: Path, config: dict, framework: str = "multistep"):
    """The trainer as the session hands it its first step."""
    job = session.Job(
        **arguments(inputs, framework),
        out_dir=tmp_path / "out",
        config=config,
        checkpoint_dir=tmp_path / "checkpoints",
        model=tiny(framework),
    )
    run, _ = session.start(job)
    return run.trainer


def trained(folder: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_model(folder).named_parameters()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_dro_online_is_a_method_of_its_own_loop_beside_the_offline_dro():
    method = contracts.method("dro_online")
    assert (method.loss, method.pair_level, method.loop, method.needs_reference) == (
        "dro",
        "instance",
        "dro_online",
        True,
    )
    assert contracts.method("dro").loop == "offline"  # the offline-pair dro is unchanged
    assert contracts.method_module("dro_online") == "pipeline.training.dro_online"
    assert "dro_online (" in settings.schema_node("methods")["description"]
    defaults = settings.defaults("train")  # DiffusionDRO's click defaults
    assert (
        defaults["dro_buffer_size"],
        defaults["dro_refill_every"],
        defaults["dro_sync_every"],
        defaults["dro_sampler_steps"],
        defaults["dro_sampler_cfg"],
        defaults["dro_sampler_batch_size"],
        defaults["dro_refill_batches"],
        defaults["dro_perturb_timesteps"],
        defaults["dro_positives"],
    ) == (4, 1, None, 20, 1.0, 4, 1, True, "winners")
    assert dro_online.sync_period(TrainConfig(gradient_accumulation_steps=16)) == 16  # M = 1


def _area_pool(masks: torch.Tensor, factor: int) -> torch.Tensor:
    m, h, w = masks.shape
    return masks.float().reshape(m, h // factor, factor, w // factor, factor).mean(dim=(2, 4))


def _hand_maps(model, example) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' ``[D, h, w]`` and the negative's ``[h, w]`` squared ε errors, from the
    model's parts: encode, add the example's noise at its t, predict with its prompt."""
    c, lq = example.conditions, example.expert.lq
    embeddings = model._text([c.prompt])

    def error(latent, target):
        prediction = model.predict_noise(latent[None], c.timestep, lq[None], embeddings)[0]
        return (prediction - target).pow(2).mean(0)

    experts = []
    for image in example.expert.targets:
        latent = model.codec.encode(image[None], lq[None])[0]
        noisy = model.scheduler.add_noise(latent[None], c.noise, c.timestep)[0]
        experts.append(error(noisy, c.noise[0]))
    return torch.stack(experts), error(example.state, example.target)


def _pooled(err: torch.Tensor, mask: torch.Tensor) -> float:
    return float((err * mask).sum() / mask.sum())


@pytest.mark.slow
def test_the_loss_of_a_batch_is_the_hinge_of_hand_computed_error_maps(inputs, tmp_path):
    margin = 0.005
    config = {**BASE, "learning_rate": 3e-2, "dro_margin": margin}
    trainer = prepared(inputs, tmp_path, config)
    trainer.update(0)  # the policy now differs from the reference; the snapshot syncs (M = 1)
    assert trainer.in_sync and trainer.syncs == 1
    trainer.refill(1, 0)
    examples = trainer.draw_examples(1, 0)
    results = trainer.example_losses(examples)
    model = trainer.model

    hinge_terms = []
    for example, (loss, stats) in zip(examples, results, strict=True):
        c = example.conditions
        masks = _area_pool(example.expert.masks, model.codec.downscale)  # [M, 4, 4]
        weights = torch.tensor(example.expert.item.weights)
        winners = example.winners
        # the same prompt and the same t for the expert and the negative, fresh noise
        assert c.timestep.shape == (1,) and c.noise.shape == (1, *example.state.shape)
        assert c.prompt == f"a photo of thing {IMAGES.index(example.expert.item.image_id)}"
        with torch.no_grad():
            theta_e, theta_n = _hand_maps(model, example)
            with model.reference():
                ref_e, ref_n = _hand_maps(model, example)
        total, r_pol, r_exp, active = 0.0, 0.0, 0.0, 0.0
        for m in range(len(weights)):
            expert_term = _pooled(theta_e[winners[m]], masks[m]) - _pooled(
                ref_e[winners[m]], masks[m]
            )
            policy_term = _pooled(theta_n, masks[m]) - _pooled(ref_n, masks[m])
            d = expert_term - policy_term  # = r(policy) - r(expert), r = E_ref - E_theta
            total += float(weights[m]) * max(d + margin, 0.0)
            r_pol += float(weights[m]) * -policy_term
            r_exp += float(weights[m]) * -expert_term
            active += float(weights[m]) * (d + margin > 0)
            hinge_terms.append(d + margin > 0)
        share = float(weights.sum())
        assert loss.item() == pytest.approx(total, rel=1e-5, abs=1e-9)
        assert stats["r_policy"] == pytest.approx(r_pol / share, rel=1e-5, abs=1e-9)
        assert stats["r_expert"] == pytest.approx(r_exp / share, rel=1e-5, abs=1e-9)
        assert stats["hinge_active"] == pytest.approx(active / share)
        # M = 1: the negative's state and target are the trained model's own (DRO A3.3)
        assert float(theta_n.mean()) < 1e-8 * float(ref_n.mean())
    assert len(hinge_terms) == 2 * 3 and any(hinge_terms) and not all(hinge_terms)


def test_the_buffer_holds_the_snapshots_own_trajectories(inputs, tmp_path):
    # sync every 2 micro-steps: step 2's refill samples with the weights of before step 1
    config = {**BASE, "dro_sync_every": 2, "dro_buffer_size": 4, "uncond_drop_rate": 0.5}
    trainer = prepared(inputs, tmp_path, config)
    before = {n: p.detach().clone() for n, p in trainer.named.items()}
    trainer.update(0)
    assert not trainer.in_sync and trainer.syncs == 0
    assert all(torch.equal(trainer.snapshot[n], before[n]) for n in before)
    assert not all(torch.equal(p, before[n]) for n, p in trainer.named.items())
    trained_weights = {n: p.detach().clone() for n, p in trainer.named.items()}
    trainer.refill(1, 0)
    assert all(torch.equal(p, trained_weights[n]) for n, p in trainer.named.items())  # restored
    buffer = trainer.buffer
    assert len(buffer) == 4 and trainer.sampled == 4

    # stream positions 2 and 3, sampled directly by the model with the snapshot's weights
    texts = {i: (f"a photo of thing {n}", "blurry") for n, i in enumerate(IMAGES)}
    order = dro_online.stream_items(len(IMAGES), [2, 3], SEED)
    ids = [trainer.items[i].image_id for i in order]
    assert buffer.image_ids[2:] == ids

    def keyed(name):
        return [
            torch_generator(SEED, "train", 1, 0, name, p, i)
            for p, i in zip((2, 3), ids, strict=True)
        ]

    prompts = []
    for image_id, g in zip(ids, keyed("negatives-prompt"), strict=True):
        dropped = float(torch.rand(1, generator=g)) < 0.5
        prompts.append(texts[image_id][1] if dropped else texts[image_id][0])
    assert buffer.prompts[2:] == prompts
    grids = torch.cat([online.perturbed_timesteps(2, 1000, 1, g) for g in keyed("negatives-grid")])
    model = tiny()  # the initial weights = the snapshot's
    lq = torch.stack([trainer.loader.load(trainer.by_id[i]).lq for i in ids])
    direct = model.sample_trajectory(
        lq,
        prompts=prompts,
        negative_prompts=["blurry"] * 2,
        steps=2,
        cfg=1.0,
        eta=0.0,
        generators=keyed("negatives"),
        timesteps=grids,
    )
    assert torch.equal(buffer.timesteps[2:], grids) and direct.timesteps.equal(grids)
    assert len({int(g[0]) for g in grids}) + len({int(g[-1]) for g in grids}) >= 3  # perturbed
    torch.testing.assert_close(buffer.states[2:], direct.latents[:, :-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(buffer.targets[2:], direct.noise_predictions, rtol=0, atol=1e-6)
    # ... and not what the trained weights would sample
    current = model.sample_trajectory(
        lq,
        prompts=prompts,
        negative_prompts=["blurry"] * 2,
        steps=2,
        cfg=1.0,
        eta=0.0,
        generators=keyed("negatives"),
        timesteps=grids,
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in trained_weights:
                parameter.copy_(trained_weights[name])
    moved = model.sample_trajectory(
        lq,
        prompts=prompts,
        negative_prompts=["blurry"] * 2,
        steps=2,
        cfg=1.0,
        eta=0.0,
        generators=keyed("negatives"),
        timesteps=grids,
    )
    assert torch.equal(current.noise_predictions, direct.noise_predictions)
    assert (moved.noise_predictions - buffer.targets[2:]).abs().max() > 1e-4
    trainer.update(1)
    assert trainer.in_sync and trainer.syncs == 1  # micro-step 2: the snapshot takes the weights
    assert all(torch.equal(trainer.snapshot[n], p) for n, p in trainer.named.items())


def test_the_snapshot_syncs_once_per_optimizer_step_by_default(inputs, tmp_path):
    config = {**BASE, "gradient_accumulation_steps": 2}
    trainer = prepared(inputs, tmp_path, config)
    row = trainer.update(0)
    assert trainer.syncs == 1 and row["syncs"] == 1 and trainer.in_sync
    assert all(torch.equal(trainer.snapshot[n], p) for n, p in trainer.named.items())
    assert row["buffer_size"] == 2 and trainer.sampled == 4  # refilled at both micro-steps


@pytest.mark.slow
def test_positives_hq_or_winners_change_what_trains(inputs, tmp_path):
    trainer = prepared(inputs, tmp_path, {**BASE, "dro_positives": "hq"})
    trainer.refill(0, 0)
    example = trainer.draw_examples(0, 0)[0]
    image_id = example.expert.item.image_id
    hq = signed_tensor(read_rgb(inputs["data_dir"] / "hq" / f"{image_id}.png"))
    assert torch.equal(example.expert.targets, hq[None]) and set(example.winners) == {0}

    winners = run(inputs, tmp_path / "winners", BASE)
    hq_run = run(inputs, tmp_path / "hq", {**BASE, "dro_positives": "hq"})
    assert not same_weights(trained(winners), trained(hq_run))
    meta = read_metadata(hq_run / "train_log.parquet")
    assert meta["positives"]["source"] == "hq" and meta["table"] == "dro_online_log"
    meta = read_metadata(winners / "train_log.parquet")
    assert meta["positives"]["source"] == "winners" and meta["pair_level"] == "instance"
    assert "neither paper" in meta["instance_weighting"]
    assert meta["negatives"]["name"].startswith("Diffusion-DRO online negatives")
    assert meta["sync_every"] == 1 and meta["syncs"] == 2 and meta["loss"] == "dro"
    log = read_table(winners / "train_log.parquet", "dro_online_log")
    assert log["step"].tolist() == [1, 2] and log["syncs"].tolist() == [1, 2]
    assert (
        np.isfinite(log[["loss", "hinge_active", "r_policy", "r_expert", "grad_norm"]]).all().all()
    )
    assert (log["buffer_size"] == 2).all()


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(inputs, tmp_path, monkeypatch):
    # the buffer outlives a refill and the snapshot lags the weights at the checkpoint
    config = {
        **BASE,
        "max_steps": 4,
        "dro_buffer_size": 4,
        "dro_refill_every": 2,
        "dro_sync_every": 3,
        "uncond_drop_rate": 0.5,
    }
    full = run(inputs, tmp_path / "full", config)
    log = read_table(full / "train_log.parquet", "dro_online_log")
    assert log["syncs"].tolist() == [0, 0, 1, 1]

    original = dro_online.Trainer.update

    def killed(self, step):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(dro_online.Trainer, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "resumed", config)
    folder = tmp_path / "checkpoints" / "train" / "resumed" / "step-00000002"
    tensors = checkpoints.load_extra_tensors(folder)
    assert any(k.startswith("snapshot.") for k in tensors)  # it differs from the weights
    assert bytes(tensors["buffer.image_ids"].tolist())  # the buffer travels
    assert checkpoints.load_extra(folder)["dro_online"] == {
        "sampled": 4,
        "syncs": 0,
        "in_sync": False,
    }
    monkeypatch.setattr(dro_online.Trainer, "update", original)
    resumed = run(inputs, tmp_path / "resumed", config)
    pd.testing.assert_frame_equal(read_table(resumed / "train_log.parquet", "dro_online_log"), log)
    assert same_weights(trained(full), trained(resumed))
    assert read_metadata(resumed / "train_log.parquet")["resumed_from"].endswith("step-00000002")
    assert_resume_kept_the_metadata(full, resumed)


# a snapshot that lags one micro-step: at M = 1 the negatives' own term has no gradient (their
# target is the model's own prediction, dro-and-ea-adam.md A3.3) and a changed negative would
# act only through the hinge's gate
KEYS_BASE = {**BASE, "dro_sync_every": 2}


@pytest.fixture(scope="module")
def baseline(inputs, tmp_path_factory):
    out = run(inputs, tmp_path_factory.mktemp("base") / "base", KEYS_BASE)
    return read_table(out / "train_log.parquet", "dro_online_log"), trained(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [
        {"dro_positives": "hq"},
        {"dro_buffer_size": 4},
        {"dro_refill_every": 3},
        {"dro_sync_every": None},
        {"dro_sampler_steps": 3},
        {"dro_sampler_cfg": 3.0},
        {"dro_sampler_eta": 1.0},
        {"dro_sampler_batch_size": 1},
        {"dro_refill_batches": 2},
        {"dro_perturb_timesteps": False},
        {"dro_margin": 0.05},
    ],
    ids=lambda change: next(iter(change)),
)
def test_each_key_changes_what_training_does(inputs, tmp_path, baseline, change):
    out = run(inputs, tmp_path / "changed", {**KEYS_BASE, **change})
    log, weights = baseline
    other = read_table(out / "train_log.parquet", "dro_online_log")
    columns = ["loss", "r_policy", "r_expert", "err_policy"]
    assert not log[columns].equals(other[columns])
    assert not same_weights(weights, trained(out))


@pytest.mark.slow
def test_the_one_step_framework_trains_on_its_gaussian_policy_actions(inputs, tmp_path):
    config = {**BASE, "uncond_drop_rate": 0.0}
    trainer = prepared(inputs, tmp_path, config, framework="onestep")
    trainer.refill(0, 0)
    buffer = trainer.buffer
    assert buffer.states.shape[1] == 1  # one state (z_L) and one action per "trajectory"
    assert (buffer.timesteps == trainer.model.settings.timestep).all()
    ids = buffer.image_ids
    lq = torch.stack([trainer.loader.load(trainer.by_id[i]).lq for i in ids])
    keys = [torch_generator(SEED, "train", 0, 0, "negatives", p, i) for p, i in enumerate(ids)]
    prompts = [f"a photo of thing {IMAGES.index(i)}" for i in ids]
    direct = tiny("onestep").sample_policy(lq, prompts=prompts, std=0.1, generators=keys)
    torch.testing.assert_close(buffer.targets[:, 0], direct.latents[:, 1], rtol=0, atol=1e-6)
    # the negative's error is the one-step error map with the action as the target
    example = trainer.draw_examples(0, 0)[0]
    model = trainer.model
    with torch.no_grad():
        got = model.state_error_maps(
            example.expert.lq[None],
            example.state[None],
            example.conditions.timestep,
            example.target[None],
            [example.conditions.prompt],
        )
        z_hat = model.predict_latent(
            example.expert.lq[None], model._text([example.conditions.prompt])
        )
    torch.testing.assert_close(got, (z_hat - example.target[None]).pow(2).mean(1))

    out = run(inputs, tmp_path / "one", config, framework="onestep")
    meta = read_metadata(out / "train_log.parquet")
    assert "one-step Gaussian policy" in meta["negatives"]["name"]
    assert "NOT Diffusion-DRO" in meta["negatives"]["name"]
    assert "dro_sampler_steps" in meta["negatives"]["unused"]
    # the report's weights column names it too (the saved model's description)
    from pipeline.models import load_model

    assert (
        "dro_online (one-step Gaussian policy negatives)" in load_model(out).describe()["weights"]
    )
    log = read_table(out / "train_log.parquet", "dro_online_log")
    # step 1: the policy is the reference (a fresh adapter), so r = 0; then it moves
    assert np.isfinite(log["loss"]).all() and log["r_policy"].tolist()[0] == 0.0
    assert log["r_policy"].tolist()[1] != 0.0
    other = run(
        inputs, tmp_path / "std", {**config, "onestep_policy_std": 0.3}, framework="onestep"
    )
    assert not same_weights(trained(out), trained(other))


def test_pairs_without_instances_train_on_the_image_pair(inputs, tmp_path):
    trainer = prepared(inputs, tmp_path, BASE)
    trainer.refill(0, 0)
    assert len(trainer.draw_examples(0, 0)[0].expert.masks) == 3  # instance pairs: 3 masks
    out = run(
        inputs,
        tmp_path / "image",
        {**BASE, "max_steps": 1},
        pairs_path=inputs["root"] / "image_pairs.parquet",
    )
    meta = read_metadata(out / "train_log.parquet")
    assert meta["pair_level"] == "image" and "one full mask" in meta["instance_weighting"]


def test_checkpoints_carry_extra_tensors(tmp_path):
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([parameter])
    fingerprint = checkpoints.Fingerprint({"a": 1})
    tensors = {
        "buffer.states": torch.arange(6.0).view(2, 3),
        "ids": torch.tensor([1, 2], dtype=torch.uint8),
    }
    path = checkpoints.save(
        tmp_path, 1, {"p": parameter}, optimizer, [], fingerprint, extra_tensors=tensors
    )
    loaded = checkpoints.load_extra_tensors(path)
    assert loaded.keys() == tensors.keys()
    assert all(
        torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors
    )
    plain = checkpoints.save(tmp_path / "b", 1, {"p": parameter}, optimizer, [], fingerprint)
    assert checkpoints.load_extra_tensors(plain) is None


def test_sample_trajectory_takes_per_trajectory_grids_and_eta_zero():
    model = tiny()
    lq = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    grids = torch.tensor([[503, 3], [510, 10]])
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    sample = model.sample_trajectory(
        lq, prompts=["", ""], steps=2, cfg=1.0, eta=0.0, generators=generators, timesteps=grids
    )
    assert torch.equal(sample.timesteps, grids) and torch.isnan(sample.log_probs).all()
    # eta 0 is DDIM's deterministic step from each state's own timestep
    scheduler = model.policy_scheduler(2)
    for row in range(2):
        x = sample.latents[row, 0][None]
        for k in range(2):
            eps = sample.noise_predictions[row, k][None]
            t = int(grids[row, k])
            abar, prev = scheduler.alphas_cumprod[t], t - 500
            abar_prev = (
                scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
            )
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
            torch.testing.assert_close(sample.latents[row, k + 1][None], x, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        model.sample_trajectory(
            lq, prompts=["", ""], steps=3, eta=0.0, generators=generators, timesteps=grids
        )


def test_the_train_cli_runs_the_ci_presets_dro_online_job(inputs, tmp_path):
    import json

    import yaml

    ci = Path(__file__).resolve().parent.parent / "workflow" / "presets" / "ci.yaml"
    preset = yaml.safe_load(ci.read_text())
    assert "dro_online" in preset["methods"]
    job = settings.job_settings(preset, "train", method="dro_online", objective="fidelity")
    assert (job["dro_buffer_size"], job["dro_sampler_steps"]) == (4, 2)
    job.update(max_steps=1, device="cpu")
    (tmp_path / "job.json").write_text(json.dumps(job))
    tiny().save_pretrained(tmp_path / "model")
    out = tmp_path / "aligned"
    T.main(
        [
            "--framework",
            "multistep",
            "--method",
            "dro_online",
            "--objective",
            "fidelity",
            "--pairs",
            str(inputs["pairs_path"]),
            "--candidates",
            str(inputs["candidates_path"]),
            "--data",
            str(inputs["data_dir"]),
            "--masks",
            str(inputs["masks_path"]),
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(out),
            "--config",
            str(tmp_path / "job.json"),
            "--prompts",
            str(inputs["prompts_path"]),
        ]
    )
    log = read_table(out / "train_log.parquet", "dro_online_log")
    assert log["buffer_size"].tolist() == [4] and np.isfinite(log["loss"]).all()
    assert read_metadata(out / "train_log.parquet")["config"]["dro_sampler_batch_size"] == 4
