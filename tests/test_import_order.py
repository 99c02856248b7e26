"""docs/design.md, "Layout": imports go one way. The engine sits at the bottom, above only
the host facts (`nodulekit/host.py`, `host_memory.py`), which import nothing of
nodulekit's; no module imports a private name from another package."""

import ast
from pathlib import Path

import nodulekit

ROOT = Path(nodulekit.__file__).parent


def _imports(path: Path):
    """(module imported, names) for every `import` / `from ... import` in the file,
    function-level ones included (a lazy import is still a dependency)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_the_engine_imports_nothing_above_it():
    allowed = ("nodulekit.engine", "nodulekit.host", "nodulekit.host_memory")
    wrong = [f"{path.name}: {module}" for path in (ROOT / "engine").glob("*.py")
             for module, _ in _imports(path)
             if module.startswith("nodulekit") and not module.startswith(allowed)]
    assert not wrong, wrong


def test_the_host_facts_import_nothing_of_nodulekit():
    for name in ("host.py", "host_memory.py"):
        assert not [m for m, _ in _imports(ROOT / name) if m.startswith("nodulekit")], name


def test_no_private_name_crosses_a_package():
    wrong = []
    for path in ROOT.rglob("*.py"):
        package = "nodulekit." + path.relative_to(ROOT).parts[0].removesuffix(".py")
        for module, names in _imports(path):
            if not module.startswith("nodulekit") or module.startswith(package):
                continue  # another library's, or this package's own
            wrong += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
    assert not wrong, wrong
