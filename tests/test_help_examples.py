"""Every example in the commands' ``--help`` texts runs as written.

The examples are read from the help text the user sees (``cellpert [COMMAND] --help``,
rendered by typer's ``CliRunner`` wide enough that no line is wrapped): the line
``Example: cellpert ...`` or the indented lines under ``Examples:``. Each example runs in
a fresh working folder, in this process, through ``cellpert_cli.main.run`` (the function
behind the console script), split into words as the shell splits them (``shlex``) and at
``&&`` into commands run one after the other. Changes to the examples, all documented
here and applied by :func:`_as_run`:

- ``cellpert --threads 1`` is prepended (the test machine's cores are shared);
- a ``train`` command that caps its steps neither with ``--max-steps`` nor with
  ``--max-epochs`` (and does not ``--resume``) gets ``--max-steps 5`` appended; one that
  caps them is run with its own cap;
- ``simulate ... --in-blocks`` of a million cells gets smaller sizes appended
  (:data:`OVERRIDES`; the last value of an option wins);
- a note in parentheses after the command, two or more spaces after it, is prose and
  is dropped.

The files an example reads come from earlier examples (``simulate sams -o s.h5ad``,
``train ... -o run``) or from stand-ins made by :func:`_stand_ins` with the obs columns the
examples use: ``norman.h5ad`` and ``screen.h5ad`` are copies of the shared
Norman/McFaline subset (``dataset``, ``condition``), ``mcfaline.h5ad`` its McFaline cells
(``cell_type``), ``kang.h5ad`` the shared Kang subset (``condition``: control /
stimulated), ``cpa_format.h5ad`` the CPA-layout fixture (``layers["counts"]``),
``samsvae.yaml`` a small config file, and ``sim.h5ad`` / ``run_svae`` a small sparse-shift
screen with a 2-epoch sVAE run.

Examples that train or read a trained model are slow (317 s together on this machine's one
thread, session 13; the 500 steps of ``train``'s first example and the two default
``evaluate-ate`` runs on its model take most of it) and run with ``make test-slow``; the others (about 20 s) run in the default suite. :data:`SKIP` lists examples
that cannot run here (with the reason) and :data:`KNOWN_BROKEN` examples that fail as
written (expected to fail: fixing the help text makes the test fail until the entry is
removed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellpert_cli.main import app, run

from conftest import shared_file

#: Every command whose help the user can ask for, as the words after ``cellpert``.
COMMANDS = [
    [],
    ["simulate", "sams"],
    ["simulate", "sparse-shift"],
    ["simulate", "comparative"],
    ["inspect"],
    ["train"],
    ["evaluate-ate"],
    ["export-latents"],
]

#: Commands that print no examples (a group's help lists its commands instead).
NO_EXAMPLES = [["simulate"]]

#: Examples (as printed) that cannot run in the test, and why.
SKIP: dict[str, str] = {}

#: Examples (as printed) that fail as they are written, and why.
KNOWN_BROKEN: dict[str, str] = {}

#: Options appended to an example that contains the key (the example's own values are
#: overridden, so that the example's other options are exercised on a small screen).
OVERRIDES = {
    "--in-blocks": ["--n-perturbations", "10", "--n-cells-per-perturbation", "20", "5", "5", "--n-genes", "50"],
}

STEP_CAP = ["--max-steps", "5"]


@dataclass(frozen=True)
class Example:
    command: tuple[str, ...]  # the words after `cellpert` whose help printed it
    text: str  # as printed

    @property
    def commands(self) -> list[list[str]]:
        """The example's commands (words after ``cellpert``), split at ``&&``."""
        words = shlex.split(re.sub(r"\s{2,}\(.*\)\s*$", "", self.text))
        parts: list[list[str]] = [[]]
        for word in words:
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(word)
        assert all(p and p[0] == "cellpert" for p in parts), f"not a cellpert command: {self.text}"
        return [p[1:] for p in parts]

    @property
    def slow(self) -> bool:
        """Trains a model or reads a trained one."""
        for argv in self.commands:
            words = [w for w in argv if not w.startswith("-")]
            if words and words[0] in ("train", "export-latents"):
                return True
            if words and words[0] == "evaluate-ate" and ("--model" in argv or "-m" in argv):
                return True
        return False


def help_text(command: list[str]) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=10_000)
    assert result.exit_code == 0, result.output
    return result.output


def parse_examples(text: str) -> list[str]:
    """The example lines of a help text (continuation lines, if any, joined)."""
    examples: list[str] = []
    inside = False
    for line in text.splitlines():
        stripped = line.strip()
        match = re.match(r"Examples?:\s*(.*)$", stripped)
        if match:
            inside = True
            if match.group(1).startswith("cellpert "):
                examples.append(match.group(1))
            continue
        if not inside or not stripped:
            continue
        if not line.startswith(" "):  # Options:, Arguments:, Commands:
            inside = False
        elif stripped.startswith("cellpert "):
            examples.append(stripped)
        elif examples:  # a wrapped line
            examples[-1] += " " + stripped
    return examples


def all_examples() -> list[Example]:
    return [Example(tuple(c), text) for c in COMMANDS for text in parse_examples(help_text(c))]


def _as_run(argv: list[str]) -> list[str]:
    """The example's command with the test's changes (module docstring)."""
    argv = list(argv)
    for key, extra in OVERRIDES.items():
        if key in argv:
            argv += extra
    words = [w for w in argv if not w.startswith("-")]
    capped = {"--max-steps", "--max-epochs", "--resume"} & set(argv)
    if words and words[0] == "train" and not capped:
        argv += STEP_CAP
    if "--threads" not in argv:
        argv = ["--threads", "1", *argv]
    return argv


def _stand_ins(folder: Path) -> None:
    """The input files the examples name (module docstring)."""
    import anndata as ad

    subset = shared_file("norman2019_mcfaline2023_subset.h5ad")
    for name in ("norman.h5ad", "screen.h5ad"):
        shutil.copyfile(subset, folder / name)
    shutil.copyfile(shared_file("kang2018_pbmc_ifnb_subset.h5ad"), folder / "kang.h5ad")
    shutil.copyfile(shared_file("norman2019_cpa_format_fixture.h5ad"), folder / "cpa_format.h5ad")
    adata = ad.read_h5ad(subset)
    adata[adata.obs["dataset"] == "mcfaline23"].copy().write_h5ad(folder / "mcfaline.h5ad")
    (folder / "samsvae.yaml").write_text("model: samsvae\nn_latent: 4\nbatch_size: 128\n")


def _svae_stand_in(folder: Path) -> None:
    """``sim.h5ad`` and ``run_svae`` for ``export-latents sim.h5ad --model run_svae --ica``."""
    assert run(["--threads", "1", "simulate", "sparse-shift", "-o", str(folder / "sim.h5ad"), "--n-perturbations", "8",
                "--n-heldout", "2", "--n-cells-per-perturbation", "20", "--n-genes", "30"]) == 0  # fmt: skip
    assert run(["--threads", "1", "train", str(folder / "sim.h5ad"), "-m", "svae", "-o", str(folder / "run_svae"),
                "--n-latent", "15", "--max-epochs", "2", "--quiet"]) == 0  # fmt: skip


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder with the stand-ins; torch's threads and the BLAS variables that
    ``--threads`` sets are restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    _stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    torch.set_num_threads(threads)


def _run_examples(examples: list[Example], capsys) -> None:
    """Run each example; collect every failure, then fail with all of them."""
    failures, timings = [], []
    for example in examples:
        if example.text in SKIP:
            continue
        start = time.perf_counter()
        codes = []
        for argv in example.commands:
            code = run(_as_run(argv))
            codes.append(code)
            if code != 0:
                break
        captured = capsys.readouterr()
        timings.append((time.perf_counter() - start, example.text))
        broken = example.text in KNOWN_BROKEN
        if broken and codes[-1] == 0:
            failures.append(f"{example.text}\n  runs now: remove it from KNOWN_BROKEN")
        elif not broken and codes[-1] != 0:
            err = "\n    ".join(captured.err.strip().splitlines()[-3:])
            failures.append(f"{example.text}\n  exit code {codes[-1]}:\n    {err}")
    slowest = ", ".join(f"{t:.1f} s {text[:40]!r}" for t, text in sorted(timings, reverse=True)[:8])
    print(f"slowest examples: {slowest}")
    assert not failures, "help examples that do not run as written:\n" + "\n".join(failures)


def test_every_command_shows_examples():
    examples = all_examples()
    for command in COMMANDS:
        assert any(e.command == tuple(command) for e in examples), f"cellpert {' '.join(command)} --help has no example"
    for command in NO_EXAMPLES:
        assert "Commands:" in help_text(command)
    texts = {e.text for e in examples}
    stale = [t for t in (*SKIP, *KNOWN_BROKEN) if t not in texts]
    assert not stale, f"no --help shows these any more; remove them from SKIP / KNOWN_BROKEN: {stale}"
    for example in examples:
        assert example.commands  # each parses as cellpert commands


def test_parse_examples_joins_wrapped_lines():
    text = "Usage: x\n\n  Examples:\n\n      cellpert train a.h5ad\n      -o run\n\n      cellpert inspect a.h5ad\n\nOptions:\n  --x\n"
    assert parse_examples(text) == ["cellpert train a.h5ad -o run", "cellpert inspect a.h5ad"]
    assert parse_examples("  Example: cellpert simulate sams -o s.h5ad\n\nOptions:\n") == ["cellpert simulate sams -o s.h5ad"]


def test_changes_to_the_examples_are_the_documented_ones():
    assert _as_run(["train", "s.h5ad", "-o", "run"]) == ["--threads", "1", "train", "s.h5ad", "-o", "run", *STEP_CAP]
    assert _as_run(["train", "s.h5ad", "-o", "run", "--max-steps", "500"])[-2:] == ["--max-steps", "500"]
    assert _as_run(["train", "--resume", "run"]) == ["--threads", "1", "train", "--resume", "run"]
    assert _as_run(["inspect", "s.h5ad"]) == ["--threads", "1", "inspect", "s.h5ad"]
    note = Example((), "cellpert train --resume run   (after Ctrl-C: continues)")
    assert note.commands == [["train", "--resume", "run"]]


def test_fast_help_examples_run(workspace, capsys):
    """Examples that train nothing: simulate, inspect, the data ATE alone."""
    _run_examples([e for e in all_examples() if not e.slow], capsys)
    assert (workspace / "s.h5ad").exists() and (workspace / "big.h5ad").exists()


@pytest.mark.slow
def test_slow_help_examples_run(workspace, capsys):
    """Examples that train a model or read a trained one, in the order the help shows them."""
    _svae_stand_in(workspace)
    _run_examples([e for e in all_examples() if e.slow], capsys)
    for name in ("run", "run_cpa", "run_lines", "run_cmp", "report.html", "m.csv", "eval.h5ad", "s_with_latents.h5ad"):
        assert (workspace / name).exists(), name
