"""The packages depend on each other in one direction: app → demo → segcore → annotations; train → segcore.

Every import statement in every module is read (function-local ones too), so a late import that
crosses a seam the wrong way fails here even if no test happens to execute it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the project packages (and gradio) it may import; everything else in the project is forbidden
ALLOWED = {
    "annotations": set(),
    "segcore": {"annotations"},
    "train": {"segcore", "annotations"},
    "demo": {"segcore", "annotations", "gradio"},
    "app": {"demo"},
    "benchmarks": {"segcore", "annotations", "train", "demo", "gradio"},
}
CHECKED = {"annotations", "segcore", "train", "demo", "gradio"}


def _modules(package: str) -> list[Path]:
    if package == "app":
        return [ROOT / "app.py"]
    return sorted((ROOT / package).rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _violations(package: str) -> list[str]:
    bad = []
    for path in _modules(package):
        for root in sorted((_imported_roots(path) & CHECKED) - ALLOWED[package] - {package}):
            bad.append(f"{path.relative_to(ROOT)} imports {root}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    assert _modules(package), f"no modules found for {package}"
    assert _violations(package) == []


def test_the_checker_sees_a_wrong_way_import(tmp_path, monkeypatch):
    # the rule must be able to fail: a segcore module importing demo inside a function is caught
    fake = tmp_path / "segcore"
    fake.mkdir()
    (fake / "ok.py").write_text("import annotations\nfrom .model import x\n")
    (fake / "bad.py").write_text("def f():\n    from demo.common import thing\n    import gradio\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _violations("segcore") == ["segcore/bad.py imports demo", "segcore/bad.py imports gradio"]
