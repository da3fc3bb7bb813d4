"""Config files (YAML / TOML) and the precedence defaults < file < command line."""

from __future__ import annotations

import pytest

from cellpert import CellpertInputError
from cellpert.runs import read_config_file, resolve_options


@pytest.mark.parametrize(
    ("name", "text"),
    [("c.yaml", "max-steps: 50\nlr: 0.01\n"), ("c.toml", "max_steps = 50\nlr = 0.01\n")],
)
def test_file_overrides_defaults_and_cli_overrides_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    opts = resolve_options(
        {"max_steps": 10, "lr": 1e-3, "seed": 0},
        file_options=read_config_file(path),
        cli_options={"lr": 0.5, "seed": None},
    )
    assert opts == {"max_steps": 50, "lr": 0.5, "seed": 0}


def test_unknown_and_invalid_config(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("max_step: 5\n")
    with pytest.raises(CellpertInputError, match="unknown option.*max_step.*valid options"):
        resolve_options({"max_steps": 1}, file_options=read_config_file(bad))
    broken = tmp_path / "b.toml"
    broken.write_text("x = = 1")
    with pytest.raises(CellpertInputError, match="not valid TOML"):
        read_config_file(broken)
    with pytest.raises(CellpertInputError, match="must end in"):
        (tmp_path / "c.json").write_text("{}")
        read_config_file(tmp_path / "c.json")
