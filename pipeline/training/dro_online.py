"""Diffusion-DRO's online negatives: method ``dro_online`` (docs/online_alignment.md
"Online DRO").

:data:`RUN` is the method of ``contracts.Method.loop == "dro_online"`` for the training session
(:mod:`pipeline.training.session`). Diffusion-DRO's *hybrid
sampling* (``basiclab/DiffusionDRO`` ``train.py``, ``misc/buffer.py``; the offline-pair ``dro`` of
the offline loop is unchanged):

- **Experts (positives)** are offline: per instance pair its selected winner
  (``dro_positives: winners``) or the HQ image as an expert demonstration (``hq``). Each is noised
  at the negative's timestep with fresh seeded noise (multi-step; the one-step error needs none).
- **Negatives** are states of the policy's own trajectories: a frozen *sampling snapshot* of the
  trained weights samples trajectories (multi-step: :meth:`MultiStepSR.sample_trajectory`, DDIM
  with ``dro_sampler_eta``, ``dro_sampler_cfg``, ``dro_sampler_steps`` and, with
  ``dro_perturb_timesteps``, one perturbed grid per trajectory) into
  :class:`pipeline.policy.OnlineNegativeBuffer`: the states fed to the UNet, their timesteps and
  the snapshot's own guided ε-prediction there as the target, and the prompt sampled under.
  The snapshot takes the trained weights every ``dro_sync_every`` micro-steps (null: once per
  optimizer step, the paper's M = 1).
- **One-step framework** (NOT Diffusion-DRO's multi-step form): the model has one state, ``z_L``
  of the LQ at its one timestep, and one action; a negative is the snapshot's *one-step Gaussian
  policy* action ``z ~ N(z_hat_snapshot(LQ), onestep_policy_std^2 I)``
  (:meth:`OneStepSR.sample_policy`), its error ``||z_hat_theta(LQ) - z||^2`` (the one-step error
  map of docs/design.md §4 with that latent as the target); the buffer holds ``T = 1``
  "trajectories". The sampler keys of the multi-step form (steps, cfg, eta, perturbed grids) are
  unused; the metadata's ``negatives`` names the definition.

Per micro-step ``m`` (counted over the run from 1, over all processes: the periods do not depend
on the process layout): refill when due (``dro_refill_every``; ``dro_refill_batches`` sampler
batches of ``dro_sampler_batch_size`` LQs from a seeded stream of the items); draw the global
micro-batch from the buffer as DRO draws (trajectories without replacement, one uniform step
each); each example pairs the negative with the expert of the same LQ at the same ``t`` and
trains on the prompt the trajectory was sampled under. The loss of an example is Diffusion-DRO's
hinge per DSPO instance, weighted as :func:`pipeline.losses.dro_loss` weights (a combination
neither paper has; the image pair with one full mask when the table has no instance pairs):

    d_m = (E_theta(expert_m, s_m) - E_ref(expert_m, s_m)) - (E_theta(neg, s_m) - E_ref(neg, s_m))
    loss = sum_m w_m relu(d_m + dro_margin)

``E(., s_m)`` the error map pooled under mask ``s_m``; with the implicit reward ``r = E_ref -
E_theta`` (DRO's), ``d_m = r(policy) - r(expert)``; the step's loss is the mean over its global
batch of ``batch_size`` examples. After the last micro-step of a step, one optimizer update;
then the snapshot syncs when due.

Seeds (:func:`pipeline.seeding.torch_generator`, keyed by global positions, never the process):
the refill stream's item order ``numpy_rng(seed, "train", "negatives-order", epoch)``; the
trajectory of stream position ``p`` drawn at micro-step ``micro`` of step ``step`` from
``(seed, "train", step, micro, "negatives", p, image_id)`` (initial noise, DDIM noise, one-step
action), its grid offset from ``(..., "negatives-grid", p, image_id)``, its prompt dropout
(``uncond_drop_rate``, the offline loop's M1/M2 rule) from ``(..., "negatives-prompt", p,
image_id)``; the buffer draw from ``(seed, "train", step, micro, "negatives-draw")``; the expert
noise of global slot ``s`` from ``(seed, "train", step, "expert", s, image_id)``. Checkpoints
carry the buffer and (when it differs from the trained weights) the snapshot in
``extra.safetensors`` and the stream position and sync count in ``state.json``, so a killed and
resumed run is bit-identical.

Log (``train_log.parquet``, table ``dro_online_log``): loss; ``hinge_active``, the weighted share
of (example, instance) terms with ``d_m + margin > 0``; ``r_policy`` and ``r_expert``, the
weighted mean implicit rewards; ``err_policy``, ``E_theta`` on the negatives (~0 at M = 1 when
sampler and error map use the same guidance: the gate of dro-and-ea-adam.md A3.3); the buffer's
size after the step; the syncs so far; lr; grad norm. ``memory`` (two-pass) and the alignment
curves (``heldout_fraction``, ``eval_every``) are offline-loop settings: every item trains here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import checkpoints, contracts, guidance, losses
from pipeline import policy as online
from pipeline.distributed import gather_objects
from pipeline.io.images import read_rgb, signed_tensor
from pipeline.io.tables import read_table
from pipeline.models.base import SRModel
from pipeline.seeding import numpy_rng, torch_generator
from pipeline.training.config import TrainConfig
from pipeline.training.items import ItemLoader, LoadedItem, PreferenceItem, preference_items
from pipeline.training.run import TrainerBase, learning_rate, micro_batch_size
from pipeline.training.session import MethodRun
from pipeline.training.step import STAGE, Conditions, error_maps_batched

logger = logging.getLogger(__name__)

LOG_TABLE = "dro_online_log"
STAT_KEYS = ("hinge_active", "r_policy", "r_expert", "err_policy")
LOG_COLUMNS = ("step", "loss", *STAT_KEYS, "buffer_size", "syncs", "lr", "grad_norm")
POSITIVES = ("winners", "hq")
#: the checkpoint's names: the JSON state (``state.json``'s extra) and the tensor prefixes
STATE_KEY = "dro_online"
BUFFER_PREFIX = "buffer."
SNAPSHOT_PREFIX = "snapshot."


def sync_period(config: TrainConfig) -> int:
    """Micro-steps between syncs: ``dro_sync_every``, null = one optimizer step (M = 1)."""
    return int(config.dro_sync_every or config.gradient_accumulation_steps)


def negatives_record(model: SRModel, config: TrainConfig) -> dict[str, Any]:
    """What a negative is for this family, for metadata (the one-step arm is never called
    Diffusion-DRO's multi-step form)."""
    if model.framework == "multistep":
        return {
            "name": "Diffusion-DRO online negatives: states of the snapshot's DDIM trajectories",
            "sampler": "DDIM (pipeline.policy.ddim_step_with_log_prob; DRO uses DPM-Solver++)",
            "steps": config.dro_sampler_steps,
            "cfg": config.dro_sampler_cfg,
            "eta": config.dro_sampler_eta,
            "perturbed_timesteps": config.dro_perturb_timesteps,
            "state": "x_t fed to the snapshot's UNet at each step of its trajectory",
            "target": "the snapshot's guided epsilon-prediction at x_t",
            "error": "||eps_theta(x_t, t, lq, prompt) - target||^2",
        }
    return {
        "name": "one-step Gaussian policy action of the snapshot (NOT Diffusion-DRO's multi-step "
        "trajectory states)",
        "sampler": "one-step Gaussian policy (OneStepSR.sample_policy)",
        "std": config.onestep_policy_std,
        "state": "z_L = encode(LQ) at the one-step timestep (the model's only state)",
        "target": "z ~ N(z_hat_snapshot(LQ), onestep_policy_std^2 I), the snapshot's own action",
        "error": "||z_hat_theta(LQ) - z||^2 (the one-step error map with a latent target)",
        "unused": [
            "dro_sampler_steps",
            "dro_sampler_cfg",
            "dro_sampler_eta",
            "dro_perturb_timesteps",
        ],
    }


# -- negatives -----------------------------------------------------------------------------------


def trajectory_grids(
    model: SRModel, config: TrainConfig, generators: Sequence[torch.Generator]
) -> torch.Tensor | None:
    """Multi-step with ``dro_perturb_timesteps``: ``int64 [B, steps]``, one perturbed grid per
    trajectory (:func:`pipeline.policy.perturbed_timesteps`, each from its own generator); else
    None (the scheduler's grid)."""
    if model.framework != "multistep" or not config.dro_perturb_timesteps:
        return None
    total = model.scheduler.config.num_train_timesteps
    return torch.cat(
        [online.perturbed_timesteps(config.dro_sampler_steps, total, 1, g) for g in generators]
    )


def sample_negatives(
    model: SRModel,
    lq: torch.Tensor,
    prompts: Sequence[str],
    negatives: Sequence[str],
    generators: Sequence[torch.Generator],
    grids: torch.Tensor | None,
    config: TrainConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trajectories of ``model`` as it is now (the caller swaps the snapshot in): ``states [B,
    T, C, h, w]`` (what the UNet was fed), ``timesteps int64 [B, T]``, ``targets [B, T, C, h,
    w]`` (multi-step: its guided ε-prediction at each state; one-step: ``T = 1``, the state
    ``z_L`` and the one-step Gaussian policy's action)."""
    if model.framework == "multistep":
        sample = model.sample_trajectory(
            lq,
            prompts=list(prompts),
            negative_prompts=list(negatives),
            steps=config.dro_sampler_steps,
            cfg=config.dro_sampler_cfg,
            eta=config.dro_sampler_eta,
            generators=list(generators),
            timesteps=grids,
        )
        return sample.latents[:, :-1], sample.timesteps, sample.noise_predictions
    sample = model.sample_policy(
        lq, prompts=list(prompts), std=config.onestep_policy_std, generators=list(generators)
    )
    return sample.latents[:, :1], sample.timesteps, sample.latents[:, 1:]


@functools.lru_cache(maxsize=4)
def _stream_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return numpy_rng(seed, STAGE, "negatives-order", epoch).permutation(n_items)


def stream_items(n_items: int, positions: Sequence[int], seed: int) -> list[int]:
    """Item indices at positions of the refill stream: seeded epoch permutations back to back
    (DRO's sampler batches come from its data loader likewise)."""
    return [int(_stream_order(n_items, seed, p // n_items)[p % n_items]) for p in positions]


# -- the loss of one example ---------------------------------------------------------------------


def example_loss(
    err_theta_expert: torch.Tensor,
    err_ref_expert: torch.Tensor,
    err_theta_policy: torch.Tensor,
    err_ref_policy: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    winners: torch.Tensor,
    margin: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DRO's hinge for one example, per instance: the experts' error maps ``[D, h,
    w]`` (``winners [M]`` indexes them), the negative's ``[h, w]``, masks ``[M, H, W]`` (area-
    resized to the grid), ``weights [M]``; the loss is :func:`pipeline.losses.dro_loss` with the
    negative as every instance's loser. Statistics (weighted by ``w_m / sum w``): the share of
    active hinge terms, ``r = E_ref - E_theta`` of the negative and of the expert, ``E_theta`` of
    the negative."""
    masks = losses.resize_masks_to_grid(masks, *err_theta_expert.shape[-2:]).to(
        err_theta_expert.device
    )
    theta = torch.cat([err_theta_expert, err_theta_policy[None]])
    ref = torch.cat([err_ref_expert, err_ref_policy[None]]).to(theta.device)
    weights = torch.as_tensor(weights, dtype=torch.float32)
    winners = torch.as_tensor(winners, dtype=torch.long)
    losers = torch.full_like(winners, err_theta_expert.shape[0])
    loss, stats = losses.dro_loss(theta, ref, masks, weights, winners, losers, margin=margin)
    with torch.no_grad():
        margins, _ = losses.preference_margins(theta.detach(), ref, masks, weights, winners, losers)
        share = weights.to(margins) / weights.sum().clamp_min(1e-12)
        active = float(((margins + margin > 0).to(margins) * share).sum())
    return loss, {
        "hinge_active": active,
        "r_policy": stats["err_ref_loser"] - stats["err_theta_loser"],
        "r_expert": stats["err_ref_winner"] - stats["err_theta_winner"],
        "err_policy": stats["err_theta_loser"],
    }


@dataclasses.dataclass
class Example:
    """One training example: the expert(s) of an LQ (``expert.targets [D, 3, H, W]``, its masks
    and ``winners`` into them), the draws they share with the negative (the negative's
    timestep, fresh noise, the trajectory's prompt) and the negative's state and target."""

    expert: LoadedItem
    winners: tuple[int, ...]
    conditions: Conditions
    state: torch.Tensor  # [C, h', w']
    target: torch.Tensor  # [C, h', w']


# -- one run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer(TrainerBase):
    """One run's state between steps: the buffer, the sampling snapshot and the stream."""

    config: TrainConfig
    seed: int
    model: SRModel
    accelerator: Any
    optimizer: Any
    trainable: list[torch.nn.Parameter]
    named: dict[str, torch.nn.Parameter]
    items: list[PreferenceItem]
    loader: ItemLoader
    texts: dict[str, tuple[str, str]] | None
    hq_paths: dict[str, Path] | None  # dro_positives: hq
    buffer: online.OnlineNegativeBuffer
    snapshot: dict[str, torch.Tensor]  # the sampling policy's trainable weights
    in_sync: bool = True  # whether the snapshot equals the trained weights
    sampled: int = 0  # refill stream positions used so far
    syncs: int = 0
    last_good: Path | None = None

    def __post_init__(self) -> None:
        self.by_id = {item.image_id: item for item in self.items}

    # -- layout --------------------------------------------------------------------------------
    def per_micro(self) -> int:
        """Examples per process and micro-step (``batch_size`` is one update's global batch)."""
        return micro_batch_size(self.config, self.accelerator.num_processes)

    def micro_index(self, step: int, micro: int) -> int:
        """The run's micro-step number, from 1 (DRO's periods count these)."""
        return step * self.config.gradient_accumulation_steps + micro + 1

    # -- prompts and experts -------------------------------------------------------------------
    def negative_prompt(self, item: PreferenceItem) -> str:
        """The unconditional text of the item (M2 feedback + the table's negative prompt), as
        :func:`pipeline.training.step.draw_conditions` builds it."""
        base = self.texts[item.image_id][1] if self.texts else ""
        return (
            guidance.image_negative_prompt(base, item.negative_prompt)
            if (self.config.negative_prompts)
            else ""
        )

    def trajectory_prompt(self, item: PreferenceItem, generator: torch.Generator) -> str:
        """The prompt a trajectory is sampled and trained under: the LQ's, or with probability
        ``uncond_drop_rate`` its unconditional text (DRO drops 20% of prompts likewise)."""
        prompt = self.texts[item.image_id][0] if self.texts else ""
        dropped = float(torch.rand(1, generator=generator)) < self.config.uncond_drop_rate
        return self.negative_prompt(item) if dropped else prompt

    def expert(self, loaded: LoadedItem) -> tuple[LoadedItem, tuple[int, ...]]:
        """The experts of an item: its distinct winners, or the HQ image (one expert for every
        instance), with the item's masks."""
        item = loaded.item
        if self.config.dro_positives == "hq":
            hq = signed_tensor(read_rgb(self.hq_paths[item.image_id]))
            if tuple(hq.shape[-2:]) != tuple(loaded.lq.shape[-2:]):
                raise ValueError(
                    f"image {item.image_id!r}: HQ {tuple(hq.shape[-2:])} and candidates "
                    f"{tuple(loaded.lq.shape[-2:])} differ in size (dro_positives: hq)"
                )
            return LoadedItem(item, loaded.lq, hq[None], loaded.masks), (0,) * len(item.winners)
        distinct = sorted(set(item.winners))
        index = {w: i for i, w in enumerate(distinct)}
        targets = loaded.targets[distinct]
        return LoadedItem(item, loaded.lq, targets, loaded.masks), tuple(
            index[w] for w in item.winners
        )

    # -- the snapshot --------------------------------------------------------------------------
    @contextlib.contextmanager
    def snapshot_weights(self) -> Iterator[None]:
        """The model runs with the snapshot's weights inside (restored bit for bit after)."""
        if self.in_sync:
            yield
            return
        current = {n: p.detach().clone() for n, p in self.named.items()}
        with torch.no_grad():
            for name, parameter in self.named.items():
                parameter.copy_(self.snapshot[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.named.items():
                    parameter.copy_(current[name])

    def sync(self) -> None:
        with torch.no_grad():
            for name, parameter in self.named.items():
                self.snapshot[name].copy_(parameter.detach())
        self.in_sync = True
        self.syncs += 1

    # -- refill --------------------------------------------------------------------------------
    def sample_positions(
        self, step: int, micro: int, positions: Sequence[int]
    ) -> list[dict[str, Any]]:
        """The snapshot's trajectories of some refill stream positions (one batch)."""
        if not positions:
            return []
        chosen = [self.items[i] for i in stream_items(len(self.items), positions, self.seed)]
        loaded = [self.loader.load(item) for item in chosen]
        sizes = {tuple(entry.lq.shape) for entry in loaded}
        if len(sizes) > 1:
            raise ValueError(
                f"dro_online needs training images of one size (the buffer holds trajectories of "
                f"one shape); images {[i.image_id for i in chosen]} have sizes {sorted(sizes)}"
            )
        keys = [(p, item.image_id) for p, item in zip(positions, chosen, strict=True)]

        def generators(name: str) -> list[torch.Generator]:
            return [torch_generator(self.seed, STAGE, step, micro, name, p, i) for p, i in keys]

        prompts = [
            self.trajectory_prompt(item, g)
            for item, g in zip(chosen, generators("negatives-prompt"), strict=True)
        ]
        negatives = [self.negative_prompt(item) for item in chosen]
        grids = trajectory_grids(self.model, self.config, generators("negatives-grid"))
        lq = torch.stack([entry.lq for entry in loaded]).to(self.accelerator.device)
        with torch.no_grad(), self.snapshot_weights(), self.accelerator.autocast():
            states, timesteps, targets = sample_negatives(
                self.model, lq, prompts, negatives, generators("negatives"), grids, self.config
            )
        return [
            {
                "position": p,
                "image_id": item.image_id,
                "prompt": prompt,
                "states": states[k].cpu(),
                "timesteps": timesteps[k].cpu(),
                "targets": targets[k].cpu(),
            }
            for k, (p, item, prompt) in enumerate(zip(positions, chosen, prompts, strict=True))
        ]

    def refill(self, step: int, micro: int) -> None:
        """DRO's refill: ``refill_batches`` sampler batches into the buffer (each process
        samples its share of a batch's positions; every process adds all, in position order)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        size = self.config.dro_sampler_batch_size
        batches = self.buffer.refill_batches(
            self.per_micro() * world, size, self.config.dro_refill_batches
        )
        for _ in range(batches):
            positions = list(range(self.sampled, self.sampled + size))
            self.sampled += size
            mine = self.sample_positions(step, micro, positions[rank::world])
            trajectories = sorted(
                gather_objects(self.accelerator, mine), key=lambda t: t["position"]
            )
            self.buffer.add(
                [t["image_id"] for t in trajectories],
                torch.stack([t["states"] for t in trajectories]),
                torch.stack([t["timesteps"] for t in trajectories]),
                torch.stack([t["targets"] for t in trajectories]),
                prompts=[t["prompt"] for t in trajectories],
            )

    # -- examples and their loss ---------------------------------------------------------------
    def draw_examples(self, step: int, micro: int) -> list[Example]:
        """This process's examples of a micro-step: the global micro-batch drawn from the buffer
        (one generator, the same on every process), each paired with its LQ's expert."""
        world, rank, per_micro = (
            self.accelerator.num_processes,
            self.accelerator.process_index,
            self.per_micro(),
        )
        drawn = self.buffer.sample(
            per_micro * world, torch_generator(self.seed, STAGE, step, micro, "negatives-draw")
        )
        examples = []
        for row in range(rank * per_micro, (rank + 1) * per_micro):
            slot = micro * world * per_micro + row  # global slot within the step
            image_id = drawn["image_ids"][row]
            item = self.by_id[image_id]
            expert, winners = self.expert(self.loader.load(item))
            generator = torch_generator(self.seed, STAGE, step, "expert", slot, image_id)
            _, noise = self.model.draw_timesteps_and_noise(expert.lq[None], generator)
            conditions = Conditions(
                drawn["timesteps"][row : row + 1],
                noise,
                drawn["prompts"][row],
                self.negative_prompt(item),
            )
            examples.append(
                Example(expert, winners, conditions, drawn["states"][row], drawn["targets"][row])
            )
        return examples

    def error_maps(self, examples: Sequence[Example]) -> tuple[list, torch.Tensor]:
        """The model's error maps of the experts (one ``[D_i, h, w]`` per example) and of the
        negatives (``[B, h, w]``), under the current weights."""
        device = self.accelerator.device
        loaded = [e.expert for e in examples]
        conditions = [e.conditions for e in examples]
        experts = error_maps_batched(self.model, loaded, conditions, device)
        negatives = self.model.state_error_maps(
            torch.stack([e.expert.lq for e in examples]).to(device),
            torch.stack([e.state for e in examples]).to(device),
            torch.cat([e.conditions.timestep for e in examples]).to(device),
            torch.stack([e.target for e in examples]).to(device),
            [c.prompt for c in conditions],
            [c.negative for c in conditions],
        )
        return experts, negatives

    def example_losses(
        self, examples: Sequence[Example]
    ) -> list[tuple[torch.Tensor, dict[str, float]]]:
        """Each example's hinge (policy maps with gradients, the reference's without)."""
        with self.accelerator.autocast():
            theta_experts, theta_negatives = self.error_maps(examples)
            with torch.no_grad(), self.model.reference():
                ref_experts, ref_negatives = self.error_maps(examples)
        return [
            example_loss(
                theta_experts[i],
                ref_experts[i],
                theta_negatives[i],
                ref_negatives[i],
                e.expert.masks,
                torch.tensor(e.expert.item.weights),
                torch.tensor(e.winners),
                self.config.dro_margin,
            )
            for i, e in enumerate(examples)
        ]

    # -- one optimizer step --------------------------------------------------------------------
    def update(self, step: int) -> dict[str, Any]:
        config, accelerator = self.config, self.accelerator
        lr = learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = np.zeros(1 + len(STAT_KEYS))
        grad_norm = float("nan")
        last = config.gradient_accumulation_steps - 1
        for micro in range(config.gradient_accumulation_steps):
            index = self.micro_index(step, micro)
            if self.buffer.due_for_refill(index):
                self.refill(step, micro)
            examples = self.draw_examples(step, micro)
            results = self.example_losses(examples)
            loss = torch.stack([loss for loss, _ in results]).sum()
            checkpoints.check_finite(
                accelerator,
                loss,
                f"non-finite loss at step {step + 1} (images "
                f"{[e.expert.item.image_id for e in examples]}); {self.stopped()}",
            )
            accelerator.backward(loss / config.batch_size)
            totals += [float(loss.detach()), *(sum(s[k] for _, s in results) for k in STAT_KEYS)]
            if micro == last:
                grad_norm = self.summed_update(step)
                self.in_sync = False
            if self.buffer.due_for_sync(index):
                self.sync()
        examples_per_process = self.per_micro() * config.gradient_accumulation_steps
        means = checkpoints.reduce_mean(accelerator, (totals / examples_per_process).tolist())
        return {
            "step": step + 1,
            **dict(zip(("loss", *STAT_KEYS), means, strict=True)),
            "buffer_size": len(self.buffer),
            "syncs": self.syncs,
            "lr": lr,
            "grad_norm": grad_norm,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``state.json``'s extra and the tensors (the buffer; the snapshot when it differs
        from the trained weights, else the saved weights are it)."""
        tensors = {BUFFER_PREFIX + k: v for k, v in self.buffer.state_dict().items()}
        if not self.in_sync:
            tensors.update({SNAPSHOT_PREFIX + k: v for k, v in self.snapshot.items()})
        state = {"sampled": self.sampled, "syncs": self.syncs, "in_sync": self.in_sync}
        return {STATE_KEY: state}, tensors

    def restore(self, path: Path) -> None:
        """The buffer, snapshot, stream position and sync count of checkpoint ``path`` (after
        :func:`pipeline.checkpoints.load` restored the weights)."""
        state = checkpoints.load_extra(path)[STATE_KEY]
        tensors = checkpoints.load_extra_tensors(path) or {}
        self.buffer = online.OnlineNegativeBuffer.from_state_dict(
            {k[len(BUFFER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(BUFFER_PREFIX)}
        )
        self.sampled, self.syncs = int(state["sampled"]), int(state["syncs"])
        self.in_sync = bool(state["in_sync"])
        for name, parameter in self.named.items():
            saved = tensors.get(SNAPSHOT_PREFIX + name)
            if saved is None and not self.in_sync:
                raise ValueError(f"checkpoint {path} lacks the sampling snapshot's {name}")
            source = parameter.detach() if saved is None else saved
            self.snapshot[name] = source.to(parameter.device, copy=True)


def read_items(pairs_path: str | Path, method: str) -> tuple[list[PreferenceItem], str]:
    """The method's instance items, or the image pair's (one full mask) when the table has no
    instance pairs; and which level they are."""
    pairs = read_table(pairs_path, "preference_pairs")
    if (pairs["instance_id"] != contracts.WHOLE_IMAGE_ID).any():
        return preference_items(pairs, method), "instance"
    logger.warning("%s: no instance pairs; %s trains on the image pairs", pairs_path, method)
    return preference_items(pairs, method, pair_level="image"), "image"


class DroOnlineRun(MethodRun):
    """dro_online's part of the session: the items (instance pairs, else the image pair), the
    experts' HQs, the buffer and sampling snapshot (checkpointed)."""

    log_table = LOG_TABLE
    log_columns = LOG_COLUMNS

    def check(self) -> None:
        if self.config.dro_positives not in POSITIVES:
            raise ValueError(f"train.dro_positives must be one of {POSITIVES}")
        micro_batch_size(self.config, self.accelerator.num_processes)  # a bad layout fails early

    def read_inputs(self) -> None:
        job = self.job
        self.items, self.pair_level = read_items(job.pairs_path, job.method)
        self.loader = ItemLoader(
            read_table(job.candidates_path, "candidates"),
            Path(job.candidates_path),
            Path(job.data_dir),
            Path(job.masks_path),
        )
        self.loader.check(self.items)
        self.hq_paths = None
        if self.config.dro_positives == "hq":
            self.hq_paths = contracts.data_images(job.data_dir, "hq")
            absent = [i.image_id for i in self.items if i.image_id not in self.hq_paths]
            if absent:
                table = Path(job.data_dir) / contracts.DATA_TABLE
                raise KeyError(f"{table} has no HQ for {absent[:5]}")
        self.texts, self.prompt_record = guidance.optional_stage_prompts(
            job.prompts_path, [item.image_id for item in self.items], where=f"train {job.method}"
        )

    def build(self) -> Trainer:
        config = self.config
        buffer = online.OnlineNegativeBuffer(
            config.dro_buffer_size, config.dro_refill_every, sync_period(config)
        )
        snapshot = {n: p.detach().clone() for n, p in self.named.items()}
        return Trainer(
            config,
            self.job.seed,
            self.model,
            self.accelerator,
            self.optimizer,
            self.trainable,
            self.named,
            self.items,
            self.loader,
            self.texts,
            self.hq_paths,
            buffer,
            snapshot,
        )

    def resume(self, path: Path) -> tuple[int, list[dict]]:
        done = super().resume(path)
        self.trainer.restore(path)
        return done

    def checkpoint(self) -> dict[str, Any]:
        extra, tensors = self.trainer.checkpoint_state()
        return {**super().checkpoint(), "extra": extra, "extra_tensors": tensors}

    def postfix(self, row: dict) -> dict[str, str]:
        return {"loss": f"{row['loss']:.2e}", "active": f"{row['hinge_active']:.2f}"}

    def finish(self) -> None:
        # as ddpo's and gdpo's: the one-step arm's negatives are the one-step Gaussian policy's
        onestep = self.model.framework == "onestep"
        self.name_alignment(
            "one-step Gaussian policy negatives" if onestep else "DDIM trajectory negatives"
        )

    def metadata(self) -> dict[str, Any]:
        config, job = self.config, self.job
        return {
            "loss_formula": "mean over examples of sum_m w_m relu(d_m + dro_margin), d_m = "
            "r(policy, s_m) - r(expert, s_m), r = E_ref - E_theta pooled under instance mask s_m",
            "instance_weighting": "DSPO masks and weights on Diffusion-DRO's hinge: a "
            "combination neither paper has"
            if self.pair_level == "instance"
            else "one full mask (the table has no instance pairs): Diffusion-DRO's image form",
            "pairs": str(job.pairs_path),
            "pair_level": self.pair_level,
            "positives": {
                "source": config.dro_positives,
                "what": "each instance's selected winner"
                if config.dro_positives == "winners"
                else "the HQ image (expert demonstration)",
            },
            "negatives": negatives_record(self.model, config),
            "buffer": {
                "size": config.dro_buffer_size,
                "refill_every": config.dro_refill_every,
                "sampler_batch_size": config.dro_sampler_batch_size,
                "refill_batches": config.dro_refill_batches,
            },
            "sync_every": sync_period(config),
            "syncs": self.trainer.syncs,
            "prompts": self.prompt_record,
            "items": len(self.items),
            "candidates": str(job.candidates_path),
            "masks": str(job.masks_path),
        }


RUN = DroOnlineRun
