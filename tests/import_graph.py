"""Which spikelm module imports which: a plain reading of the source with `ast` (nothing is imported).

    python tests/import_graph.py              # one line per module: module -> the spikelm modules it imports
    python tests/import_graph.py --check      # exit 1 if the library or an eval/ script imports spikelm.cli

Imports inside functions count too (the commands import lazily). eval/ scripts appear as `eval/NAME.py`.
"""

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = "spikelm.cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] != "spikelm":
        return path.relative_to(REPO).as_posix()  # an eval/ script
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """The spikelm modules `path` imports, relative imports resolved against its package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from .. import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            # `from spikelm import cli` / `from . import schemas` import submodules
            found.update(f"{target}.{alias.name}" for alias in node.names)
    known = {module_name(p) for p in (REPO / "spikelm").rglob("*.py")}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    files = sorted((REPO / "spikelm").rglob("*.py")) + sorted((REPO / "eval").rglob("*.py"))
    return {module_name(p): imported_modules(p) for p in files}


def cli_imports(edges: dict[str, set[str]]) -> list[str]:
    """Edges into the command line from the library (outside spikelm.cli) or from eval/ scripts."""
    return [f"{source} -> {target}" for source, targets in edges.items() for target in sorted(targets)
            if (target == CLI or target.startswith(CLI + "."))
            and not (source == CLI or source.startswith(CLI + "."))]


def main(argv) -> int:
    edges = graph()
    if "--check" in argv:
        bad = cli_imports(edges)
        print("\n".join(bad) if bad else "nothing outside spikelm.cli imports it")
        return 1 if bad else 0
    for source, targets in edges.items():
        print(f"{source} -> {', '.join(sorted(targets)) or '(none)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
