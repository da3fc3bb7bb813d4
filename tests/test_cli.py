"""The command line end to end: exit codes, one-line errors, inspect, simulate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cellpert import __version__
from cellpert_cli.main import EXIT_INPUT_ERROR, run

from conftest import file_digest, make_toy_adata

CELLPERT = Path(sys.executable).parent / "cellpert"


def test_console_script_version():
    out = subprocess.run([str(CELLPERT), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"cellpert {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["simulate", "sams", "--help"]])
def test_help_has_examples(args, capsys):
    assert run(args) == 0
    text = capsys.readouterr().out
    assert "Usage:" in text
    if args != ["--help"]:
        assert "cellpert " in text.split("Usage:")[1]  # an example line


def test_simulate_then_inspect_without_keys(tmp_path, capsys):
    path = tmp_path / "s.h5ad"
    assert run(["simulate", "sams", "-o", str(path), "--seed", "1", "--n-perturbations", "12"]) == 0
    capsys.readouterr()
    assert run(["inspect", str(path), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["perturbations"] == 12
    assert desc["control_labels"] == ["control"]
    assert desc["perturbation_key"] == "perturbation"
    assert desc["problems"] == []


def test_inspect_real_norman(norman_path, capsys):
    assert run(["inspect", str(norman_path), "--subset", 'dataset == "norman19"']) == 0
    text = capsys.readouterr().out
    assert "18 single labels, 15 combinations" in text
    assert "250 of 500 genes have zero counts" in text


def test_inspect_cpa_layout_with_layer(cpa_fixture_path, capsys):
    assert run(["inspect", str(cpa_fixture_path), "--layer", "counts", "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["control_labels"] == ["ctrl"] and desc["combination_labels"] == 10


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p: ["inspect", str(p.parent / "missing.h5ad")], "no such file"),
        (lambda p: ["inspect", str(p), "--layer", "raw"], "layer 'raw' not found"),
        (lambda p: ["inspect", str(p), "--perturbation-key", "nope"], "no column 'nope'"),
        (lambda p: ["inspect", str(p), "--control", "ctl"], "match no cell"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, make_args, message):
    path = tmp_path / "toy.h5ad"
    make_toy_adata().write_h5ad(path)
    before = file_digest(path)
    assert run(make_args(path)) == EXIT_INPUT_ERROR
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in stderr
    assert file_digest(path) == before


def test_bad_input_through_the_console_script(tmp_path):
    bad = tmp_path / "x.h5ad"
    bad.write_text("not hdf5")
    out = subprocess.run([str(CELLPERT), "inspect", str(bad)], capture_output=True, text=True)
    assert out.returncode == EXIT_INPUT_ERROR
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in out.stderr
    debug = subprocess.run([str(CELLPERT), "--debug", "inspect", str(bad)], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_unknown_command_is_a_usage_error(capsys):
    assert run(["frobnicate"]) == 2
    assert "No such command" in capsys.readouterr().err
