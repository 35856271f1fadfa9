"""Evaluated models as data (pipeline/model_names.py, docs/design.md §12): every name the
presets evaluate reads back as its spec, garbage is refused naming the name, and no module but
the spec's builds, splits or prefix-matches a name."""

from __future__ import annotations

import io
import re
import token
import tokenize
from pathlib import Path

import pytest

from pipeline import contracts, model_names
from pipeline.config import load_config
from pipeline.model_names import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"demo": ROOT / "config.yaml", "ci": ROOT / "workflow" / "presets" / "ci.yaml"}


def preset_config(name: str) -> dict:
    return load_config([str(PRESETS[name])], [])


def preset_models(name: str) -> list[ModelSpec]:
    config = preset_config(name)
    return [
        spec for fw in config["frameworks"] for spec in model_names.evaluated_models(config, fw)
    ]


# -------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_evaluated_name_reads_back_as_its_spec(preset):
    specs = preset_models(preset)
    assert specs
    for spec in specs:
        assert ModelSpec.parse(spec.name) == spec, spec.name


def test_the_ci_preset_evaluates_every_kind_of_name():
    """What the ci preset evaluates, per framework (the DAG's evaluate jobs, as the names were
    before they were data)."""
    config = preset_config("ci")
    names = {
        fw: [s.name for s in model_names.evaluated_models(config, fw)]
        for fw in config["frameworks"]
    }
    methods = ["dspo", "dpo", "sft", "dspo_m1", "ddpo", "dro_online", "gdpo", "gdpo_instance"]
    aligned = [f"{m}_fidelity" for m in methods]
    assert names == {
        "onestep": [
            "bicubic",
            "pretrained",
            *aligned,
            "ea_adam_front",
            "ea_adam_member0",
            "ea_adam_member1",
            "dspo_fidelity_r2",
        ],
        "multistep": ["bicubic", "pretrained", *aligned, "dspo_fidelity_nom2", "dspo_fidelity_r2"],
    }
    kinds = {spec.kind for spec in preset_models("ci")}
    assert kinds == set(model_names.KINDS)
    # the win rates: trained models of an automatic objective, not the _nom2 sampling
    winrates = {
        fw: [s.name for s in model_names.winrate_models(config, fw)] for fw in config["frameworks"]
    }
    assert winrates == {fw: [*aligned, "dspo_fidelity_r2"] for fw in config["frameworks"]}


def test_the_demo_evaluates_its_three_methods():
    config = preset_config("demo")
    assert [s.name for s in model_names.evaluated_models(config, "onestep")] == [
        "bicubic",
        "pretrained",
        "dspo_fidelity",
        "dpo_fidelity",
        "sft_fidelity",
    ]


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("bicubic", ModelSpec(model_names.BICUBIC)),
        ("pretrained", ModelSpec.pretrained()),
        ("dspo_fidelity", ModelSpec.aligned("dspo", "fidelity")),
        # the longest method wins: dspo_m1's model, not dspo's of objective "m1_fidelity"
        ("dspo_m1_fidelity", ModelSpec.aligned("dspo_m1", "fidelity")),
        ("dro_online_perception_r3", ModelSpec.aligned("dro_online", "perception", round=3)),
        ("dspo_fidelity_nom2", ModelSpec.aligned("dspo", "fidelity", feedback=False)),
        ("dspo_united_nom2_r2", ModelSpec.aligned("dspo", "united", 2, feedback=False)),
        ("ea_adam_front", ModelSpec.ea_adam_front()),
        ("ea_adam_member2", ModelSpec.ea_adam_member(2)),
        ("gdpo_instance_fidelity", ModelSpec.aligned("gdpo_instance", "fidelity")),
    ],
)
def test_hand_written_names(name, spec):
    assert ModelSpec.parse(name) == spec
    assert spec.name == name


def test_what_a_spec_says_about_its_model():
    dspo = ModelSpec.parse("dspo_fidelity_r2")
    assert (dspo.method, dspo.objective, dspo.round, dspo.base.name) == (
        "dspo",
        "fidelity",
        2,
        "dspo_fidelity",
    )
    assert [a.name for a in dspo.ablations()] == ["dspo_m1_fidelity_r2", "dspo_fidelity_nom2_r2"]
    assert dspo.reads_feedback and not dspo.is_ablation
    assert ModelSpec.parse("dspo_m1_fidelity").ablation == model_names.M1_ONLY
    assert ModelSpec.parse("dspo_fidelity_nom2").ablation == model_names.NO_M2
    assert not ModelSpec.parse("dspo_fidelity_nom2").reads_feedback
    assert ModelSpec.parse("dpo_fidelity").ablations() == []
    # files: the model evaluate loads and the rule output it comes from
    member = ModelSpec.parse("ea_adam_member1")
    assert member.source_artifact("onestep") == "results/aligned/onestep/ea_adam/front"
    assert member.model_folder("onestep") == "results/aligned/onestep/ea_adam/front/members/1"
    assert ModelSpec.bicubic().model_folder("onestep") is None
    assert ModelSpec.pretrained().model_folder("onestep") == "results/models/onestep/base"
    assert dspo.model_folder("multistep") == "results/rounds/multistep/dspo/fidelity/r2/aligned"
    assert dspo.feedback_pairs("multistep") == [
        contracts.pairs_artifact("multistep", "fidelity", "dspo", 2)
    ]
    assert ModelSpec.parse("dspo_fidelity_nom2").feedback_pairs("multistep") == []


@pytest.mark.parametrize(
    "name",
    [
        "",
        "dspo",
        "dspo_",
        "foo_fidelity",
        "bicubic_r2",
        "pretrained_nom2",
        "dspo_fidelity_r1",  # round 1 has no suffix
        "dspo_fidelity_r0",
        "dspo_fidelity_r02",
        "dspo_fidelity_r2_nom2",  # the round comes last
        "dpo_fidelity_nom2",  # only dspo samples with feedback negatives
        "ea_adam_fidelity",  # ea_adam's one run is on the front objective
        "ea_adam_member",
        "ea_adam_member01",
        "ea_adam_member1_r2",
        "dspo__nom2",
    ],
)
def test_garbage_is_refused_naming_the_name(name):
    with pytest.raises(ValueError, match=f"model name '{re.escape(name)}'"):
        ModelSpec.parse(name)
    assert model_names.parse_or_none(name) is None


def test_a_spec_refuses_what_no_name_could_read_back():
    for bad in (
        lambda: ModelSpec("sharpened"),
        lambda: ModelSpec.aligned("dspo", "m1_fidelity"),  # would read as dspo_m1's
        lambda: ModelSpec.aligned("dspo", "fidelity_r2"),  # would read as round 2
        lambda: ModelSpec.aligned("nope", "fidelity"),
        lambda: ModelSpec.ea_adam_member(-1),
        lambda: ModelSpec(model_names.PRETRAINED, round=2),
    ):
        with pytest.raises(ValueError):
            bad()


def test_the_spec_knows_the_one_multi_objective_method():
    multi = [m for m, method in contracts.METHODS.items() if method.pair_level == "objectives"]
    assert multi == [model_names.EA_ADAM]
    assert model_names.DSPO in contracts.METHODS and model_names.DSPO_M1 in contracts.METHODS


def test_the_annotation_tool_focuses_the_first_dspo_model_that_is_no_ablation():
    from pipeline.annotate.tasks import default_focus

    models = ["bicubic", "dspo_fidelity_nom2", "dspo_m1_fidelity", "dpo_fidelity", "dspo_united"]
    assert default_focus([*models, "dspo_fidelity"]) == "dspo_fidelity"
    assert default_focus(models) == "dspo_united"
    assert default_focus(["bicubic", "dspo_m1_fidelity", "my_folder"]) == ""


# ------------------------------------------------------------- no other module reads a name

#: fragments of the name grammar that only pipeline/model_names.py may spell in a string
NAME_FRAGMENTS = ("_nom2", "ea_adam_member", "ea_adam_front", "dspo_m1_")
#: the round suffix: f"..._r{...}" (an f-string), "_r(" (a regex group) or a string ending in
#: "_r"; a plain string may say "_r{r}" (the report's prose does)
ROUND_SUFFIX = re.compile(r"_r(\(|$)")
ROUND_FIELD = re.compile(r"_r\{")
PREFIX_CALLS = {"startswith", "endswith", "removeprefix", "removesuffix"}
_STRING = re.compile(
    r"^(?P<prefix>[a-zA-Z]*)(?P<quote>'''|\"\"\"|'|\")(?P<body>.*)(?P=quote)$", re.S
)


def _strings(
    source: str,
) -> tuple[list[tuple[tokenize.TokenInfo, str, bool, bool]], list[tokenize.TokenInfo]]:
    """(token, body, is an f-string, is a bare string statement: a docstring) of every string
    literal, and the tokens (f-strings of Python >= 3.12, several tokens, joined back into
    one; no comments, no line breaks inside brackets)."""
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (token.NL, tokenize.COMMENT)
    ]
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    fstring_start = getattr(token, "FSTRING_START", None)
    joined, index = [], 0
    while index < len(tokens):
        current = tokens[index]
        if fstring_start is not None and current.type == fstring_start:
            depth, end = 0, index
            while True:
                depth += {token.FSTRING_START: 1, token.FSTRING_END: -1}.get(tokens[end].type, 0)
                if depth == 0:
                    break
                end += 1
            (r0, c0), (r1, c1) = current.start, tokens[end].end
            text = source[offsets[r0 - 1] + c0 : offsets[r1 - 1] + c1]
            joined.append(
                tokenize.TokenInfo(token.STRING, text, current.start, tokens[end].end, current.line)
            )
            index = end + 1
            continue
        joined.append(current)
        index += 1
    found = []
    for position, current in enumerate(joined):
        if current.type != token.STRING:
            continue
        match = _STRING.match(current.string)
        before = joined[position - 1].type if position else None
        after = joined[position + 1].type if position + 1 < len(joined) else token.ENDMARKER
        bare = before in (None, tokenize.ENCODING, token.NEWLINE, token.INDENT, token.DEDENT) and (
            after in (token.NEWLINE, token.ENDMARKER)
        )
        found.append((current, match["body"], "f" in match["prefix"].lower(), bare))
    return found, joined


def name_violations(source: str, *, skip_docstrings: bool = True) -> list[str]:
    """Where ``source`` spells the name grammar (:data:`NAME_FRAGMENTS`, the round suffix) or
    prefix-matches a name with a method of the table (``startswith("dspo_")``,
    ``startswith(f"{method}_")``)."""
    strings, tokens = _strings(source)
    found = []
    for current, body, fstring, bare in strings:
        if bare and skip_docstrings:
            continue
        spelled = [f for f in NAME_FRAGMENTS if f in body] or ROUND_SUFFIX.findall(body)
        spelled = spelled or (fstring and ROUND_FIELD.findall(body))
        if spelled:
            found.append(f"line {current.start[0]}: {current.string}")
    prefixes = tuple(f"{method}_" for method in contracts.METHODS)
    for position, current in enumerate(tokens[:-2]):
        if not (current.string == "." and tokens[position + 1].string in PREFIX_CALLS):
            continue
        depth, argument = 0, position + 2
        while argument < len(tokens):
            depth += {"(": 1, ")": -1}.get(tokens[argument].string, 0)
            match = _STRING.match(tokens[argument].string)
            if (
                tokens[argument].type == token.STRING
                and match
                and (match["body"].startswith(prefixes) or re.match(r"\{[^{}]*\}_", match["body"]))
            ):
                found.append(f"line {tokens[argument].start[0]}: {tokens[argument].line.strip()}")
            if depth == 0:
                break
            argument += 1
    return found


def checked_files() -> list[Path]:
    package = sorted((ROOT / "pipeline").rglob("*.py"))
    rules = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
    return [p for p in package if p.name != "model_names.py"] + rules + [ROOT / "Snakefile"]


def test_no_module_but_the_spec_reads_or_writes_a_name():
    """Names are built by ModelSpec.name and split by ModelSpec.parse only: the package (but
    its docstrings), the rules and the Snakefile (all of their strings) spell no fragment of
    the grammar and prefix-match no method."""
    offenders = {}
    for path in checked_files():
        found = name_violations(path.read_text(), skip_docstrings=path.suffix == ".py")
        if found:
            offenders[path.relative_to(ROOT).as_posix()] = found
    assert offenders == {}


@pytest.mark.parametrize(
    "snippet",
    [
        'def f(name):\n    return name.endswith("_nom2")\n',
        'def f(name):\n    return name.startswith("dspo_")\n',
        'def f(name, m):\n    return name.startswith(f"{m}_")\n',
        'def f(base, r):\n    return f"{base}_r{r}"\n',
        'PATTERN = r"^(?P<base>.+)_r(?P<round>[0-9]+)$"\n',
        'MEMBER = "ea_adam_member"\n',
        'def f(name):\n    return name[len("dspo_m1_"):]\n',
    ],
)
def test_the_check_sees_a_name_being_read(snippet):
    assert name_violations(snippet)


def test_the_check_skips_docstrings_and_sees_the_spec_module():
    assert name_violations('"""the ``dspo_{objective}_nom2`` ablation"""\nX = 1\n') == []
    assert name_violations((ROOT / "pipeline" / "model_names.py").read_text())
