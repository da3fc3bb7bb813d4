"""The package list in pyproject.toml covers every package in the tree."""

from __future__ import annotations

import tomllib

from conftest import REPO


def test_every_package_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "cellpert").rglob("__init__.py")
    }
    found |= {"cellpert_cli"}
    assert found == listed, f"add to / remove from pyproject.toml packages: {found ^ listed}"


def test_constraints_pin_the_tested_stack():
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"
    assert pins["scvi-tools"].startswith("1.4.")
