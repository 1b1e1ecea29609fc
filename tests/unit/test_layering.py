"""Issue 14 §4: the layers import one way.

* the vocabulary (config, ops, events, errors, records, fault names, snapshot) and the trace
  format load without the runtime (``lorainv.impl``), the testing layer or torch;
* the engine reaches the checkers through one place (its strict-level hook calls ``check``);
* no runtime code calls a hook that exists only for a fault (``mark_scheduled`` is gone).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lorainv

ROOT = Path(lorainv.__file__).parent


def test_vocabulary_and_trace_format_load_alone() -> None:
    code = (
        "import sys\n"
        "import lorainv.config, lorainv.ops, lorainv.events, lorainv.errors, lorainv.records\n"
        "import lorainv.fault_names, lorainv.snapshot, lorainv.trace\n"
        "lorainv.config.RuntimeConfig(faults={'stale_slot_tail'})\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('lorainv.impl', 'lorainv.testing', 'torch')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _imports(path: Path) -> list[tuple[str, str]]:
    """(enclosing function or '<module>', imported module) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.ImportFrom) and child.module:
                found.append((where, child.module))
            elif isinstance(child, ast.Import):
                found.extend((where, a.name) for a in child.names)
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_vocabulary_never_imports_the_runtime() -> None:
    for name in ("config", "ops", "events", "errors", "records", "fault_names", "snapshot"):
        mods = [m for _, m in _imports(ROOT / f"{name}.py")]
        assert not [m for m in mods if m.startswith("lorainv.impl")], name


def test_trace_format_does_not_depend_on_the_harness() -> None:
    testing = [(w, m) for w, m in _imports(ROOT / "trace.py") if m.startswith("lorainv.testing")]
    # only the deprecated compatibility alias for the moved replay functions
    assert testing == [("__getattr__", "lorainv.testing")]


def test_engine_reaches_checkers_in_one_place() -> None:
    to_checkers = [(w, m) for w, m in _imports(ROOT / "impl" / "engine.py") if m.startswith("lorainv.checkers")]
    assert to_checkers == [("check", "lorainv.checkers")]
    src = (ROOT / "impl" / "engine.py").read_text()
    assert src.count("self.check(") == 1 and "def _strict_hook" in src


def test_no_fault_only_hooks_in_the_loader() -> None:
    for path in (ROOT / "impl").glob("*.py"):
        assert "mark_scheduled" not in path.read_text(), path.name
