"""The README opens with the two commands, and CI runs the second one verbatim."""

import re

from tests.workflow_helpers import ROOT


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", text)[:2]


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = readme_commands()
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("snakemake --cores all")
    assert tests.startswith("python3 -m venv .venv") and tests.endswith("pytest")


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
