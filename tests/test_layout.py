"""The layout's rules: research-path modules never import operations code (registry, dashboard, batch); the demo
generator is reachable from data.py only, as one of its data sources; nothing installed imports the harness in
tools/, and the package does not ship it."""

import ast
import tomllib
from pathlib import Path

from lib.params import ROOT

OPERATIONS = ("lib.registry", "lib.dashboard", "lib.batch", "lib.demo")
ALLOWED = {("lib/data.py", "lib.demo.synthetic")}  # data.source: embedded writes the generated image folder


def imports(path: Path, prefixes: tuple[str, ...] = ("lib",)) -> set[str]:
    """Every module under the given top-level packages a file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in prefixes:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in prefixes)
    return found


def test_research_path_does_not_import_operations():
    research = [p for p in (ROOT / "lib").glob("*.py")]
    assert len(research) >= 12  # params, pipeline, data, transforms, model, train, predict, metrics, ...
    offending = sorted(
        (p.relative_to(ROOT).as_posix(), m)
        for p in research
        for m in imports(p)
        if m.startswith(OPERATIONS) and (p.relative_to(ROOT).as_posix(), m) not in ALLOWED
    )
    assert offending == []


def test_nothing_installed_imports_the_harness():
    files = list((ROOT / "lib").rglob("*.py")) + list((ROOT / "deploy").rglob("*.py"))
    offending = sorted((p.relative_to(ROOT).as_posix(), m) for p in files for m in imports(p, ("tools",)))
    assert offending == []
    # The harness is not part of the installed package: setuptools finds lib* only.
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["lib*"]
    assert not (ROOT / "lib" / "bench").exists() and not (ROOT / "lib" / "rehearsal").exists()


def test_dashboard_server_module_never_imports_the_kernel_app():
    # The Voila server imports server.py; the app (widgets, the model) belongs to each kernel process.
    assert not {m for m in imports(ROOT / "lib" / "dashboard" / "server.py") if m.endswith((".app", ".uploads"))}
