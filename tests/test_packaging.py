"""Packaging: one source of metadata (pyproject.toml), every package shipped, one version."""

from __future__ import annotations

from pathlib import Path

import tomllib

import proxykd_fast

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_directory_is_listed() -> None:
    """pyproject lists packages by hand (kernels/ maps to proxykd_fast.kernels): none may be missing."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "proxykd_fast").rglob("__init__.py")}
    found.add("proxykd_fast.kernels")
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"proxykd_fast.kernels": "kernels"}


def test_version_has_one_source() -> None:
    """The version is read from proxykd_fast.__version__, not written a second time."""
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "proxykd_fast.__version__"}
    assert "version=" not in (ROOT / "setup.py").read_text(encoding="utf-8")
    assert proxykd_fast.__version__
