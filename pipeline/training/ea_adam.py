"""EA-Adam on DSPO (docs/ea_adam.md): a population of adapters across the perception-fidelity
trade-off, trained by alternating Adam and evolutionary phases, and their layer-wise fusion.
:data:`RUN` is the method of ``contracts.Method.loop == "ea_adam"`` for the training session
(:mod:`pipeline.training.session`); it builds on the offline method's trainer.

- **Members**: P copies of the pretrained model's trainable parameters
  (``model.trainable_parameters()``: the top LoRA adapter of one-step, the ControlNet of
  multi-step), member i with preference ``(1 - i/(P-1), i/(P-1))`` (perception, fidelity). One
  model holds whichever member is being stepped or scored; the frozen reference (adapter off /
  frozen copy) is the pretrained model for every member.
- **Adam phase**, every step, for each member in order: the DSPO loss of the perception pairs
  and of the fidelity pairs, each with exactly the batch and the draws that DSPO's own run on
  that table makes at that step (:meth:`pipeline.training.offline.Trainer.micro_batch`,
  :func:`pipeline.training.step.batch_loss`); the gradients are mixed per tensor
  (:func:`pipeline.population.mix_gradients`; a one-hot member takes its one objective's raw
  gradient and skips the other loss), clipped as train clips, and member i's own AdamW steps.
- **EA phase** every ``ea_every`` steps (:func:`pipeline.population.ea_phase`); fitness of an
  adapter = (perception, fidelity) losses on a fixed validation subset: the first
  ``fitness_images`` training LQs by id, HR centre crops of ``fitness_crop``, super-resolved with
  ``fitness_steps`` sampler steps and noise keyed by (seed, "ea_fitness", image id), scored
  with the score stage's metric registry (:class:`pipeline.iqa.MetricRegistry`) on the metrics
  and weights of ``objectives`` (``select.objectives``' perception and fidelity). Each metric is
  oriented by ``lower_better`` and divided by its magnitude for the pretrained adapter on the
  same subset; an objective's score is the weighted sum, its loss the negative. The AdamW
  moments are reset after each phase (as released).
- **Checkpoints** (``checkpoint_every``, through :mod:`pipeline.checkpoints`): the whole
  population state (:meth:`pipeline.population.PopulationState.to_flat`, members, fitness,
  reference points, the EA generator) as the checkpoint's weights, every member's AdamW state
  as its optimizer, the log and a fingerprint of train's plus both pairs tables and the
  ``ea_adam`` settings, and the fitness evaluations counted so far. Resume is bit-identical.
- **Fusion** after the last step: per-layer softmax weights learned with Adam on the
  ``fusion_preference``-weighted DSPO losses of the fused adapter on the first
  ``fusion_images`` LQs of each table (draws keyed by steps after ``max_steps``), then the
  static merge (:func:`pipeline.population.fuse_adapters`).

Output folder (``out_dir``): the fused model itself (``save_pretrained``, so evaluate loads the
folder as any aligned model), ``members/{i}/`` (each member, ``save_pretrained``),
``population.parquet`` (member, preference, fitness, fusion weight, path),
``population.safetensors`` (the final population state) and ``train_log.parquet`` (table
``ea_adam_log``, one row per member and step).

Single process only (a multi-process launch is refused); fp16 is refused (the gradients are
taken with ``torch.autograd.grad``, outside accelerate's loss scaling).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

from pipeline import checkpoints, contracts, guidance, population, settings
from pipeline.io.images import read_rgb, signed_tensor, signed_to_uint8, unit_tensor
from pipeline.io.tables import write_table
from pipeline.iqa import MetricRegistry, score_images
from pipeline.models.base import SRModel, upsample_lq
from pipeline.seeding import torch_generator
from pipeline.training.config import TrainConfig
from pipeline.training.offline import Trainer, read_inputs
from pipeline.training.run import learning_rate, make_optimizer, micro_batch_size, step_slots
from pipeline.training.session import MethodRun
from pipeline.training.step import STAGE, PolicyErrors, batch_loss

#: the loss each member's objectives train with (contracts.METHODS["ea_adam"].loss)
LOSS_METHOD = "dspo"
OBJECTIVES = contracts.MULTI_OBJECTIVES  # (perception, fidelity): objective 0 and 1
LOG_COLUMNS = ("step", "member", "loss_perception", "loss_fidelity", "lr", "grad_norm")


def split_config(config: Mapping[str, Any] | TrainConfig | None) -> tuple[TrainConfig, dict]:
    """(the train settings, the resolved ``ea_adam`` settings) of a job's config."""
    if isinstance(config, TrainConfig):
        return config, settings.resolve("train.ea_adam", {})
    section = dict(config or {})
    ea_adam = section.pop("ea_adam", None)
    return TrainConfig.from_dict(section), settings.resolve("train.ea_adam", ea_adam or {})


def pairs_paths(pairs_path: Any) -> tuple[Path, Path]:
    """The (perception, fidelity) pairs tables: a sequence of two paths in that order, or a
    mapping by objective name."""
    if isinstance(pairs_path, Mapping):
        missing = [o for o in OBJECTIVES if o not in pairs_path]
        if missing:
            raise ValueError(f"ea_adam needs pairs tables of {list(OBJECTIVES)}; missing {missing}")
        return tuple(Path(pairs_path[o]) for o in OBJECTIVES)  # type: ignore[return-value]
    if isinstance(pairs_path, (str, Path)) or len(pairs_path) != len(OBJECTIVES):
        raise ValueError(
            f"ea_adam needs {len(OBJECTIVES)} pairs tables ({', '.join(OBJECTIVES)}, in this "
            f"order: --pairs PERCEPTION FIDELITY), got {pairs_path!r}"
        )
    return tuple(Path(p) for p in pairs_path)  # type: ignore[return-value]


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class MemberOptimizers:
    """One AdamW per member over the model's trainable parameters (each holds its own moments),
    seen by :mod:`pipeline.checkpoints` as one optimizer: member i's state and param group at
    indices offset by i (so ``save``/``load`` store and restore all of them)."""

    def __init__(self, parameters: list[torch.nn.Parameter], size: int, config: TrainConfig):
        self.parameters, self.config = parameters, config
        self.optimizers = [self.fresh() for _ in range(size)]

    def fresh(self) -> torch.optim.AdamW:
        return make_optimizer(self.parameters, self.config)

    def reset(self) -> None:
        """New moments for every member (EA-Adam resets them after every EA phase)."""
        self.optimizers = [self.fresh() for _ in self.optimizers]

    def state_dict(self) -> dict[str, Any]:
        n = len(self.parameters)
        state, groups = {}, []
        for i, optimizer in enumerate(self.optimizers):
            inner = optimizer.state_dict()
            state.update({i * n + index: value for index, value in inner["state"].items()})
            for group in inner["param_groups"]:
                groups.append({**group, "params": [i * n + p for p in group["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, document: Mapping[str, Any]) -> None:
        n = len(self.parameters)
        groups = document["param_groups"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"{len(groups)} member optimizers saved, {len(self.optimizers)} here")
        for i, optimizer in enumerate(self.optimizers):
            state = {
                int(k) - i * n: v
                for k, v in document["state"].items()
                if i * n <= int(k) < (i + 1) * n
            }
            group = {**groups[i], "params": [p - i * n for p in groups[i]["params"]]}
            optimizer.load_state_dict({"state": state, "param_groups": [group]})


def _set_weights(named: Mapping[str, torch.nn.Parameter], weights: Mapping[str, torch.Tensor]):
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(weights[name])


def _weights(named: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in named.items()}


@dataclasses.dataclass
class Fitness:
    """The fixed fitness subset and the registry that scores it (docs/ea_adam.md, step 4)."""

    model: SRModel
    named: dict[str, torch.nn.Parameter]
    lq: list[torch.Tensor]  # per image [3, c, c] in [-1, 1], upsampled to the HR size
    hq: list[torch.Tensor]  # per image [3, c, c] in [0, 1]
    ids: list[str]
    texts: dict[str, tuple[str, str]] | None
    objectives: dict[str, dict[str, float]]
    registry: MetricRegistry
    steps: int
    seed: int
    scale: dict[str, float] | None = None  # |metric| of the pretrained adapter
    evaluations: int = 0

    def metrics(self) -> list[str]:
        return sorted({m for o in OBJECTIVES for m in self.objectives[o]})

    def raw(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Mean metric values of an adapter's SR crops."""
        _set_weights(self.named, weights)
        sr, hq = [], []
        with torch.no_grad():
            for image_id, lq, target in zip(self.ids, self.lq, self.hq, strict=True):
                prompt, negative = self.texts[image_id] if self.texts else ("", None)
                out = self.model.sample(
                    lq[None].to(next(self.model.parameters()).device),
                    prompts=[prompt],
                    negative_prompts=None if negative is None else [negative],
                    steps=self.steps,
                    generators=[torch_generator(self.seed, "ea_fitness", image_id)],
                )
                sr.append(unit_tensor(signed_to_uint8(out[0])))  # measured as evaluate's PNGs
                hq.append(target)
        scores = score_images(self.metrics(), torch.stack(sr), torch.stack(hq), self.registry)
        self.evaluations += 1
        return {name: float(values.mean()) for name, values in scores.items()}

    def __call__(self, weights: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """(perception loss, fidelity loss) of an adapter: lower is better."""
        values = self.raw(weights)
        losses = []
        for objective in OBJECTIVES:
            score = 0.0
            for metric, weight in self.objectives[objective].items():
                sign = -1.0 if self.registry.info(metric).lower_better else 1.0
                score += float(weight) * sign * values[metric] / self.scale[metric]
            losses.append(-score)
        return losses[0], losses[1]


def fitness_subset(model: SRModel, named, data_dir, prompts_path, ea: dict, seed: int) -> Fitness:
    lq_paths, hq_paths = (
        contracts.data_images(data_dir, "lq"),
        contracts.data_images(data_dir, "hq"),
    )
    ids = sorted(set(lq_paths) & set(hq_paths))[: ea["fitness_images"]]
    if not ids:
        raise ValueError(f"{data_dir}: no LQ/HQ images for the EA-Adam fitness subset")
    lqs, hqs = [], []
    for image_id in ids:
        hq = read_rgb(hq_paths[image_id])
        lq = upsample_lq(signed_tensor(read_rgb(lq_paths[image_id]))[None], hq.shape[:2])[0]
        side = min(ea["fitness_crop"], *hq.shape[:2])
        side -= side % 8  # the latent grids of both codecs (VAE: 8, pixel: 4)
        if side < 8:
            raise ValueError(f"fitness image {image_id!r} is smaller than 8 px")
        top, left = (hq.shape[0] - side) // 2, (hq.shape[1] - side) // 2
        lqs.append(lq[:, top : top + side, left : left + side].contiguous())
        hqs.append(unit_tensor(hq[top : top + side, left : left + side]))
    texts = None
    if prompts_path is not None:
        texts, _ = guidance.stage_prompts(prompts_path, ids, where="train ea_adam fitness")
    objectives = ea["objectives"]
    missing = [o for o in OBJECTIVES if not (objectives or {}).get(o)]
    if missing:
        raise ValueError(
            f"ea_adam's fitness needs metric weights of {list(OBJECTIVES)} (train.ea_adam."
            f"objectives, or select.objectives in the workflow); missing {missing}"
        )
    score = ea["score"] or settings.resolve("score", {})
    registry = MetricRegistry(
        weights_dir=score.get("weights_dir"),
        weights=score.get("weights") or {},
        options=score.get("options") or {},
        device=score.get("device", "auto"),
        min_crop_size=score.get("min_crop_size", 32),
        seed=seed,
    )
    return Fitness(
        model,
        named,
        lqs,
        hqs,
        ids,
        texts,
        {o: dict(objectives[o]) for o in OBJECTIVES},
        registry,
        ea["fitness_steps"],
        seed,
    )


@dataclasses.dataclass
class Run:
    """What the Adam phase needs: one :class:`pipeline.training.offline.Trainer` per objective (its batches
    and draws are DSPO's on that table), the model, its trainable parameters, the optimizers."""

    trainers: dict[str, Trainer]
    model: SRModel
    named: dict[str, torch.nn.Parameter]
    optimizers: MemberOptimizers
    config: TrainConfig
    ea: dict
    seed: int
    accelerator: Any
    state: population.PopulationState
    fitness: Fitness
    last_good: Path | None = None

    def update(self, step: int) -> list[dict]:
        """One step of every member in order, then the EA phase when due; the members' rows."""
        rows = [self.step_member(self.state, i, step) for i in range(len(self.state.members))]
        self.state.step = step + 1
        if self.state.step % self.ea["ea_every"] == 0:
            ea = self.ea
            self.state = population.ea_phase(
                self.state,
                self.fitness,
                ea["ea_iterations"],
                protected=ea["protected_members"],
                p_crossover=ea["p_crossover"],
                p_mutation=ea["p_mutation"],
                p_global_mating=ea["p_global_mating"],
                eta=ea["sbx_eta"],
                mutation_rate=ea["mutation_rate"],
                mutation_sigma=ea["mutation_sigma"],
            )
            self.optimizers.reset()
        return rows

    def objective_gradients(self, objective: str, step: int) -> tuple[list, float]:
        """The gradient of one objective's DSPO loss at ``step`` (summed over micro-steps, each
        ``loss / gradient_accumulation_steps``, as train's backward accumulates) and the loss."""
        trainer, config = self.trainers[objective], self.config
        slots = step_slots(len(trainer.inputs.items), step, config.batch_size, self.seed)
        params = list(self.named.values())
        total, value = None, 0.0
        for micro in range(config.gradient_accumulation_steps):
            loaded, conditions = trainer.micro_batch(step, micro, slots)
            loss, _ = batch_loss(
                trainer.policy,
                self.model,
                loaded,
                conditions,
                LOSS_METHOD,
                config,
                autocast=self.accelerator.autocast,
            )
            checkpoints.check_finite(
                self.accelerator, loss, f"non-finite {objective} loss at step {step + 1}"
            )
            grads = torch.autograd.grad(
                loss / config.gradient_accumulation_steps, params, allow_unused=True
            )
            if total is None:
                total = list(grads)
            else:
                total = [
                    a if b is None else (b if a is None else a + b)
                    for a, b in zip(total, grads, strict=True)
                ]
            value += float(loss.detach()) / config.gradient_accumulation_steps
        return total, value

    def step_member(self, state: population.PopulationState, i: int, step: int) -> dict:
        config = self.config
        _set_weights(self.named, state.members[i])
        optimizer = self.optimizers.optimizers[i]
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        preference = tuple(float(w) for w in state.preferences[i].tolist())
        raw = not self.ea["normalise_one_hot"]
        pure = {(1.0, 0.0): 0, (0.0, 1.0): 1}.get(preference) if raw else None
        names = list(self.named)
        grads: list[dict] = [dict.fromkeys(names), dict.fromkeys(names)]
        values = [math.nan, math.nan]
        for k, objective in enumerate(OBJECTIVES):
            if pure is not None and k != pure:
                continue  # a one-hot member needs only its own objective's loss
            total, values[k] = self.objective_gradients(objective, step)
            grads[k] = dict(zip(names, total, strict=True))
        mixed = population.mix_gradients(grads[0], grads[1], preference, raw_if_one_hot=raw)
        for name, parameter in self.named.items():
            parameter.grad = mixed[name]
        grad_norm = checkpoints.total_norm(
            checkpoints.clip_gradients(
                self.accelerator, [list(self.named.values())], config.max_grad_norm
            )
        )
        checkpoints.check_finite(
            self.accelerator,
            grad_norm,
            f"non-finite gradient norm of member {i} at step {step + 1}",
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        checkpoints.check_finite(
            self.accelerator,
            checkpoints.weights_flag(self.named.values()),
            f"non-finite weights of member {i} after step {step + 1}",
        )
        state.members[i] = _weights(self.named)
        return {
            "step": step + 1,
            "member": i,
            "loss_perception": values[0],
            "loss_fidelity": values[1],
            "lr": lr,
            "grad_norm": grad_norm,
        }

    def fusion_loss(self, fused: Mapping[str, torch.Tensor], step: int, items: int) -> torch.Tensor:
        """``fusion_preference``-weighted DSPO losses of the fused adapter (functional), on the
        first ``items`` LQs of each table, draws keyed by steps after ``max_steps``."""
        config, total = self.config, None
        parameters = {f"model.{name}": value for name, value in fused.items()}
        draw_step = config.max_steps + step
        for weight, objective in zip(self.ea["fusion_preference"], OBJECTIVES, strict=True):
            if weight == 0:
                continue
            trainer = self.trainers[objective]
            subset = dataclasses.replace(
                trainer,
                inputs=dataclasses.replace(trainer.inputs, items=trainer.inputs.items[:items]),
            )
            slots = step_slots(len(subset.inputs.items), draw_step, config.batch_size, self.seed)

            def policy(loaded, conditions, _policy=trainer.policy):
                return torch.func.functional_call(_policy, parameters, (loaded, conditions))

            for micro in range(config.gradient_accumulation_steps):
                loaded, conditions = subset.micro_batch(draw_step, micro, slots)
                loss, _ = batch_loss(
                    policy,
                    self.model,
                    loaded,
                    conditions,
                    LOSS_METHOD,
                    config,
                    autocast=self.accelerator.autocast,
                )
                term = float(weight) * loss / config.gradient_accumulation_steps
                total = term if total is None else total + term
        return total


class EaAdamRun(MethodRun):
    """EA-Adam's part of the session: both objectives' pairs, the population (its state is the
    checkpoint's weights, its members' AdamW states the optimizer), the fusion and its files."""

    log_table = "ea_adam_log"
    log_columns = LOG_COLUMNS

    def settings(self, raw: Any) -> tuple[TrainConfig, dict[str, Any]]:
        return split_config(raw)

    def check(self) -> None:
        if self.accelerator.num_processes != 1:
            raise NotImplementedError("ea_adam trains in one process (set gpus.train to 1)")
        if self.accelerator.mixed_precision == "fp16":
            raise ValueError(
                "ea_adam takes its gradients outside fp16 loss scaling: use bf16 or no"
            )
        micro_batch_size(self.config, 1)

    def read_inputs(self) -> None:
        job = self.job
        self.paths = pairs_paths(job.pairs_path)
        self.inputs = {
            objective: read_inputs(
                LOSS_METHOD,
                path,
                job.candidates_path,
                job.data_dir,
                job.masks_path,
                job.prompts_path,
            )
            for objective, path in zip(OBJECTIVES, self.paths, strict=True)
        }

    def fingerprinted_pairs(self) -> Path:
        return self.paths[0]  # the perception table; fingerprint_run adds the fidelity table

    def fingerprint_run(self) -> checkpoints.Fingerprint:
        fingerprint = super().fingerprint_run()
        fields = dict(fingerprint.fields)
        fields["inputs"] = {
            **fields["inputs"],
            "pairs_fidelity": checkpoints.content_hash(self.paths[1]),
        }
        fields["ea_adam"] = {k: v for k, v in self.section.items() if k != "frameworks"}
        return checkpoints.Fingerprint(_canonical(fields))

    def make_optimizer(self) -> MemberOptimizers:
        return MemberOptimizers(self.trainable, self.section["population_size"], self.config)

    def build(self) -> Run:
        config, ea, seed, model = self.config, self.section, self.job.seed, self.model
        initial = _weights(self.named)
        state = population.init_population(
            initial,
            ea["population_size"],
            seed=seed,
            stage=STAGE,
            neighbourhood_size=ea["neighbourhood_size"],
        )
        policy = PolicyErrors(model)
        trainers = {
            o: Trainer(
                LOSS_METHOD,
                config,
                seed,
                self.inputs[o],
                self.accelerator,
                policy,
                model,
                None,
                self.trainable,
            )
            for o in OBJECTIVES
        }
        fitness = fitness_subset(
            model, self.named, self.job.data_dir, self.job.prompts_path, ea, seed
        )
        if ea["ea_every"] <= config.max_steps:  # the pretrained adapter's metric magnitudes
            fitness.scale = {m: max(abs(v), 1e-12) for m, v in fitness.raw(initial).items()}
        return Run(
            trainers,
            model,
            self.named,
            self.optimizer,
            config,
            ea,
            seed,
            self.accelerator,
            state,
            fitness,
        )

    def resume(self, path: Path) -> tuple[int, list[dict]]:
        flat = self.trainer.state.to_flat()
        done, log = checkpoints.load(path, flat, self.optimizer, self.fingerprint)
        self.trainer.state = population.PopulationState.from_flat(flat)
        if self.trainer.state.step != done:
            raise ValueError(f"checkpoint {path}: population at step {self.trainer.state.step}")
        extra = checkpoints.load_extra(path) or {}
        self.trainer.fitness.evaluations = int(extra.get("fitness_evaluations", 0))
        return done, log

    def prepare(self) -> None:
        """Nothing for accelerate: one process, gradients taken by torch.autograd.grad."""

    def checkpoint(self) -> dict[str, Any]:
        run = self.trainer
        return {
            "named": run.state.to_flat(),
            "optimizer": self.optimizer,
            "extra": {"fitness_evaluations": run.fitness.evaluations},
        }

    def description(self) -> str:
        return f"train {self.job.method} P={self.section['population_size']}"

    def finish(self) -> None:
        """Fusion: per-layer weights on the fixed members, then the static merge."""
        run, ea = self.trainer, self.section
        members = run.state.members
        self.layers = population.layer_names(members[0])
        if len(members) == 1:
            self.fusion_weights, self.fusion_history = torch.ones(len(self.layers), 1), []
        else:
            self.fusion_weights, self.fusion_history = population.learn_fusion_weights(
                members,
                lambda fused, s: run.fusion_loss(fused, s, ea["fusion_images"]),
                steps=ea["fusion_steps"],
                lr=ea["fusion_lr"],
                layers=self.layers,
            )
        self.fused = population.fuse_adapters(members, self.fusion_weights, self.layers)

    def metadata(self) -> dict[str, Any]:
        job, state, fitness = self.job, self.trainer.state, self.trainer.fitness
        return {
            "pairs": {o: str(p) for o, p in zip(OBJECTIVES, self.paths, strict=True)},
            "items": {o: len(self.inputs[o].items) for o in OBJECTIVES},
            "prompts": self.inputs[OBJECTIVES[0]].prompt_record,
            "ea_adam": self.section,
            "ea_rounds": state.ea_rounds,
            "fitness_evaluations": fitness.evaluations,
            "fitness_images": fitness.ids,
            "fitness_scale": fitness.scale,
            "fusion_loss": self.fusion_history,
            "fusion_layers": self.layers,
            "candidates": str(job.candidates_path),
            "masks": str(job.masks_path),
        }

    def write(self, folder: Path, metadata: dict[str, Any]) -> None:
        """The fused model, every member, the population table and state, and the log."""
        state, weights, rows = self.trainer.state, self.fusion_weights, []
        _set_weights(self.named, self.fused)
        self.model.save_pretrained(folder)
        for i, member in enumerate(state.members):
            _set_weights(self.named, member)
            self.model.save_pretrained(folder / contracts.MEMBERS_DIR / str(i))
            rows.append(
                {
                    "member": i,
                    "preference_perception": float(state.preferences[i, 0]),
                    "preference_fidelity": float(state.preferences[i, 1]),
                    "fitness_perception": float(state.fitness[i, 0]),
                    "fitness_fidelity": float(state.fitness[i, 1]),
                    "fusion_weight": float(weights[:, i].mean()),
                    "path": f"{contracts.MEMBERS_DIR}/{i}",
                }
            )
        save_file(state.to_flat(), folder / contracts.POPULATION_STATE)
        write_table(
            pd.DataFrame(rows),
            folder / contracts.POPULATION_TABLE,
            "population",
            {**metadata, "fusion_weights": weights.tolist()},
        )
        self.write_log(folder, metadata)


RUN = EaAdamRun
