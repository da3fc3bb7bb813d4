"""The README's shell blocks do what the README says.

Blocks are found by an HTML comment on the line before their fence:

- ``<!-- tour -->``: the five-minute tour on the shared Norman/McFaline subset. Its
  commands run as written, with bash, one by one, from ``tmp/repo`` beside a
  ``tmp/shared/data`` that links to the real shared data (so ``../shared/data/...``
  resolves as in a checkout); ``cellpert`` is this virtualenv's entry point, first on
  PATH. The commands are pinned to one CPU core, so cellpert's default thread count is
  one (the test machine's cores are shared). Each must exit with 0; the files the tour
  promises must exist, the shared file must be unchanged, and every line of the printed
  output the README shows (``<!-- tour-output -->``) must appear in the real output,
  numbers aside (``...`` stands for anything).
- ``<!-- quickstart -->``: ``make demo`` / ``make test`` are not run (they install and
  take minutes); the Makefile must have the targets, and ``.ci/run`` must call the same
  test commands as the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, file_digest, shared_file

README = REPO / "README.md"
SUBSET = "norman2019_mcfaline2023_subset.h5ad"

#: What the tour says it leaves in tour/ (paths relative to the repository root).
TOUR_FILES = [
    "tour/screen.h5ad",
    "tour/run/model",
    "tour/run/config.yaml",
    "tour/run/training.json",
    "tour/run/split.csv",
    "tour/report.html",
    "tour/run_lines/model",
    "tour/lines.h5ad",
    "tour/report_lines.html",
]


def marked_blocks(marker: str, text: str | None = None) -> list[list[str]]:
    """The lines of every fenced block right after ``<!-- marker -->``."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != f"<!-- {marker} -->":
            continue
        assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"<!-- {marker} --> is not followed by a fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append(lines[i + 2 : end])
    return blocks


def shell_commands(block: list[str]) -> list[str]:
    """The block's commands: backslash continuations joined, blank and comment lines dropped."""
    commands, current = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            commands.append(" ".join(current.split()))
        current = ""
    return commands


def _pattern(line: str) -> re.Pattern:
    """A README output line as a regex: numbers and ``...`` match anything, spaces collapse."""
    pieces = []
    for part in re.split(r"(\.\.\.|-?\d[\d,.]*)", " ".join(line.split())):
        if part == "...":
            pieces.append(".*")
        elif re.fullmatch(r"-?\d[\d,.]*", part):
            pieces.append(r"-?[\d,.]+")
        else:
            pieces.append(re.escape(part))
    return re.compile("".join(pieces))


def test_helpers_parse_blocks():
    text = "x\n<!-- m -->\n```bash\na \\\n  b\n# note\n\nc  # why\n```\n"
    assert [shell_commands(b) for b in marked_blocks("m", text)] == [["a b", "c # why"]]
    assert _pattern("model   0.431 ... 33").fullmatch("model 0.5 and more 12")
    assert not _pattern("the model beats the average: r 0.4").fullmatch("the model does not beat the average: r 0.4")


def test_quickstart_matches_makefile_and_ci():
    blocks = marked_blocks("quickstart")
    assert len(blocks) == 1, "README needs one <!-- quickstart --> block"
    commands = [c.split("#")[0].strip() for c in shell_commands(blocks[0])]
    assert commands == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    readme = README.read_text(encoding="utf-8")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    for target in ("demo", "test", "test-slow"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"Makefile has no target {target}"
    # CI runs the README's test commands: `make test`, and the long tests of `make test-slow`
    assert "make test" in commands and "make test" in ci
    assert "`make test-slow`" in readme and "make test-slow" in ci


@pytest.fixture
def checkout(tmp_path) -> Path:
    """tmp/repo with tmp/shared/data -> the real shared data."""
    shared_file(SUBSET)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA.resolve(), target_is_directory=True)
    (tmp_path / "repo").mkdir()
    return tmp_path / "repo"


def _one_core() -> None:  # pragma: no cover - runs in the child
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@pytest.mark.slow
def test_tour_runs_as_written(checkout):
    blocks = marked_blocks("tour")
    assert blocks, "README has no <!-- tour --> block"
    commands = [c for block in blocks for c in shell_commands(block)]
    assert commands[0].startswith("mkdir -p tour && cp ../shared/data/")
    readme = README.read_text(encoding="utf-8")
    for path in {"/".join(p.split("/")[:2]) for p in TOUR_FILES}:
        assert path in readme, f"the README does not mention {path}"
    before = file_digest(SHARED_DATA / SUBSET)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    output, timings = [], []
    for command in commands:
        start = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=900, preexec_fn=_one_core)  # fmt: skip
        timings.append(f"{time.perf_counter() - start:6.1f} s  {command[:70]}")
        assert done.returncode == 0, f"{command}\nexit code {done.returncode}\n{done.stderr[-2000:]}"
        output += (done.stdout + "\n" + done.stderr).splitlines()
    print("tour timings:\n" + "\n".join(timings))

    for path in TOUR_FILES:
        assert (checkout / path).exists(), f"the tour promises {path}"
    assert file_digest(SHARED_DATA / SUBSET) == before, "the tour changed the shared file"
    import anndata as ad

    screen = ad.read_h5ad(checkout / "tour" / "screen.h5ad")
    assert {"ate_data", "ate_samsvae", "ate_samsvae_cal_lo"} <= set(screen.varm)
    assert set(screen.varm["ate_data"].columns) == set(screen.varm["ate_samsvae"].columns)  # the Norman labels
    assert {"X_samsvae_basal", "X_samsvae_latent"} <= set(screen.obsm)
    lines = ad.read_h5ad(checkout / "tour" / "lines.h5ad")
    assert {f"ate_samsvae_level_{line}" for line in ("A172", "T98G", "U87MG")} <= set(lines.varm)
    report = (checkout / "tour" / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in report and "Summary (metric x split)" in report and "Per perturbation" in report

    shown = [line for block in marked_blocks("tour-output") for line in block]
    assert shown, "README shows no <!-- tour-output --> block"
    printed = [" ".join(line.split()) for line in output]
    missing = [
        line for line in shown
        if line.strip() not in ("", "...") and not line.startswith("$ ")
        and not any(_pattern(line).fullmatch(p) for p in printed)
    ]  # fmt: skip
    assert not missing, "README shows output lines the tour no longer prints:\n" + "\n".join(missing)
