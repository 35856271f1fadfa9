"""EA-Adam's core (pipeline.population): operators against hand computations, determinism, resume."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import population as pop
from pipeline.seeding import torch_generator

KEYS = (
    "blk.to_q.lora_A.weight",
    "blk.to_q.lora_B.weight",
    "out.lora_A.weight",
    "out.lora_B.weight",
)


def adapter(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small LoRA-like state dict: two layers of rank 2."""
    g = torch.Generator().manual_seed(seed)
    shapes = {KEYS[0]: (2, 3), KEYS[1]: (4, 2), KEYS[2]: (2, 4), KEYS[3]: (3, 2)}
    return {key: scale * torch.randn(shape, generator=g) for key, shape in shapes.items()}


def delta(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    return state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"]


TARGETS = {"perception": adapter(100), "fidelity": adapter(200)}


def toy_losses(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Deterministic (perception, fidelity) losses: distance of each layer's BA to a target's."""
    values = []
    for target in TARGETS.values():
        total = sum(
            float(((delta(state, layer) - delta(target, layer)) ** 2).sum())
            for layer in ("blk.to_q", "out")
        )
        values.append(total)
    return values[0], values[1]


def diverse_population(size: int = 5, seed: int = 0) -> pop.PopulationState:
    state = pop.init_population(adapter(1), size, seed=seed, stage="test")
    state.members = [adapter(10 + i) for i in range(size)]
    return state


def assert_flat_equal(fa: dict[str, torch.Tensor], fb: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes and values bit for bit (NaN equal to NaN)."""
    assert fa.keys() == fb.keys()
    for key in fa:
        torch.testing.assert_close(fa[key], fb[key], rtol=0, atol=0, equal_nan=True, msg=key)


def assert_states_equal(a: pop.PopulationState, b: pop.PopulationState) -> None:
    assert_flat_equal(a.to_flat(), b.to_flat())


# -- preferences and neighbourhoods ----------------------------------------------------------------


def test_preference_vectors_evenly_spaced_from_perception_to_fidelity():
    expected = [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    assert pop.preference_vectors(5).tolist() == expected
    assert pop.preference_vectors(1).tolist() == [[1.0, 0.0]]
    assert pop.preference_vectors(2).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="positive integer"):
        pop.preference_vectors(0)


def test_neighbourhoods_are_the_releases_B_for_size_three():
    rows = pop.neighbourhoods(pop.preference_vectors(5), 3)
    assert [sorted(r) for r in rows.tolist()] == [
        [0, 1, 2],
        [0, 1, 2],
        [1, 2, 3],
        [2, 3, 4],
        [2, 3, 4],
    ]
    assert rows[:, 0].tolist() == list(range(5))  # itself first
    # T nearest by Euclidean distance, ties to the lower index
    assert pop.neighbourhoods(pop.preference_vectors(7), 2)[3].tolist() == [3, 2]
    with pytest.raises(ValueError, match="neighbourhood size"):
        pop.neighbourhoods(pop.preference_vectors(2), 3)


# -- gradient mixing -------------------------------------------------------------------------------


def test_mix_gradients_on_hand_vectors():
    eps = pop.GRAD_NORM_EPS
    perception = {
        "a": torch.tensor([3.0, 4.0], dtype=torch.float64),
        "b": None,
        "c": torch.tensor([[0.0, 10.0]], dtype=torch.float64),
    }
    fidelity = {
        "a": torch.tensor([0.0, 2.0], dtype=torch.float64),
        "b": torch.tensor([1.0], dtype=torch.float64),
        "c": None,
    }
    mixed = pop.mix_gradients(perception, fidelity, (0.25, 0.75))
    # per tensor: 0.25 * g_p / (|g_p| + eps) + 0.75 * g_f / (|g_f| + eps)
    a = [0.25 * 3 / (5 + eps) + 0.0, 0.25 * 4 / (5 + eps) + 0.75 * 2 / (2 + eps)]
    assert torch.allclose(mixed["a"], torch.tensor(a, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(mixed["b"], torch.tensor([0.75 / (1 + eps)], dtype=torch.float64))
    assert torch.allclose(
        mixed["c"], torch.tensor([[0.0, 0.25 * 10 / (10 + eps)]], dtype=torch.float64)
    )
    # both None -> None; a zero gradient stays zero (eps)
    assert pop.mix_gradients({"x": None}, {"x": None}, (0.5, 0.5)) == {"x": None}
    zero = pop.mix_gradients({"x": torch.zeros(3)}, {"x": torch.zeros(3)}, (0.5, 0.5))
    assert torch.equal(zero["x"], torch.zeros(3))
    # the release normalises one-hot preferences too
    released = pop.mix_gradients(perception, fidelity, (1.0, 0.0), raw_if_one_hot=False)
    assert torch.allclose(released["a"], torch.tensor([0.6, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="different parameters"):
        pop.mix_gradients({"a": torch.ones(1)}, {"b": torch.ones(1)}, (0.5, 0.5))
    with pytest.raises(ValueError, match="non-negative"):
        pop.mix_gradients(perception, fidelity, (-0.5, 1.5))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def toy_objectives(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)
    y = model(x)
    return (y**2).mean(), ((y - 1) ** 2).mean()


def test_one_member_with_preference_perception_trains_exactly_like_the_perception_loss():
    state = pop.init_population({"w": torch.zeros(1)}, 1, seed=0)
    preference = state.preferences[0]
    assert preference.tolist() == [1.0, 0.0]
    mixed_model, plain_model = Toy(), Toy()
    params = dict(mixed_model.named_parameters())
    opt_mixed = torch.optim.Adam(mixed_model.parameters(), lr=1e-2)
    opt_plain = torch.optim.Adam(plain_model.parameters(), lr=1e-2)
    for step in range(5):
        perception, fidelity = toy_objectives(mixed_model, step)
        pop.set_preference_gradients(params, perception, fidelity, preference)
        plain_perception, _ = toy_objectives(plain_model, step)
        opt_plain.zero_grad()
        plain_perception.backward()
        for name, p in plain_model.named_parameters():
            assert torch.equal(params[name].grad, p.grad), name  # the gradient, bit for bit
        opt_mixed.step()
        opt_plain.step()
    for (name, a), b in zip(mixed_model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    # the fidelity loss is not needed (nor differentiated) for a pure perception member
    perception, _ = toy_objectives(mixed_model, 9)
    pop.set_preference_gradients(params, perception, None, (1.0, 0.0))
    with pytest.raises(ValueError, match="fidelity loss"):
        pop.set_preference_gradients(params, perception, None, (0.5, 0.5))


def test_set_preference_gradients_equals_mix_of_autograd_gradients():
    model = Toy()
    params = dict(model.named_parameters())
    perception, fidelity = toy_objectives(model, 0)
    g_p = torch.autograd.grad(perception, list(params.values()), retain_graph=True)
    g_f = torch.autograd.grad(fidelity, list(params.values()), retain_graph=True)
    pop.set_preference_gradients(params, perception, fidelity, (0.75, 0.25))
    for (name, p), gp, gf in zip(params.items(), g_p, g_f, strict=True):
        norm_p, norm_f = torch.linalg.vector_norm(gp), torch.linalg.vector_norm(gf)
        expected = 0.75 * (gp / (norm_p + 1e-7)) + 0.25 * (gf / (norm_f + 1e-7))
        assert torch.equal(p.grad, expected), name


# -- SBX and mutation ------------------------------------------------------------------------------


def test_sbx_reproduces_the_formula_on_the_same_draws():
    parent = {
        f"t{k}.weight": torch.randn(3, 2, generator=torch.Generator().manual_seed(k))
        for k in range(8)
    }
    parent["steps"] = torch.tensor([7])  # not floating: copied from the parent, no draw
    mate = {
        key: value + 1.0 if value.is_floating_point() else value * 0
        for key, value in parent.items()
    }
    child = pop.sbx_crossover(parent, mate, torch_generator(3, "test", "sbx"))

    replay = torch_generator(3, "test", "sbx")
    branches = set()
    for key in sorted(parent):
        if key == "steps":
            assert torch.equal(child[key], parent[key])
            continue
        u = float(torch.rand(1, dtype=torch.float64, generator=replay))
        beta = (2 * u) ** (1 / 21) if u < 0.5 else (1 / (2 - 2 * u)) ** (1 / 21)
        branches.add(u < 0.5)
        for index in range(parent[key].numel()):
            p1 = float(parent[key].reshape(-1)[index])
            p2 = float(mate[key].reshape(-1)[index])
            expected = 0.5 * ((1 + beta) * p1 + (1 - beta) * p2)
            assert math.isclose(
                float(child[key].reshape(-1)[index]), expected, rel_tol=1e-6, abs_tol=1e-6
            )
        exact = (
            0.5 * ((1 + beta) * parent[key].double() + (1 - beta) * mate[key].double())
        ).float()
        assert torch.equal(child[key], exact)
    assert branches == {True, False}  # both branches of beta were exercised
    assert pop.sbx_beta(0.5) == 1.0 and pop.sbx_beta(0.25) == 0.5 ** (1 / 21)
    # equal parents -> the same child; inputs unchanged
    same = pop.sbx_crossover(parent, parent, torch_generator(3, "test", "sbx"))
    for key in parent:
        assert torch.allclose(same[key].double(), parent[key].double(), atol=1e-6)
    with pytest.raises(ValueError, match="differ in keys"):
        pop.sbx_crossover(parent, {"x": torch.ones(1)}, torch_generator(3, "test", "sbx"))


def test_mutation_reproduces_the_formula_on_the_same_draws():
    state = {
        "a.lora_A.weight": torch.randn(50, 40),
        "a.lora_B.weight": torch.randn(30, 20),
        "a.bias": torch.randn(5),
    }
    child = pop.gaussian_mutation(state, torch_generator(4, "test", "mut"))

    replay = torch_generator(4, "test", "mut")
    assert torch.equal(child["a.bias"], state["a.bias"])  # only weights mutate, as released
    changed = 0
    for key in ("a.lora_A.weight", "a.lora_B.weight"):  # sorted order
        u = torch.rand(state[key].shape, generator=replay)
        z = torch.randn(state[key].shape, generator=replay)
        mask = u < 0.02
        assert torch.equal(child[key] != state[key], mask)
        assert torch.equal(child[key][~mask], state[key][~mask])
        assert torch.equal(child[key][mask], state[key][mask] + 0.03 * z[mask])
        changed += int(mask.sum())
    total = 50 * 40 + 30 * 20
    assert 0.01 < changed / total < 0.03
    noise = pop.gaussian_mutation({"w.weight": torch.zeros(200_000)}, torch_generator(5, "t"))
    moved = noise["w.weight"][noise["w.weight"] != 0]
    assert abs(moved.numel() / 200_000 - 0.02) < 0.002
    assert abs(float(moved.std()) - 0.03) < 0.002


# -- Tchebycheff, replacement, Pareto --------------------------------------------------------------


def test_tchebycheff_on_hand_values():
    ideal, nadir = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0])
    value = pop.tchebycheff(torch.tensor([2.5, 3.0]), torch.tensor([0.75, 0.25]), ideal, nadir)
    assert math.isclose(float(value), max(0.75 * 1.5, 0.25 * 2.0) / (9 + 1e-5))


def test_tchebycheff_replacement_picks_the_hand_computed_members():
    # losses (perception, fidelity), lower is better; P = 5, preferences 1..0 in steps of 0.25
    preferences = pop.preference_vectors(5)
    members = torch.tensor([[1.0, 10.0], [3.0, 6.0], [5.0, 5.0], [6.0, 4.0], [10.0, 1.0]])
    child = torch.tensor([2.5, 3.0])
    ideal, nadir = pop.reference_points(members)
    ideal, nadir = pop.update_reference_points(ideal, nadir, child)
    assert ideal.tolist() == [1.0, 1.0] and nadir.tolist() == [10.0, 10.0]
    # by hand, range 9 (+1e-5):        g_j(child)                    g_j(member j)
    #   j=0 (1, 0):    max(1.5, 0)        = 1.5   /9    vs   0                    -> keep
    #   j=1 (.75,.25): max(1.125, 0.5)    = 1.125 /9    vs   max(1.5, 1.25) = 1.5 -> replace
    #   j=2 (.5, .5):  max(.75, 1.0)      = 1.0   /9    vs   max(2, 2) = 2        -> replace
    #   j=3 (.25,.75): max(.375, 1.5)     = 1.5   /9    vs   max(1.25, 2.25)=2.25 -> replace
    #   j=4 (0, 1):    2.0                            /9    vs   0                    -> keep
    neighbours = pop.neighbourhoods(preferences, 3)
    args = (members, preferences)
    assert pop.replacements(*args, neighbours[1], child, ideal, nadir) == [1, 2]  # {1, 0, 2}
    assert pop.replacements(*args, neighbours[2], child, ideal, nadir) == [2, 1, 3]
    assert pop.replacements(*args, neighbours[4], child, ideal, nadir) == [3, 2]  # {4, 3, 2}
    assert pop.replacements(*args, neighbours[2], child, ideal, nadir, protected=[1]) == [2, 3]
    # a tie is not a replacement (strictly better only)
    tie = torch.tensor([5.0, 5.0])
    assert pop.replacements(*args, [2], tie, ideal, nadir) == []
    # a score where higher is better becomes a loss by negation; the choice is the same
    scores = pop.to_minimisation(-members, (True, True))
    s_ideal, s_nadir = pop.update_reference_points(*pop.reference_points(scores), child.double())
    assert pop.replacements(scores, preferences, neighbours[2], child, s_ideal, s_nadir) == [
        2,
        1,
        3,
    ]


def test_pareto_set_on_a_hand_example():
    # (perception, fidelity), higher is better
    points = torch.tensor(
        [
            [1.0, 5.0],  # A: front
            [2.0, 4.0],  # B: front
            [2.0, 3.0],  # C: dominated by B
            [3.0, 1.0],  # D: front
            [0.5, 4.5],  # E: dominated by A
            [3.0, 1.0],  # F: equal to D, both kept
            [0.0, 0.0],  # G: dominated by all
        ]
    )
    assert pop.pareto_mask(points).tolist() == [True, True, False, True, False, True, False]
    # the same points as losses: G (0, 0) dominates every other point
    as_losses = pop.pareto_mask(points, (False, False)).tolist()
    assert as_losses == [False, False, False, False, False, False, True]
    assert pop.pareto_mask(points[:6], (False, False)).tolist() == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]
    # mixed directions: perception higher, fidelity lower (e.g. LPIPS): D, F and G
    assert pop.pareto_mask(points, (True, False)).tolist() == [
        False,
        False,
        False,
        True,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="shape"):
        pop.pareto_mask(torch.ones(3))


# -- EA phase, determinism, resume -----------------------------------------------------------------


def test_make_child_population_of_one_only_mutates():
    state = pop.init_population(adapter(1), 1, seed=0)
    child = pop.make_child(state, 0, torch_generator(0, "t"), p_mutation=0.0)
    for key in KEYS:
        assert torch.equal(child[key], state.members[0][key])


def test_ea_phase_is_deterministic_from_seeds_and_keeps_its_input():
    state = diverse_population()
    before = state.to_flat()
    first = pop.ea_phase(state, toy_losses, 3)
    second = pop.ea_phase(state, toy_losses, 3)
    assert_states_equal(first, second)
    assert_flat_equal(before, state.to_flat())  # the input is left as it was
    other = pop.ea_phase(diverse_population(seed=1), toy_losses, 3)  # another seed, other draws
    assert not torch.equal(first.generators["ea"].get_state(), other.generators["ea"].get_state())
    assert any(
        not torch.equal(a[key], b[key])
        for a, b in zip(first.members, other.members, strict=True)
        for key in KEYS
    )
    # the EA improved or kept every member's Tchebycheff value w.r.t. the final reference points
    start = torch.tensor([toy_losses(m) for m in state.members], dtype=torch.float64)
    end = first.fitness
    assert torch.equal(
        end, torch.tensor([toy_losses(m) for m in first.members], dtype=torch.float64)
    )
    for j in range(state.size):
        g_start = pop.tchebycheff(start[j], first.preferences[j], first.ideal, first.nadir)
        g_end = pop.tchebycheff(end[j], first.preferences[j], first.ideal, first.nadir)
        assert g_end <= g_start
    assert first.ea_rounds == 1 and state.ea_rounds == 0


def test_save_load_continue_equals_continue_without_save(tmp_path):
    state = pop.ea_phase(diverse_population(), toy_losses, 2)
    state.step = 40
    state.generators["adam.0"] = torch_generator(0, "test", "adam", 0)
    torch.randn(5, generator=state.generators["adam.0"])  # a generator mid-stream

    path = tmp_path / "population.safetensors"
    save_file(state.to_flat(), str(path))
    resumed = pop.PopulationState.from_flat(load_file(str(path)))
    assert_states_equal(resumed, state)
    assert resumed.step == 40 and resumed.ea_rounds == 1

    continued = pop.ea_phase(state, toy_losses, 2)
    continued_after_load = pop.ea_phase(resumed, toy_losses, 2)
    assert_states_equal(continued, continued_after_load)
    assert torch.equal(
        torch.randn(4, generator=continued.generators["adam.0"]),
        torch.randn(4, generator=continued_after_load.generators["adam.0"]),
    )


def test_from_flat_rejects_bad_input():
    flat = diverse_population(3).to_flat()
    with pytest.raises(ValueError, match="unknown key"):
        pop.PopulationState.from_flat({**flat, "stray": torch.ones(1)})
    with pytest.raises(ValueError, match="missing"):
        pop.PopulationState.from_flat({k: v for k, v in flat.items() if k != "ideal"})
    gap = {k: v for k, v in flat.items() if not k.startswith("member.0001.")}
    with pytest.raises(ValueError, match="member indices"):
        pop.PopulationState.from_flat(gap)


# -- fusion ----------------------------------------------------------------------------------------


def test_fusion_with_one_hot_weights_equals_that_member():
    members = [adapter(20 + k) for k in range(3)]
    layers = pop.layer_names(members[0])
    assert layers == ["blk.to_q", "out"]
    for k in range(3):
        fused = pop.fuse_adapters(members, pop.one_hot_weights(len(layers), 3, k))
        assert fused.keys() == members[k].keys()
        for key in KEYS:
            assert torch.equal(fused[key], members[k][key]), (k, key)


def test_fusion_is_layer_wise_weighted_sum():
    members = [adapter(20 + k) for k in range(2)]
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])  # rows: blk.to_q, out
    fused = pop.fuse_adapters(members, weights)
    for key in KEYS[:2]:
        assert torch.allclose(fused[key], 0.25 * members[0][key] + 0.75 * members[1][key])
    for key in KEYS[2:]:
        assert torch.equal(fused[key], members[0][key])
    with pytest.raises(ValueError, match="sum to 1"):
        pop.fuse_adapters(members, torch.tensor([[0.5, 0.6], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        pop.fuse_adapters(members, torch.ones(3, 2) / 2)


def test_learn_fusion_weights_moves_towards_the_better_member_and_is_deterministic():
    members = [adapter(30 + k) for k in range(3)]
    target = members[2]

    def loss(fused, step):
        return sum(
            ((delta(fused, layer) - delta(target, layer)) ** 2).sum()
            for layer in ("blk.to_q", "out")
        )

    weights, history = pop.learn_fusion_weights(members, loss, steps=60, lr=0.1)
    assert weights.shape == (2, 3)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2))
    assert weights.argmax(dim=1).tolist() == [2, 2]
    assert history[-1] < history[0]
    again, history_again = pop.learn_fusion_weights(members, loss, steps=60, lr=0.1)
    assert torch.equal(weights, again) and history == history_again
    # zero steps: the plain average
    uniform, _ = pop.learn_fusion_weights(members, loss, steps=0)
    assert torch.allclose(uniform, torch.full((2, 3), 1 / 3))
