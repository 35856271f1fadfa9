"""Human annotation and human evaluation in the browser (docs/annotation.md).

``store`` (SQLite WAL vote store), ``tasks`` (instance and compare task lists from the tables),
``render`` (the PNG views), ``server`` (the Starlette app), ``export`` (the ``annotations`` and
``votes`` tables), ``winrates`` (Fig. 3 statistics), ``synthetic`` (a tiny results tree),
``cli`` (``python -m pipeline annotate ...``).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from pipeline.annotate.cli import main as cli_main

    return cli_main(argv)
