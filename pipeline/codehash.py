"""Hashes of the package code a stage runs, for honest Snakemake caching.

Snakemake reruns a rule when its shell text or params change, but not when imported code
changes. Each rule therefore carries, in its params, a hash over the source of its stage
module and every ``pipeline`` module that stage imports, directly or not (found by reading
the import statements and module names written as strings, for lazy imports, without
importing anything). Editing a module reruns exactly the
stages that import it, and what depends on them.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "pipeline"


def module_file(root: Path, module: str) -> Path | None:
    """The source file of ``module`` (``pipeline.x.y``) under ``root``, or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """``pipeline.*`` modules that ``path`` imports (absolute and relative imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # lazy imports by name: importlib.import_module("pipeline.models.onestep")
            found.add(node.value)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def module_closure(root: Path, module: str) -> list[Path]:
    """Source files of ``module`` and of every ``pipeline`` module it imports, transitively.

    Parent packages' ``__init__.py`` count too: importing ``pipeline.models.x`` runs them.
    """
    root = Path(root)
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in seen:
                continue
            path = module_file(root, prefix)
            if path is None:
                continue  # an attribute imported from a module, not a module itself
            seen[prefix] = path
            pending.extend(_imported_modules(path, prefix))
    return sorted(set(seen.values()))


def code_hash(root: str | Path, *modules: str, files: tuple[str | Path, ...] = ()) -> str:
    """sha256 (16 hex digits) over the import closure of ``modules`` under ``root``, and of
    ``files`` (source files outside the package, e.g. a method file: their bytes and the
    closure of the package modules they import)."""
    root = Path(root)
    sources: set[Path] = set()
    for module in modules:
        if module_file(root, module) is None:
            raise FileNotFoundError(f"no source for module {module!r} under {root}")
        sources.update(module_closure(root, module))
    outside = sorted(Path(f).resolve() for f in files)
    for path in outside:
        for module in _imported_modules(path, PACKAGE):
            sources.update(module_closure(root, module))
    digest = hashlib.sha256()
    for path in sorted(sources):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    for path in outside:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
