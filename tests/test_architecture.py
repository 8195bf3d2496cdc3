"""The layer rules, checked with import-linter on the package as it installs (docs/ARCHITECTURE.md):

* the core (everything under ``ckptavg/``) never imports ``ckptavg.cli``, ``ckptavg.daemon`` or ``ckptavg.evaluators``;
* evaluators never import the daemon or the CLI; the daemon never imports the CLI;
* no import cycles inside the core, between sibling modules or packages at any depth.

``cli/``, ``daemon/`` and ``evaluators/`` install into ``ckptavg`` through ``package-dir``; import-linter finds
packages on disk, so the test lays out the installed tree (a copy of the sources) and runs it there.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LINT = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is in the test extras: pip install -e '.[test]'")


def installed_tree(dest: Path) -> Path:
    """The ``ckptavg`` package as ``pip install`` lays it out (package-dir mapping applied), sources only."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", *(f for f in mapping.values() if f != folder)))
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_layers_and_no_cycles(tmp_path):
    r = lint(installed_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("where,line,broken", [
    ("ckptavg/averaging/engine.py", "import ckptavg.daemon.config", "the core never imports"),
    ("ckptavg/evaluators/base.py", "from ckptavg.daemon import notify", "cli over daemon over evaluators"),
    ("ckptavg/reading/fileio.py", "from ckptavg.reading import discover", "no import cycles inside the core"),
])
def test_the_rules_catch_a_violation(tmp_path, where, line, broken):
    """The contracts are not vacuous: one bad import in the installed tree breaks the named one."""
    tree = installed_tree(tmp_path)
    f = tree / where
    f.write_text(f.read_text() + f"\n{line}  # noqa\n")
    r = lint(tree)
    assert r.returncode != 0 and f"{broken}" in r.stdout.split("Broken contracts")[-1], r.stdout


def test_every_core_module_is_under_the_core_contract():
    """A new top-level module of ckptavg/ must be listed as a source of the 'core never imports' contract
    (``__main__``, ``python -m ckptavg``, is the command itself: it only hands over to the CLI)."""
    forbidden = next(c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["type"] == "forbidden")
    listed = set(forbidden["source_modules"])
    core = {f"ckptavg.{p.stem if p.is_file() else p.name}" for p in (ROOT / "ckptavg").iterdir()
            if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p.is_dir() and (p / "__init__.py").exists())}
    assert core == listed, f"add {sorted(core - listed)} / remove {sorted(listed - core)} in pyproject.toml"


def test_imports_outside_the_core_are_absolute():
    """Every import in cli/, daemon/ and evaluators/ names a module you can open (no relative import through
    the package-dir mapping)."""
    relative = []
    for folder in ("cli", "daemon", "evaluators"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    relative.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not relative, relative


def test_every_package_folder_is_installed():
    """pyproject's explicit package list names exactly the folders that are packages (a new subpackage that is
    not listed would be missing from a wheel; a listed one without a folder breaks `pip install`)."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    on_disk = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            if not any(name.startswith(p + ".") for p in mapping if p != package and p.startswith(package + ".")):
                on_disk.add(name)
    assert set(setuptools["packages"]) == on_disk
