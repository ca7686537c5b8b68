"""Shared test set-up lives in helper modules (tests/factories.py, app_server.py, dataset_files.py, ...),
never in a test module: no test module or benchmark imports a test module, so running, moving or deleting
one test file cannot break another.

Every import statement is read (function-local ones too), as in tests/test_layout.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _test_modules(root: Path) -> set[str]:
    return {p.stem for p in (root / "tests").glob("test_*.py")}


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                names.add(node.module)
            if node.module in (None, "tests"):  # from tests import test_x, from . import test_x
                names.update(f"tests.{alias.name}" for alias in node.names)
    return names


def _violations(root: Path) -> list[str]:
    tests = _test_modules(root)
    bad = []
    for path in sorted([*(root / "tests").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]):
        for name in sorted(_imported(path)):
            parts = name.split(".")
            if parts[0] in tests or (parts[0] == "tests" and len(parts) > 1 and parts[1] in tests):
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


def test_no_test_module_is_imported_by_another_or_by_a_benchmark():
    assert _test_modules(ROOT) and _violations(ROOT) == []


def test_the_checker_sees_an_import_from_a_test_module(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("from factories import scene_image\n")
    (tmp_path / "tests" / "test_b.py").write_text("def test():\n    from test_a import helper\n")
    (tmp_path / "tests" / "factories.py").write_text("import numpy\n")
    (tmp_path / "benchmarks" / "bench_x.py").write_text("import tests.test_b\nfrom tests import factories\n")
    (tmp_path / "benchmarks" / "bench_y.py").write_text("from tests import test_a\n")
    assert _violations(tmp_path) == ["benchmarks/bench_x.py imports tests.test_b",
                                     "benchmarks/bench_y.py imports tests.test_a",
                                     "tests/test_b.py imports test_a"]
