"""The evaluated models as data (docs/design.md §12): :class:`ModelSpec`, and the models a
configuration evaluates (:func:`evaluated_models`) and compares by win rates
(:func:`winrate_models`).

Every evaluated model has a name: its evaluation folder ``eval/{framework}/{testset}/{name}``,
its rows in the metric tables and the report. The names:

- ``bicubic`` (the LQ upsampled) and ``pretrained`` (the framework's base model);
- ``{method}_{objective}[_nom2][_r{round}]``: a training run's model (a method of
  :data:`pipeline.contracts.METHODS`, ``dro_online_fidelity`` is dro_online's: the longest
  method wins). ``_nom2``: the M2-in-sampling ablation, the dspo model sampled without its
  feedback negatives (docs/prompts.md); ``_r{round}``: round r >= 2 of an iterating run
  (docs/design.md §14), round 1 having no suffix;
- ``ea_adam_front`` (EA-Adam's fused model, its run on objective
  :data:`pipeline.contracts.FRONT_OBJECTIVE`) and ``ea_adam_member{i}``, member i of its
  population (docs/ea_adam.md).

:attr:`ModelSpec.name` writes a name and :meth:`ModelSpec.parse` reads one; no other module
builds, splits or prefix-matches a name (tests/test_model_names.py checks the package and the
rules). The workflow (``workflow/rules/common.smk``, ``winrates_inputs.smk``), the planner, the
report and the annotation tool use the specs. Shared module (no stage).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import contracts, rounds, settings

#: the kinds of evaluated model
BICUBIC = "bicubic"  # the LQ upsampled (the evaluate CLI's --model bicubic)
PRETRAINED = "pretrained"  # the framework's base model, before alignment
ALIGNED = "aligned"  # a training run's model
MEMBER = "member"  # a member of EA-Adam's population
KINDS = (BICUBIC, PRETRAINED, ALIGNED, MEMBER)
#: the pretrained variant each framework aligns and evaluates as ``pretrained``
BASE_VARIANT = "base"
#: the method whose models sample with their training pairs' feedback vocabulary (M2 in
#: sampling, docs/prompts.md): the one with a ``_nom2`` ablation; and its M1-only ablation
#: (trained without the feedback), Table 2's other ablation row
DSPO = "dspo"
DSPO_M1 = "dspo_m1"
#: the multi-objective method: one run per framework on FRONT_OBJECTIVE, whose population's
#: members are evaluated beside its fused model (docs/ea_adam.md)
EA_ADAM = "ea_adam"
#: frameworks whose sampling has guidance (multi-step): the only ones with the ``_nom2``
#: ablation (one-step sampling ignores negative prompts: the ablation would repeat dspo's images)
GUIDED_SAMPLING = ("multistep",)
#: the ablations a model can be (:attr:`ModelSpec.ablation`): trained without the feedback
#: (dspo_m1, M1 only), sampled without it (``_nom2``)
M1_ONLY = "m1_only"
NO_M2 = "no_m2"

_NO_M2_SUFFIX = "_nom2"
_MEMBER_WORD = "member"
_ROUND_SUFFIX = re.compile(r"(?P<rest>.+)_r(?P<round>[0-9]+)")
_MEMBER_NAME = re.compile(_MEMBER_WORD + r"(?P<index>[0-9]+)")


def _method_of(name: str) -> str | None:
    """The longest method ``m`` of :data:`pipeline.contracts.METHODS` such that ``name`` starts
    with ``{m}_`` (method names hold underscores: ``dspo_m1_x`` is dspo_m1's); None if none."""
    return max((m for m in contracts.METHODS if name.startswith(f"{m}_")), key=len, default=None)


@dataclass(frozen=True)
class ModelSpec:
    """One evaluated model. ``kind``: one of :data:`KINDS`; for ``aligned`` and ``member``, the
    ``method`` and ``objective`` of the training run, its ``round`` (1: the DAG without rounds)
    and ``feedback`` (False: the ``_nom2`` ablation, a dspo model sampled without its feedback
    negatives); ``member``: the population index of an ea_adam member."""

    kind: str
    method: str | None = None
    objective: str | None = None
    feedback: bool = True
    round: int = 1
    member: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {KINDS}")
        if self.kind in (BICUBIC, PRETRAINED):
            fields = (self.method, self.objective, self.member, self.round, self.feedback)
            if fields != (None, None, None, 1, True):
                raise ValueError(f"{self.kind} has no method, objective, round, member or ablation")
            return
        if self.method not in contracts.METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {sorted(contracts.METHODS)}")
        objective = self.objective
        if not isinstance(objective, str) or not objective or "/" in objective:
            raise ValueError(f"objective {objective!r} is not a name")
        if _method_of(f"{self.method}_{objective}") != self.method:
            raise ValueError(
                f"{self.method} objective {objective!r} would read as another method's"
            )
        if _ROUND_SUFFIX.fullmatch(objective) or objective.endswith(_NO_M2_SUFFIX):
            raise ValueError(f"objective {objective!r} would read as a round or an ablation")
        if self.method == EA_ADAM and objective != contracts.FRONT_OBJECTIVE:
            raise ValueError(
                f"{EA_ADAM} runs on objective {contracts.FRONT_OBJECTIVE!r}, not {objective!r}"
            )
        if not isinstance(self.round, int) or self.round < 1:
            raise ValueError(f"round {self.round!r} is not a round (1, 2, ...)")
        if not self.feedback and self.method != DSPO:
            raise ValueError(
                f"{self.method} samples without feedback negatives: it has no ablation"
            )
        if self.kind == MEMBER:
            if self.method != EA_ADAM or not self.feedback or self.round != 1:
                raise ValueError(f"a member is one of {EA_ADAM}'s run (no round, no ablation)")
            if not isinstance(self.member, int) or self.member < 0:
                raise ValueError(f"member index {self.member!r} is not an index (0, 1, ...)")
        elif self.member is not None:
            raise ValueError(f"a {self.kind} model has no member index")

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def bicubic(cls) -> ModelSpec:
        return cls(BICUBIC)

    @classmethod
    def pretrained(cls) -> ModelSpec:
        return cls(PRETRAINED)

    @classmethod
    def aligned(
        cls, method: str, objective: str, round: int = 1, feedback: bool = True
    ) -> ModelSpec:
        """A training run's model after round ``round`` (``feedback`` False: dspo's ``_nom2``)."""
        return cls(ALIGNED, method, objective, feedback, round)

    @classmethod
    def ea_adam_front(cls) -> ModelSpec:
        """EA-Adam's fused model: its run's aligned model."""
        return cls.aligned(EA_ADAM, contracts.FRONT_OBJECTIVE)

    @classmethod
    def ea_adam_member(cls, index: int) -> ModelSpec:
        return cls(MEMBER, EA_ADAM, contracts.FRONT_OBJECTIVE, member=index)

    # -- names -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The evaluation name (see the module docstring)."""
        if self.kind in (BICUBIC, PRETRAINED):
            return self.kind
        if self.kind == MEMBER:
            return f"{self.method}_{_MEMBER_WORD}{self.member}"
        name = f"{self.method}_{self.objective}{'' if self.feedback else _NO_M2_SUFFIX}"
        return name if self.round == 1 else f"{name}_r{self.round}"

    @classmethod
    def parse(cls, name: str) -> ModelSpec:
        """The spec of an evaluation name: the one place a name is split. A ValueError naming
        the name for anything :attr:`name` does not write (``dspo_fidelity_r1``: round 1 has
        no suffix)."""
        if name in (BICUBIC, PRETRAINED):
            return cls(name)
        method = _method_of(name) if isinstance(name, str) else None
        if method is None:
            raise ValueError(
                f"model name {name!r}: not {BICUBIC!r}, {PRETRAINED!r} nor {{method}}_{{objective}}"
                f" of a method of {sorted(contracts.METHODS)}"
            )
        rest = name[len(method) + 1 :]
        try:
            member = _MEMBER_NAME.fullmatch(rest)
            if method == EA_ADAM and member:
                spec = cls.ea_adam_member(int(member["index"]))
            else:
                round_number = 1
                suffix = _ROUND_SUFFIX.fullmatch(rest)
                if suffix:
                    rest, round_number = suffix["rest"], int(suffix["round"])
                feedback = not rest.endswith(_NO_M2_SUFFIX)
                objective = rest if feedback else rest[: -len(_NO_M2_SUFFIX)]
                spec = cls.aligned(method, objective, round_number, feedback)
        except ValueError as error:
            raise ValueError(f"model name {name!r}: {error}") from None
        if spec.name != name:
            raise ValueError(f"model name {name!r} is written {spec.name!r}")
        return spec

    # -- what the model is -----------------------------------------------------------------

    @property
    def base(self) -> ModelSpec:
        """Round 1's model of the same run (the spec itself for round 1)."""
        return dataclasses.replace(self, round=1)

    @property
    def ablation(self) -> str | None:
        """:data:`M1_ONLY` (a dspo_m1 model), :data:`NO_M2` (``_nom2``) or None: Table 2's
        ablation rows."""
        if self.method == DSPO_M1:
            return M1_ONLY
        return None if self.feedback else NO_M2

    @property
    def is_ablation(self) -> bool:
        return self.ablation is not None

    def ablations(self) -> list[ModelSpec]:
        """Table 2's ablations of a dspo model (same objective and round): its dspo_m1 model
        and its ``_nom2`` sampling; none for any other model."""
        if self.kind != ALIGNED or self.method != DSPO or not self.feedback:
            return []
        m1 = ModelSpec.aligned(DSPO_M1, self.objective, self.round)
        return [m1, dataclasses.replace(self, feedback=False)]

    @property
    def reads_feedback(self) -> bool:
        """Whether evaluate samples it with its training pairs' feedback vocabulary (M2)."""
        return self.kind == ALIGNED and self.method == DSPO and self.feedback

    # -- its files (pipeline.contracts) ----------------------------------------------------

    def source_artifact(self, framework: str) -> str | None:
        """The rule output the model comes from: the base model (pretrained), the run's
        aligned folder of its round (an ea_adam member: the run's folder, which holds the
        population); None for bicubic."""
        if self.kind == BICUBIC:
            return None
        if self.kind == PRETRAINED:
            return contracts.artifact("model", framework=framework, variant=BASE_VARIANT)
        return contracts.aligned_artifact(framework, self.method, self.objective, self.round)

    def model_folder(self, framework: str) -> str | None:
        """The folder evaluate loads: :meth:`source_artifact`, but an ea_adam member's own
        folder inside its run's."""
        if self.kind == MEMBER:
            return contracts.artifact(
                "population_member",
                framework=framework,
                method=self.method,
                objective=self.objective,
                member=self.member,
            )
        return self.source_artifact(framework)

    def feedback_pairs(self, framework: str) -> list[str]:
        """The pairs tables whose feedback vocabulary joins the negative prompts in sampling
        (:attr:`reads_feedback`: the run's training pairs of its round); [] otherwise."""
        if not self.reads_feedback:
            return []
        return contracts.train_pairs_artifacts(framework, self.objective, self.method, self.round)


def parse_or_none(name: str) -> ModelSpec | None:
    """:meth:`ModelSpec.parse`, None for a name it refuses (the report's and the annotation
    tool's models may be any folder name)."""
    try:
        return ModelSpec.parse(name)
    except ValueError:
        return None


# -- the models of a configuration (the workflow's and the planner's) --------------------------


def _configured(config: Mapping[str, Any], key: str) -> list[str]:
    value = config.get(key)
    return list(value if value is not None else settings.schema_node(key)["default"])


def ea_adam_models(config: Mapping[str, Any], framework: str) -> list[ModelSpec]:
    """The fused model and every member of ea_adam's run on ``framework``; none where it does
    not run (not configured, or ``train.ea_adam.frameworks`` leaves the framework out)."""
    if EA_ADAM not in _configured(config, "methods"):
        return []
    ea_adam = settings.ea_adam_settings(config, (config.get("train") or {}).get(EA_ADAM))
    chosen = ea_adam["frameworks"]
    if chosen is not None and framework not in chosen:
        return []
    members = range(ea_adam["population_size"])
    return [ModelSpec.ea_adam_front(), *(ModelSpec.ea_adam_member(i) for i in members)]


def evaluated_models(config: Mapping[str, Any], framework: str) -> list[ModelSpec]:
    """Every model the evaluation of ``framework`` has, in order: bicubic, pretrained, every
    method's model per objective (ea_adam: its front and members), dspo's ``_nom2`` ablation per
    objective (guided sampling only), then each later round's model (docs/design.md §14)."""
    methods, objectives = _configured(config, "methods"), _configured(config, "objectives")
    aligned = [ModelSpec.aligned(m, o) for m in methods if m != EA_ADAM for o in objectives]
    ablations = [
        ModelSpec.aligned(DSPO, o, feedback=False)
        for o in objectives
        if DSPO in methods and framework in GUIDED_SAMPLING
    ]
    later = [ModelSpec.aligned(m, o, r) for m, o, r in rounds.runs(config)]
    return [
        ModelSpec.bicubic(),
        ModelSpec.pretrained(),
        *aligned,
        *ea_adam_models(config, framework),
        *ablations,
        *later,
    ]


def winrate_models(config: Mapping[str, Any], framework: str) -> list[ModelSpec]:
    """The evaluated models the win rates compare with the pretrained one: trained models (no
    ``_nom2`` ablation) whose objective is automatic (``select.objectives``)."""
    automatic = settings.resolve("select", config.get("select"))["objectives"]
    return [
        spec
        for spec in evaluated_models(config, framework)
        if spec.kind in (ALIGNED, MEMBER) and spec.feedback and spec.objective in automatic
    ]
