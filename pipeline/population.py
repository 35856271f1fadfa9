"""EA-Adam's algorithmic core on a population of LoRA adapters (docs/ea_adam.md).

EA-Adam (``csslc/EA-Adam``; ``../shared/reference/dro-and-ea-adam.md`` part B) trains a
population of P models, member i with a fixed preference vector over two objectives, by
alternating an Adam phase (each member steps on the preference-weighted sum of the per-tensor
L2-normalised gradients of the objectives) with an evolutionary (EA) phase in weight space
(MOEA/D: SBX crossover, Gaussian mutation, normalised-Tchebycheff replacement of neighbours),
and then fuses the population into one model by a layer-wise weighted sum.

Everything here is a plain function on torch tensors or on *adapter state dicts*
(``dict[str, Tensor]``, parameter name -> tensor, e.g. a PEFT LoRA state dict with keys
``...to_q.lora_A.weight`` of shape ``[r, in]`` and ``...to_q.lora_B.weight`` of shape
``[out, r]``). Nothing touches a model, a file or the global RNG: every random draw comes
from a ``torch.Generator`` passed in (CPU, as :func:`pipeline.seeding.torch_generator`
makes them), so the draws do not depend on the device the weights live on.

Conventions used throughout:

* objective order: index 0 = **perception**, index 1 = **fidelity**; a preference vector is
  ``(w_perception, w_fidelity)`` with ``w >= 0`` and ``w_perception + w_fidelity = 1``;
* fitness values are **losses (lower is better)**, as EA-Adam's (L1, VGG) are: the
  Tchebycheff aggregation, the ideal point (per-objective minimum) and the nadir point
  (per-objective maximum) are defined for minimisation. Scores where higher is better (PSNR,
  an objective score of the select stage) are negated first with :func:`to_minimisation`;
  :func:`pareto_mask` takes the direction of each column explicitly.
* the tensors of a state dict are visited in **sorted key order**, so the draws do not depend
  on how the dict was built (the release visits ``state_dict()`` order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.seeding import torch_generator

StateDict = dict[str, torch.Tensor]

#: SBX distribution index (release: exponent 1/21 = 1/(eta+1), ``EA_operator/gen.py``)
SBX_ETA = 20.0
#: probability that a member's child is made by crossover (release ``pCrossover``)
P_CROSSOVER = 0.9
#: probability that the child is then mutated (release ``pMutation``)
P_MUTATION = 0.2
#: probability that the mate is drawn from the whole population, not the neighbourhood
P_GLOBAL_MATING = 0.3
#: per-element mutation probability (release ``mu``)
MUTATION_RATE = 0.02
#: standard deviation of the Gaussian mutation noise (release, hard-coded in ``gen_mut``)
MUTATION_SIGMA = 0.03
#: added to each per-tensor gradient norm (release ``optimizer/norm_grd.py``)
GRAD_NORM_EPS = 1e-7
#: added to ``nadir - ideal`` in the normalised Tchebycheff function (release)
TCHEBYCHEFF_EPS = 1e-5
#: neighbourhood size T: the release's ``neighborsize = 1`` gives {i-1, i, i+1}
NEIGHBOURHOOD_SIZE = 3
#: flat-dict format of :class:`PopulationState`
STATE_FORMAT = 1


# -- preferences and neighbourhoods ----------------------------------------------------------------


def preference_vectors(size: int) -> torch.Tensor:
    """``size`` preference vectors evenly spaced from perception ``(1, 0)`` to fidelity ``(0, 1)``.

    Returns a float64 tensor ``[size, 2]``: row i is ``(1 - i/(size-1), i/(size-1))`` (the
    release's ``uniform_point(popsize, [1, 0], [0, 1])``, transposed); a population of one
    gets ``(1, 0)``.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"population size must be a positive integer, got {size!r}")
    size = int(size)
    if size == 1:
        return torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    second = torch.tensor([i / (size - 1) for i in range(size)], dtype=torch.float64)
    return torch.stack([1.0 - second, second], dim=1)


def neighbourhoods(preferences: torch.Tensor, size: int = NEIGHBOURHOOD_SIZE) -> torch.Tensor:
    """MOEA/D neighbourhoods: for each member the ``size`` members whose preference vectors are
    nearest by Euclidean distance, itself included.

    ``preferences``: ``[P, 2]``. Returns an int64 tensor ``[P, size]``, row i sorted by distance
    from member i (so ``row[0] == i``), ties broken by the lower index. With evenly spaced
    vectors and ``size = 3`` this is the release's ``B``: {0,1,2}, {i-1,i,i+1}, {P-3,P-2,P-1}.
    """
    if preferences.ndim != 2 or preferences.shape[1] != 2:
        raise ValueError(f"preferences must have shape [P, 2], got {tuple(preferences.shape)}")
    members = preferences.shape[0]
    if int(size) != size or not 1 <= size <= members:
        raise ValueError(f"neighbourhood size must be in [1, {members}] (population), got {size!r}")
    points = preferences.to(torch.float64)
    distances = torch.cdist(points, points)
    # round so that equal distances computed with different rounding stay ties
    distances = torch.round(distances * 1e9) / 1e9
    order = torch.sort(distances, dim=1, stable=True).indices
    return order[:, : int(size)].contiguous()


# -- gradient mixing (Adam phase) ------------------------------------------------------------------


def normalised_gradient(gradient: torch.Tensor, eps: float = GRAD_NORM_EPS) -> torch.Tensor:
    """``gradient / (||gradient||_2 + eps)``, the norm over the whole tensor (any shape)."""
    return gradient / (torch.linalg.vector_norm(gradient) + eps)


def _check_preference(preference: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    values = [
        float(v) for v in (preference.tolist() if torch.is_tensor(preference) else preference)
    ]
    if len(values) != 2:
        raise ValueError(f"a preference is (w_perception, w_fidelity), got {values}")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"preference weights must be finite and non-negative, got {values}")
    return values[0], values[1]


def _one_hot(weights: tuple[float, float]) -> int | None:
    if weights == (1.0, 0.0):
        return 0
    if weights == (0.0, 1.0):
        return 1
    return None


def mix_gradients(
    perception: Mapping[str, torch.Tensor | None],
    fidelity: Mapping[str, torch.Tensor | None],
    preference: Sequence[float] | torch.Tensor,
    *,
    eps: float = GRAD_NORM_EPS,
    raw_if_one_hot: bool = True,
) -> dict[str, torch.Tensor | None]:
    """EA-Adam's gradient for one member: per parameter tensor,
    ``w_p * g_p / (||g_p||_2 + eps) + w_f * g_f / (||g_f||_2 + eps)``.

    ``perception`` / ``fidelity``: parameter name -> gradient of that objective's loss (any
    shape, the parameter's; ``None`` where the loss does not depend on it, which contributes
    nothing). Both must have the same names and shapes. The norm is the L2 norm of the whole
    tensor (the release's ``normalized_gradient(use_norm=True, norm_conv_only=False)``), so each
    objective contributes a unit-norm direction per tensor and ``preference`` sets the mix.

    With ``raw_if_one_hot`` (default) a one-hot preference, ``(1, 0)`` or ``(0, 1)``, returns that
    objective's gradient unnormalised (a clone, the same bits), so a pure member trains exactly
    like single-objective DSPO; the release normalises there too (pass ``False`` for that).
    Returns name -> mixed gradient (``None`` where both are ``None``).
    """
    weights = _check_preference(preference)
    if set(perception) != set(fidelity):
        missing = sorted(set(perception) ^ set(fidelity))
        raise ValueError(f"the two objectives' gradients name different parameters: {missing}")
    pure = _one_hot(weights) if raw_if_one_hot else None
    mixed: dict[str, torch.Tensor | None] = {}
    for name in perception:
        grads = (perception[name], fidelity[name])
        if grads[0] is not None and grads[1] is not None and grads[0].shape != grads[1].shape:
            raise ValueError(
                f"gradient shapes differ for {name!r}: {tuple(grads[0].shape)} vs "
                f"{tuple(grads[1].shape)}"
            )
        if pure is not None:
            mixed[name] = None if grads[pure] is None else grads[pure].clone()
            continue
        total = None
        for weight, grad in zip(weights, grads, strict=True):
            if grad is None:
                continue
            term = weight * normalised_gradient(grad, eps)
            total = term if total is None else total + term
        mixed[name] = total
    return mixed


def set_preference_gradients(
    parameters: Mapping[str, torch.nn.Parameter],
    loss_perception: torch.Tensor | None,
    loss_fidelity: torch.Tensor | None,
    preference: Sequence[float] | torch.Tensor,
    *,
    eps: float = GRAD_NORM_EPS,
    raw_if_one_hot: bool = True,
) -> None:
    """Set ``p.grad`` of every parameter to :func:`mix_gradients` of the two scalar losses.

    ``parameters``: name -> trainable parameter (the member's adapter). A one-hot preference
    with ``raw_if_one_hot`` needs only its own loss (the other may be ``None`` and is not
    differentiated); otherwise both are required. Previous ``.grad`` values are overwritten.
    """
    weights = _check_preference(preference)
    names = list(parameters)
    params = [parameters[name] for name in names]
    pure = _one_hot(weights) if raw_if_one_hot else None
    losses = (loss_perception, loss_fidelity)
    needed = [pure] if pure is not None else [0, 1]
    grads: list[dict[str, torch.Tensor | None]] = [dict.fromkeys(names), dict.fromkeys(names)]
    for k in needed:
        loss = losses[k]
        if loss is None:
            objective = ("perception", "fidelity")[k]
            raise ValueError(f"preference {weights} needs the {objective} loss, got None")
        if loss.ndim != 0:
            raise ValueError(f"losses must be scalars, got shape {tuple(loss.shape)}")
    for k in needed:
        values = torch.autograd.grad(
            losses[k], params, retain_graph=k != needed[-1], allow_unused=True
        )
        grads[k] = dict(zip(names, values, strict=True))
    mixed = mix_gradients(grads[0], grads[1], weights, eps=eps, raw_if_one_hot=raw_if_one_hot)
    for name, param in zip(names, params, strict=True):
        param.grad = mixed[name]


# -- EA operators ----------------------------------------------------------------------------------


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError("EA draws use a CPU generator (pipeline.seeding.torch_generator)")


def _check_same_keys(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> None:
    if set(first) != set(second):
        raise ValueError(f"state dicts differ in keys: {sorted(set(first) ^ set(second))}")
    for key in first:
        if first[key].shape != second[key].shape:
            raise ValueError(
                f"{key!r}: shapes differ, {tuple(first[key].shape)} vs {tuple(second[key].shape)}"
            )


def sbx_beta(u: float, eta: float = SBX_ETA) -> float:
    """SBX spread factor from one uniform draw ``u`` in [0, 1):
    ``(2u)^(1/(eta+1))`` if ``u < 0.5`` else ``(2 - 2u)^(-1/(eta+1))``."""
    exponent = 1.0 / (eta + 1.0)
    return (2.0 * u) ** exponent if u < 0.5 else (2.0 - 2.0 * u) ** (-exponent)


def sbx_crossover(
    parent: Mapping[str, torch.Tensor],
    mate: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    *,
    eta: float = SBX_ETA,
) -> StateDict:
    """Simulated binary crossover of two state dicts, as released: ONE spread factor per tensor.

    For each floating-point tensor, in sorted key order, one ``u ~ U[0, 1)`` is drawn
    (``torch.rand(1, dtype=float64, generator=generator)``), ``beta = sbx_beta(u, eta)`` and the
    child is ``0.5 * ((1 + beta) * parent + (1 - beta) * mate)`` (computed in float64, cast back
    to the parent's dtype). Every tensor is crossed (per-gene probability 1, a gene being a
    tensor); only the first of SBX's two children is made, as the release uses only that one.
    Non-floating tensors are copied from ``parent``. Inputs are not modified.
    """
    _check_generator(generator)
    _check_same_keys(parent, mate)
    if eta < 0:
        raise ValueError(f"SBX distribution index must be >= 0, got {eta}")
    child: StateDict = {}
    for key in sorted(parent):
        p1 = parent[key]
        if not p1.is_floating_point():
            child[key] = p1.clone()
            continue
        u = float(torch.rand(1, dtype=torch.float64, generator=generator))
        beta = sbx_beta(u, eta)
        p2 = mate[key].to(device=p1.device)
        mixed = 0.5 * ((1.0 + beta) * p1.double() + (1.0 - beta) * p2.double())
        child[key] = mixed.to(p1.dtype)
    return child


def _is_weight(key: str) -> bool:
    return key.endswith("weight")


def gaussian_mutation(
    state: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    *,
    rate: float = MUTATION_RATE,
    sigma: float = MUTATION_SIGMA,
    keys: Callable[[str], bool] = _is_weight,
) -> StateDict:
    """Gaussian mutation, as released (``gen_mut`` type ``simple``, ``only_conv=True``).

    For each floating tensor whose key satisfies ``keys`` (default: ends in ``weight``, which
    every LoRA factor does; the release mutates ``weight`` tensors only), in sorted key order:
    ``u = torch.rand(shape)`` then ``z = torch.randn(shape)`` (both float32, from ``generator``)
    and ``child = w + where(u < rate, sigma * z, 0)`` (the noise cast to ``w``'s dtype). So each
    element is perturbed with probability ``rate`` by ``N(0, sigma^2)``. Other tensors are copied.
    """
    _check_generator(generator)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"mutation rate must be in [0, 1], got {rate}")
    if sigma < 0:
        raise ValueError(f"mutation sigma must be >= 0, got {sigma}")
    child: StateDict = {}
    for key in sorted(state):
        value = state[key]
        if not (value.is_floating_point() and keys(key)):
            child[key] = value.clone()
            continue
        u = torch.rand(value.shape, generator=generator, dtype=torch.float32)
        z = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        delta = torch.where(u < rate, z * sigma, torch.zeros_like(z))
        child[key] = value + delta.to(device=value.device, dtype=value.dtype)
    return child


# -- Tchebycheff, replacement, Pareto --------------------------------------------------------------


def to_minimisation(values: torch.Tensor, higher_is_better: Sequence[bool]) -> torch.Tensor:
    """Objective values ``[..., K]`` as losses: columns where higher is better are negated."""
    if values.shape[-1] != len(higher_is_better):
        raise ValueError(
            f"{values.shape[-1]} objectives but {len(higher_is_better)} higher_is_better flags"
        )
    sign = torch.tensor([-1.0 if h else 1.0 for h in higher_is_better], dtype=torch.float64)
    return values.to(torch.float64) * sign


def tchebycheff(
    losses: torch.Tensor,
    preference: torch.Tensor,
    ideal: torch.Tensor,
    nadir: torch.Tensor,
    eps: float = TCHEBYCHEFF_EPS,
) -> torch.Tensor:
    """Normalised Tchebycheff aggregation (minimisation), as released:
    ``g = max_k w_k * |f_k - ideal_k| / (nadir_k - ideal_k + eps)``.

    ``losses``: ``[..., K]`` (lower is better); ``preference``: ``[..., K]`` (broadcast);
    ``ideal`` / ``nadir``: ``[K]``, the per-objective minimum / maximum seen. Returns ``[...]``
    in float64; lower is better.
    """
    losses, preference = losses.to(torch.float64), preference.to(torch.float64)
    ideal, nadir = ideal.to(torch.float64), nadir.to(torch.float64)
    if torch.isnan(ideal).any() or torch.isnan(nadir).any():
        raise ValueError("ideal/nadir points are not set (run reference_points first)")
    scaled = preference * (losses - ideal).abs() / (nadir - ideal + eps)
    return scaled.max(dim=-1).values


def reference_points(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ideal (per-objective minimum) and nadir (maximum) of ``losses`` ``[N, K]``, float64 ``[K]``.

    The release sets both from the population at the start of every EA phase."""
    if losses.ndim != 2 or losses.shape[0] == 0:
        raise ValueError(f"losses must have shape [N>0, K], got {tuple(losses.shape)}")
    if not torch.isfinite(losses).all():
        raise ValueError("losses must be finite")
    losses = losses.to(torch.float64)
    return losses.min(dim=0).values, losses.max(dim=0).values


def update_reference_points(
    ideal: torch.Tensor, nadir: torch.Tensor, losses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ideal and nadir after seeing one more point ``losses`` ``[K]`` (the release updates both
    with each child's fitness before the replacement test)."""
    if not torch.isfinite(losses).all():
        raise ValueError(f"fitness must be finite, got {losses.tolist()}")
    losses = losses.to(torch.float64)
    return torch.minimum(ideal.to(torch.float64), losses), torch.maximum(
        nadir.to(torch.float64), losses
    )


def replacements(
    member_losses: torch.Tensor,
    preferences: torch.Tensor,
    neighbourhood: torch.Tensor | Sequence[int],
    child_losses: torch.Tensor,
    ideal: torch.Tensor,
    nadir: torch.Tensor,
    *,
    protected: Iterable[int] = (),
    eps: float = TCHEBYCHEFF_EPS,
) -> list[int]:
    """The neighbours a child replaces (MOEA/D rule, as released): every ``j`` in
    ``neighbourhood`` with ``g_j(child) < g_j(member j)`` (strictly), ``g_j`` the normalised
    Tchebycheff function with member j's preference and the given ideal/nadir points.

    ``member_losses``: ``[P, K]`` current fitness (losses); ``preferences``: ``[P, K]``;
    ``child_losses``: ``[K]``; ``ideal``/``nadir``: ``[K]`` already updated with the child.
    ``protected`` members (e.g. an anchor) are never replaced. Returns the indices in
    neighbourhood order; several (all) neighbours may be replaced.
    """
    rows = [
        int(j)
        for j in (neighbourhood.tolist() if torch.is_tensor(neighbourhood) else neighbourhood)
    ]
    keep = {int(j) for j in protected}
    chosen = []
    child_losses = child_losses.to(torch.float64)
    for j in rows:
        if j in keep:
            continue
        child = tchebycheff(child_losses, preferences[j], ideal, nadir, eps)
        current = tchebycheff(member_losses[j], preferences[j], ideal, nadir, eps)
        if child < current:
            chosen.append(j)
    return chosen


def pareto_mask(
    points: torch.Tensor, higher_is_better: Sequence[bool] = (True, True)
) -> torch.Tensor:
    """The non-dominated points of ``points`` ``[N, K]`` (e.g. columns (perception, fidelity)).

    Point i is dominated if some j is at least as good in every objective and strictly better in
    one (direction per column from ``higher_is_better``). Returns a bool tensor ``[N]``; equal
    points do not dominate each other, so duplicates on the front are all kept.
    """
    if points.ndim != 2 or points.shape[1] != len(higher_is_better):
        raise ValueError(
            f"points must have shape [N, {len(higher_is_better)}], got {tuple(points.shape)}"
        )
    if torch.isnan(points).any():
        raise ValueError("points must not contain NaN")
    losses = to_minimisation(points, higher_is_better)
    no_worse = (losses[:, None, :] <= losses[None, :, :]).all(dim=-1)  # [j, i]: j <= i everywhere
    better = (losses[:, None, :] < losses[None, :, :]).any(dim=-1)
    dominated = (no_worse & better).any(dim=0)
    return ~dominated


# -- population state ------------------------------------------------------------------------------


@dataclass
class PopulationState:
    """Everything the EA needs to continue bit-identically.

    ``members``: P adapter state dicts, same keys and shapes; ``preferences``: float64 ``[P, 2]``
    (perception, fidelity); ``neighbours``: int64 ``[P, T]`` (:func:`neighbourhoods`);
    ``fitness``: float64 ``[P, 2]`` losses (lower is better; NaN until evaluated);
    ``ideal``/``nadir``: float64 ``[2]`` (NaN until the first EA phase); ``step``: Adam steps
    taken (the caller advances it); ``ea_rounds``: EA phases done; ``generators``: name -> CPU
    ``torch.Generator`` (``"ea"`` draws every EA operator; a caller may add its own).
    """

    members: list[StateDict]
    preferences: torch.Tensor
    neighbours: torch.Tensor
    fitness: torch.Tensor
    ideal: torch.Tensor
    nadir: torch.Tensor
    step: int = 0
    ea_rounds: int = 0
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = len(self.members)
        if size == 0:
            raise ValueError("a population needs at least one member")
        for member in self.members[1:]:
            _check_same_keys(self.members[0], member)
        shapes = {
            "preferences": (self.preferences, (size, 2)),
            "fitness": (self.fitness, (size, 2)),
            "ideal": (self.ideal, (2,)),
            "nadir": (self.nadir, (2,)),
        }
        for name, (value, shape) in shapes.items():
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if self.neighbours.ndim != 2 or self.neighbours.shape[0] != size:
            raise ValueError(
                f"neighbours must have shape [{size}, T], got {tuple(self.neighbours.shape)}"
            )
        if self.neighbours.numel() and not (
            int(self.neighbours.min()) >= 0 and int(self.neighbours.max()) < size
        ):
            raise ValueError("neighbours index outside the population")
        for generator in self.generators.values():
            _check_generator(generator)

    @property
    def size(self) -> int:
        return len(self.members)

    def copy(self) -> PopulationState:
        """A copy whose lists, dicts, tensors of the state and generators are new; the member
        tensors are shared (no function here modifies a tensor in place)."""
        return PopulationState(
            members=[dict(member) for member in self.members],
            preferences=self.preferences.clone(),
            neighbours=self.neighbours.clone(),
            fitness=self.fitness.clone(),
            ideal=self.ideal.clone(),
            nadir=self.nadir.clone(),
            step=self.step,
            ea_rounds=self.ea_rounds,
            generators={name: _clone_generator(g) for name, g in self.generators.items()},
        )

    def to_flat(self) -> dict[str, torch.Tensor]:
        """A flat dict of contiguous CPU tensors (for ``safetensors.torch.save_file``).

        Keys: ``member.{i:04d}.{key}``, ``preferences``, ``neighbours``, ``fitness``, ``ideal``,
        ``nadir``, ``step``, ``ea_rounds``, ``format`` (int64 scalars) and
        ``generator.{name}`` (uint8, ``Generator.get_state()``)."""
        flat: dict[str, torch.Tensor] = {}
        for i, member in enumerate(self.members):
            for key, value in member.items():
                flat[f"member.{i:04d}.{key}"] = value.detach().to("cpu").contiguous().clone()
        for name in ("preferences", "neighbours", "fitness", "ideal", "nadir"):
            flat[name] = getattr(self, name).detach().to("cpu").contiguous().clone()
        flat["step"] = torch.tensor(int(self.step), dtype=torch.int64)
        flat["ea_rounds"] = torch.tensor(int(self.ea_rounds), dtype=torch.int64)
        flat["format"] = torch.tensor(STATE_FORMAT, dtype=torch.int64)
        for name, generator in self.generators.items():
            flat[f"generator.{name}"] = generator.get_state().clone()
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, torch.Tensor]) -> PopulationState:
        """Inverse of :meth:`to_flat`; unknown or missing keys raise ValueError."""
        required = ("preferences", "neighbours", "fitness", "ideal", "nadir", "step", "ea_rounds")
        missing = [key for key in (*required, "format") if key not in flat]
        if missing:
            raise ValueError(f"not a population state: missing {missing}")
        if int(flat["format"]) != STATE_FORMAT:
            raise ValueError(
                f"population state format {int(flat['format'])}, expected {STATE_FORMAT}"
            )
        members: dict[int, StateDict] = {}
        generators: dict[str, torch.Generator] = {}
        for key, value in flat.items():
            if key.startswith("member."):
                parts = key.split(".", 2)
                if len(parts) != 3 or not parts[1].isdigit():
                    raise ValueError(f"bad member key {key!r}")
                members.setdefault(int(parts[1]), {})[parts[2]] = value
            elif key.startswith("generator."):
                generator = torch.Generator(device="cpu")
                generator.set_state(value.to(torch.uint8))
                generators[key.split(".", 1)[1]] = generator
            elif key not in (*required, "format"):
                raise ValueError(f"unknown key {key!r} in a population state")
        if sorted(members) != list(range(len(members))):
            raise ValueError(f"member indices are not 0..P-1: {sorted(members)}")
        return cls(
            members=[members[i] for i in range(len(members))],
            preferences=flat["preferences"].clone(),
            neighbours=flat["neighbours"].clone(),
            fitness=flat["fitness"].clone(),
            ideal=flat["ideal"].clone(),
            nadir=flat["nadir"].clone(),
            step=int(flat["step"]),
            ea_rounds=int(flat["ea_rounds"]),
            generators=generators,
        )


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def init_population(
    initial: Mapping[str, torch.Tensor],
    size: int,
    *,
    seed: int,
    stage: str = "train",
    neighbourhood_size: int = NEIGHBOURHOOD_SIZE,
) -> PopulationState:
    """P copies of ``initial`` (the adapter every member starts from, as every EA-Adam member
    starts from the pretrained model) with :func:`preference_vectors` and :func:`neighbourhoods`
    (``neighbourhood_size`` capped at P) and the EA generator
    ``torch_generator(seed, stage, "ea_adam", "ea")``."""
    preferences = preference_vectors(size)
    members = [{key: value.detach().clone() for key, value in initial.items()} for _ in range(size)]
    nan2 = torch.full((2,), float("nan"), dtype=torch.float64)
    return PopulationState(
        members=members,
        preferences=preferences,
        neighbours=neighbourhoods(preferences, min(int(neighbourhood_size), int(size))),
        fitness=torch.full((int(size), 2), float("nan"), dtype=torch.float64),
        ideal=nan2.clone(),
        nadir=nan2.clone(),
        generators={"ea": torch_generator(seed, stage, "ea_adam", "ea")},
    )


# -- the EA phase ----------------------------------------------------------------------------------


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand(1, dtype=torch.float64, generator=generator))


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def make_child(
    state: PopulationState,
    i: int,
    generator: torch.Generator,
    *,
    p_crossover: float = P_CROSSOVER,
    p_mutation: float = P_MUTATION,
    p_global_mating: float = P_GLOBAL_MATING,
    eta: float = SBX_ETA,
    mutation_rate: float = MUTATION_RATE,
    mutation_sigma: float = MUTATION_SIGMA,
) -> StateDict:
    """Member i's child, as released. Draws, in order: ``u < p_crossover`` (crossover at all?);
    if so ``u < p_global_mating`` (mate from the whole population minus i, else from i's
    neighbourhood minus i), the mate's index (uniform), the SBX draws; then
    ``u < p_mutation`` and, if so, the mutation draws. A population of one never crosses over.
    """
    parent = state.members[i]
    child: StateDict | None = None
    if _uniform(generator) < p_crossover and state.size > 1:
        if _uniform(generator) < p_global_mating:
            mates = [j for j in range(state.size) if j != i]
        else:
            mates = [int(j) for j in state.neighbours[i].tolist() if int(j) != i]
            if not mates:  # neighbourhood of one: fall back to the population
                mates = [j for j in range(state.size) if j != i]
        mate = state.members[mates[_randint(len(mates), generator)]]
        child = sbx_crossover(parent, mate, generator, eta=eta)
    if child is None:
        child = {key: value.clone() for key, value in parent.items()}
    if _uniform(generator) < p_mutation:
        child = gaussian_mutation(child, generator, rate=mutation_rate, sigma=mutation_sigma)
    return child


def _fitness(evaluate: Callable[[StateDict], object], weights: StateDict) -> torch.Tensor:
    value = torch.as_tensor(evaluate(weights), dtype=torch.float64).reshape(-1)
    if value.shape != (2,) or not torch.isfinite(value).all():
        raise ValueError(
            f"evaluate must return 2 finite losses (perception, fidelity), got {value}"
        )
    return value


def ea_phase(
    state: PopulationState,
    evaluate: Callable[[StateDict], object],
    iterations: int,
    *,
    protected: Iterable[int] = (),
    p_crossover: float = P_CROSSOVER,
    p_mutation: float = P_MUTATION,
    p_global_mating: float = P_GLOBAL_MATING,
    eta: float = SBX_ETA,
    mutation_rate: float = MUTATION_RATE,
    mutation_sigma: float = MUTATION_SIGMA,
    eps: float = TCHEBYCHEFF_EPS,
) -> PopulationState:
    """One EA phase (the release's EA epoch); returns a new state, ``state`` is left as it was.

    ``evaluate(weights) -> (perception_loss, fidelity_loss)``: fitness of an adapter on the fixed
    validation subset, lower is better (negate scores with :func:`to_minimisation`); it must be
    deterministic. Steps: every member is evaluated, ideal/nadir are set to the population's
    per-objective min/max; then ``iterations`` times, for each member i in order: a child
    (:func:`make_child`) is evaluated, ideal/nadir take it in (:func:`update_reference_points`),
    and it replaces every neighbour j of i with a better Tchebycheff value
    (:func:`replacements`), taking over j's fitness. Uses and advances
    ``state.generators["ea"]`` (in the returned copy); ``ea_rounds`` is incremented. Each
    replaced member gets its own copy of the child's tensors.
    """
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if "ea" not in state.generators:
        raise ValueError("the population state has no 'ea' generator")
    new = state.copy()
    generator = new.generators["ea"]
    fitness = torch.stack([_fitness(evaluate, member) for member in new.members])
    ideal, nadir = reference_points(fitness)
    for _ in range(int(iterations)):
        for i in range(new.size):
            child = make_child(
                new,
                i,
                generator,
                p_crossover=p_crossover,
                p_mutation=p_mutation,
                p_global_mating=p_global_mating,
                eta=eta,
                mutation_rate=mutation_rate,
                mutation_sigma=mutation_sigma,
            )
            child_fitness = _fitness(evaluate, child)
            ideal, nadir = update_reference_points(ideal, nadir, child_fitness)
            for j in replacements(
                fitness,
                new.preferences,
                new.neighbours[i],
                child_fitness,
                ideal,
                nadir,
                protected=protected,
                eps=eps,
            ):
                new.members[j] = {key: value.clone() for key, value in child.items()}
                fitness[j] = child_fitness
    new.fitness, new.ideal, new.nadir = fitness, ideal, nadir
    new.ea_rounds += 1
    return new


# -- fusion ----------------------------------------------------------------------------------------


def layer_name(key: str) -> str:
    """The layer a state-dict key belongs to: the prefix before ``.lora_`` for LoRA factors
    (``a.to_q.lora_A.weight`` -> ``a.to_q``), else the key minus its last component
    (``conv.weight``/``conv.bias`` -> ``conv``), so a layer's tensors share one fusion weight."""
    if ".lora_" in key:
        return key.split(".lora_", 1)[0]
    return key.rsplit(".", 1)[0] if "." in key else key


def layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The sorted distinct :func:`layer_name` of the floating tensors of ``state``."""
    return sorted({layer_name(key) for key, value in state.items() if value.is_floating_point()})


def fuse_adapters(
    members: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    layers: Sequence[str] | None = None,
) -> StateDict:
    """Static layer-wise merge (the release's ``train_cal_weight.py``):
    ``fused[key] = sum_k weights[layer(key), k] * members[k][key]``.

    ``members``: P state dicts (same keys/shapes); ``weights``: ``[L, P]``, row l the weights of
    layer ``layers[l]`` (default :func:`layer_names` of ``members[0]``), non-negative and summing
    to 1 per row (a softmax output, or its average, as released); differentiable in ``weights``.
    Each LoRA factor is merged (A and B of a layer with the same weights), so the fused adapter
    has the members' rank. One-hot weights reproduce a member bit for bit. Non-floating tensors
    are taken from ``members[0]``.
    """
    if not members:
        raise ValueError("fusion needs at least one member")
    for member in members[1:]:
        _check_same_keys(members[0], member)
    layers = list(layers) if layers is not None else layer_names(members[0])
    index = {name: row for row, name in enumerate(layers)}
    if weights.shape != (len(layers), len(members)):
        raise ValueError(
            f"weights must have shape [layers={len(layers)}, members={len(members)}], "
            f"got {tuple(weights.shape)}"
        )
    check = weights.detach().to(torch.float64)
    if (check < 0).any() or not torch.allclose(
        check.sum(dim=1), torch.ones(len(layers), dtype=torch.float64), atol=1e-4
    ):
        raise ValueError("fusion weights must be non-negative and sum to 1 per layer")
    fused: StateDict = {}
    for key in sorted(members[0]):
        first = members[0][key]
        if not first.is_floating_point():
            fused[key] = first.clone()
            continue
        name = layer_name(key)
        if name not in index:
            raise ValueError(f"no fusion weights for layer {name!r} (key {key!r})")
        row = weights[index[name]].to(device=first.device, dtype=first.dtype)
        total = row[0] * first
        for k in range(1, len(members)):
            total = total + row[k] * members[k][key]
        fused[key] = total
    return fused


def one_hot_weights(layers: int, members: int, member: int) -> torch.Tensor:
    """Fusion weights ``[layers, members]`` that select ``member`` in every layer."""
    if not 0 <= member < members:
        raise ValueError(f"member {member} outside 0..{members - 1}")
    weights = torch.zeros(layers, members, dtype=torch.float32)
    weights[:, member] = 1.0
    return weights


def learn_fusion_weights(
    members: Sequence[Mapping[str, torch.Tensor]],
    loss: Callable[[StateDict, int], torch.Tensor],
    *,
    steps: int = 50,
    lr: float = 0.05,
    layers: Sequence[str] | None = None,
    init_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Learn per-layer fusion weights ``softmax(logits, dim=1)`` with ``steps`` Adam steps.

    ``loss(fused_state, step) -> scalar``: differentiable loss of the fused adapter on the small
    fusion set (the callback picks the step's batch; it must use the tensors of ``fused_state``
    functionally, e.g. via ``torch.func.functional_call``). Logits ``[L, P]`` start at
    ``init_logits`` (default zeros: the plain average) and are the only thing optimised; the
    member weights are detached. This is the release's fusion stage without its per-image
    attention network: it learns the per-layer coefficients directly, which is what the static
    merge keeps. Returns (weights ``[L, P]`` float32, detached, rows summing to 1; the loss at
    each step before its update).
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    layers = list(layers) if layers is not None else layer_names(members[0])
    frozen = [{key: value.detach() for key, value in member.items()} for member in members]
    shape = (len(layers), len(members))
    if init_logits is None:
        logits = torch.zeros(shape, dtype=torch.float32)
    else:
        if tuple(init_logits.shape) != shape:
            raise ValueError(f"init_logits must have shape {shape}, got {tuple(init_logits.shape)}")
        logits = init_logits.detach().to(torch.float32).clone()
    logits.requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    history: list[float] = []
    for step in range(int(steps)):
        optimiser.zero_grad(set_to_none=True)
        value = loss(fuse_adapters(frozen, torch.softmax(logits, dim=1), layers), step)
        if value.ndim != 0:
            raise ValueError(f"the fusion loss must be a scalar, got shape {tuple(value.shape)}")
        value.backward()
        optimiser.step()
        history.append(float(value.detach()))
    return torch.softmax(logits.detach(), dim=1), history
