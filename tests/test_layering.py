"""Stage folders import downward only, and never in a loop (docs/architecture.md, "Where things live").

Every ``import`` in the library counts, lazy ones inside functions too: a lazy import hides a cycle from the
interpreter, not from a reader."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> installed package (pyproject's package-dir).
FOLDERS = {"autodeploy": "autodeploy", "passes": "autodeploy.passes", "backends": "autodeploy.backends",
           "models": "autodeploy.models"}
# Lower levels never import higher ones; stages of one level may import each other, but not in a cycle.
LEVELS = {
    "errors": 0, "logging_utils": 0, "numerics": 0, "graph": 0, "ops": 0, "metadata": 0,
    "passes": 1, "backends": 1, "models": 1, "distributed": 1,
    "compiler": 2, "lowering": 2, "runtime": 2,
    "entrypoints": 3,
    "autodeploy": 4,  # the package root: the public API re-exports
}


def _stage(module: str):
    parts = module.split(".")
    if parts[0] != "autodeploy":
        return None
    return parts[1] if len(parts) > 1 else "autodeploy"


def stage_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            src = _stage(".".join([package] + [p for p in rel.parts if p != "__init__"]))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                    if node.module == "autodeploy":
                        names = [f"autodeploy.{a.name}" for a in node.names]
                else:
                    continue
                for name in names:
                    dst = _stage(name)
                    if dst is not None and dst != src:
                        edges.setdefault((src, dst), []).append(str(path.relative_to(ROOT)))
    return edges


def test_every_stage_has_a_level():
    stages = {s for edge in stage_edges() for s in edge}
    assert stages <= set(LEVELS), f"stages without a level: {stages - set(LEVELS)}"


def test_stages_import_downward():
    upward = {e: files for e, files in stage_edges().items() if LEVELS[e[1]] > LEVELS[e[0]]}
    assert not upward, f"upward imports: {upward}"


def test_no_import_cycles_between_stages():
    graph: dict[str, set[str]] = {}
    for src, dst in stage_edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        for n in graph.get(a, ()):
            if n == b or (n not in seen and reaches(n, b, seen | {n})):
                return True
        return False

    cycles = sorted((a, b) for a, b in stage_edges() if reaches(b, a, {b}))
    assert not cycles, f"stage imports that close a cycle: {cycles}"


def test_every_package_is_listed_for_wheels():
    """pyproject lists packages by hand (package-dir maps passes/, backends/, models/ into autodeploy.*); an
    editable install finds an unlisted one anyway, a wheel does not."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
