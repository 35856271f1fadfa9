"""``python -m pipeline STAGE [args]``: one entry point per stage, each a plain ``main(argv)``.

``python -m pipeline bench NAME [args]`` runs ``pipeline.bench.NAME`` (dashes become
underscores, so ``bench train-step`` is ``pipeline.bench.train_step``).
"""

from __future__ import annotations

import importlib
import sys

from pipeline import contracts

#: commands besides the stages (pipeline.contracts.STAGES)
TOOLS = ("config", "replicas", "run_gpu", "annotate", "study", "gather", "plan")
STAGES = (*contracts.STAGES, *TOOLS)


def main(argv: list[str] | None = None) -> int:
    from pipeline.hub import apply_offline_default

    apply_offline_default()  # before any stage imports a hub library (docs/design.md)
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m pipeline {"
        + ",".join(s.replace("_", "-") for s in STAGES)
        + ",bench} ..."
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command = argv.pop(0).replace("-", "_")
    if command == "bench":
        if not argv:
            print("usage: python -m pipeline bench NAME [args]", file=sys.stderr)
            return 2
        module = importlib.import_module(f"pipeline.bench.{argv.pop(0).replace('-', '_')}")
    elif command in STAGES:
        module = importlib.import_module(f"pipeline.{command}")
    else:
        print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
