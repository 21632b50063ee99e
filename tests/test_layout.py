"""The layout's rule: research-path modules never import operations code (registry, dashboard, benchmarks,
rehearsal); the demo generator is reachable from data.py only, as one of its data sources."""

import ast
from pathlib import Path

from lib.params import ROOT

OPERATIONS = ("lib.registry", "lib.dashboard", "lib.batch", "lib.bench", "lib.rehearsal", "lib.demo")
ALLOWED = {("lib/data.py", "lib.demo.synthetic")}  # data.source: embedded writes the generated image folder


def lib_imports(path: Path) -> set[str]:
    """Every lib.* module a file imports, at any depth of the file (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lib"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lib"))
    return found


def test_research_path_does_not_import_operations():
    research = [p for p in (ROOT / "lib").glob("*.py")]
    assert len(research) >= 12  # params, pipeline, data, transforms, model, train, predict, metrics, ...
    offending = sorted(
        (p.relative_to(ROOT).as_posix(), m)
        for p in research
        for m in lib_imports(p)
        if m.startswith(OPERATIONS) and (p.relative_to(ROOT).as_posix(), m) not in ALLOWED
    )
    assert offending == []


def test_dashboard_server_module_never_imports_the_kernel_app():
    # The Voila server imports server.py; the app (widgets, the model) belongs to each kernel process.
    assert not {m for m in lib_imports(ROOT / "lib" / "dashboard" / "server.py") if m.endswith((".app", ".uploads"))}
