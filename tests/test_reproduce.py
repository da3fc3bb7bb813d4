"""The reproduction runner (``python -m experiments``, ``make reproduce-*``).

Fast tests use the ``echo`` job type (no model) in experiment folders written under
``tmp_path``: the results cache (an interrupted run resumes without redoing finished
jobs; a changed config redoes exactly its jobs), config checks (one-line errors), missing
data, parallel jobs and the report. The real configs of ``experiments/`` are loaded and
expanded (both modes). The slow tests run every FAST reproduction end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, shared_file

if str(REPO) not in sys.path:  # experiments/ is a folder beside the package, not installed
    sys.path.insert(0, str(REPO))

from experiments import ConfigError, expand_jobs, list_experiments, load_experiment, main, run  # noqa: E402
from experiments._tasks import ECHO, TASKS, _run_echo  # noqa: E402

EXPERIMENT = """\
title: echo experiment
task: echo
data: {description: nothing, path: null}
split: {seeds: [0, 1, 2]}
training: {sleep_s: 0.0}
report:
  metrics: [{key: value, label: value, format: ".2f"}, {key: double, label: twice, format: ".1f"}]
  reference_name: paper
  reference_source: made up
fast:
  split: {seeds: [0]}
"""


def write_experiment(root: Path, name: str = "toy", *, models: dict[str, str] | None = None,
                     experiment: str = EXPERIMENT) -> Path:  # fmt: skip
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_experiment.yaml").write_text(experiment)
    models = models or {
        "alpha": "model: {name: a, label: Alpha, options: {value: 1.0}}\nreference:\n  - {value: 2.0}\n",
        "beta": "model: {name: b, label: Beta, options: {value: 10.0}}\n",
    }
    for model, text in models.items():
        (folder / f"{model}.yaml").write_text(text)
    return folder


@pytest.fixture
def dirs(tmp_path) -> dict:
    configs = tmp_path / "configs"
    write_experiment(configs)
    return {"config_dir": configs, "cache_dir": tmp_path / "cache", "report_dir": tmp_path / "reports"}


@pytest.fixture
def counted(monkeypatch) -> list[dict]:
    """Replace the echo task's function by one that records its calls."""
    calls: list[dict] = []
    original = ECHO.run

    def run_and_count(config, workdir):
        calls.append(config)
        return original(config, workdir)

    monkeypatch.setitem(TASKS, "echo", dataclasses.replace(ECHO, run=run_and_count))
    return calls


def cached_files(cache_dir: Path, name: str = "toy") -> list[Path]:
    return sorted((cache_dir / name).glob("*.json"))


def test_interrupted_run_resumes_without_redoing_jobs(dirs, monkeypatch):
    calls: list[int] = []
    original = ECHO.run

    def interrupt_on_second(config, workdir):
        calls.append(config["split"]["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(config, workdir)

    monkeypatch.setitem(TASKS, "echo", dataclasses.replace(ECHO, run=interrupt_on_second))
    with pytest.raises(KeyboardInterrupt):
        run(["toy"], **dirs)
    assert len(cached_files(dirs["cache_dir"])) == 1  # the finished job, written atomically
    assert not list((dirs["cache_dir"] / "toy").glob(".*tmp"))
    first_seed = calls[0]

    calls.clear()
    monkeypatch.setitem(TASKS, "echo", dataclasses.replace(ECHO, run=lambda c, w: (calls.append(c["split"]["seed"]), original(c, w))[1]))  # fmt: skip
    out = run(["toy"], **dirs)
    assert len(calls) == 5  # 2 models x 3 seeds, less the one already done
    assert len(out["cached"]) == 1 and len(out["ran"]) == 5
    assert calls.count(first_seed) == 1  # only beta's job of that seed, not alpha's again
    assert len(cached_files(dirs["cache_dir"])) == 6

    calls.clear()
    out = run(["toy"], **dirs)
    assert calls == [] and len(out["cached"]) == 6


def test_config_change_redoes_exactly_its_jobs(dirs, counted):
    run(["toy"], **dirs)
    assert len(counted) == 6
    counted.clear()
    folder = dirs["config_dir"] / "toy"
    # labels and reference numbers are not part of a job's hash
    (folder / "alpha.yaml").write_text("model: {name: a, label: Renamed, options: {value: 1.0}}\nreference:\n  - {value: 3.0}\n")
    run(["toy"], **dirs)
    assert counted == []
    # a changed model option redoes that model's jobs only
    (folder / "alpha.yaml").write_text("model: {name: a, label: Alpha, options: {value: 2.0}}\n")
    run(["toy"], **dirs)
    assert sorted(c["split"]["seed"] for c in counted) == [0, 1, 2]
    assert {c["model"]["name"] for c in counted} == {"a"}
    # --force redoes everything
    counted.clear()
    run(["toy"], force=True, **dirs)
    assert len(counted) == 6


def test_unreadable_cache_entry_is_redone(dirs, counted):
    run(["toy"], **dirs)
    broken = cached_files(dirs["cache_dir"])[0]
    broken.write_text("{ half a file")
    counted.clear()
    run(["toy"], **dirs)
    assert len(counted) == 1
    assert json.loads(broken.read_text())["result"]["metrics"]


def test_fast_applies_the_fast_sections(dirs, counted):
    out = run(["toy"], fast=True, **dirs)
    assert len(counted) == 2 and {c["split"]["seed"] for c in counted} == {0}
    assert out["reports"]["toy"].name == "toy.fast.md"


def test_report_has_a_row_per_model_with_the_reference(dirs):
    out = run(["toy"], **dirs)
    text = out["reports"]["toy"].read_text()
    table = out["tables"]["toy"]
    assert "| value | value (paper) | twice |" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    # alpha: 1 + seed over seeds 0, 1, 2 -> 2.00 ± 1.00; reference 2.00; beta 11.00 ± 1.00
    assert rows["Alpha"].split("|")[3].strip() == "2.00 ± 1.00"
    assert rows["Alpha"].split("|")[4].strip() == "2.00"
    assert rows["Beta"].split("|")[3].strip() == "11.00 ± 1.00"
    assert rows["*zero*"].split("|")[3].strip() == "0.00 ± 0.00"
    assert "Reference (paper): made up" in text and table in text
    assert (dirs["report_dir"] / "toy.png").stat().st_size > 0


def test_parallel_jobs_run_in_processes(dirs):
    out = run(["toy"], jobs=2, **dirs)
    assert len(out["ran"]) == 6 and not out["failed"]
    assert len(cached_files(dirs["cache_dir"])) == 6
    logs = sorted((dirs["cache_dir"] / "toy" / "logs").glob("*.log"))
    assert len(logs) == 6


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _runner_in_two_jobs(tmp_path: Path):
    """``python -m experiments toy -j 2`` with two long jobs running: (runner, its workers)."""
    configs = tmp_path / "configs"
    write_experiment(configs, experiment=EXPERIMENT.replace("sleep_s: 0.0", "sleep_s: 120.0"))
    cmd = [sys.executable, "-m", "experiments", "toy", "-j", "2", "--config-dir", str(configs),
           "--cache-dir", str(tmp_path / "cache"), "--report-dir", str(tmp_path / "reports")]  # fmt: skip
    runner = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    try:
        logs = tmp_path / "cache" / "toy" / "logs"
        deadline = time.monotonic() + 60
        while len(list(logs.glob("*.log"))) < 2 and time.monotonic() < deadline:  # both workers are in a job
            time.sleep(0.2)
        workers = _children(runner.pid)
        assert len(list(logs.glob("*.log"))) == 2 and len(workers) >= 2
        yield runner, workers
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.communicate()
        for w in workers | _children(runner.pid):
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def _wait_for_exit(pids: set[int], timeout: float = 20.0) -> set[int]:
    """The processes of ``pids`` still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigterm_stops_the_runner_and_its_running_workers(tmp_path):
    """A scheduler's SIGTERM (or ``kill``) to ``python -m experiments -j 2`` ends the
    runner with the interrupted message and exit code 130, and the jobs running in its
    workers stop too (before, they went on without it, holding the cores)."""
    with _runner_in_two_jobs(tmp_path) as (runner, workers):
        os.kill(runner.pid, signal.SIGTERM)
        _, err = runner.communicate(timeout=30)
        assert runner.returncode == 130 and "interrupted" in err
        assert not _wait_for_exit(workers), "a worker outlived the runner"
        assert not cached_files(tmp_path / "cache")  # nothing finished, nothing cached


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_runner_takes_its_workers_with_it(tmp_path):
    """``kill -9`` (or the out-of-memory killer) on the runner runs none of its code; the
    kernel still stops its workers (before, they went on as orphans, holding the cores)."""
    with _runner_in_two_jobs(tmp_path) as (runner, workers):
        os.kill(runner.pid, signal.SIGKILL)
        assert runner.wait(30) == -signal.SIGKILL
        assert not _wait_for_exit(workers), "a worker outlived the SIGKILLed runner"
        assert not cached_files(tmp_path / "cache")


def test_failed_job_is_reported_and_the_others_go_on(dirs, monkeypatch, capsys):
    def fail_beta(config, workdir):
        if config["model"]["name"] == "b":
            raise RuntimeError("beta broke")
        return _run_echo(config, workdir)

    monkeypatch.setitem(TASKS, "echo", dataclasses.replace(ECHO, run=fail_beta))
    code = main(["toy", "--config-dir", str(dirs["config_dir"]), "--cache-dir", str(dirs["cache_dir"]),
                 "--report-dir", str(dirs["report_dir"])])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "3 job(s) failed" in err and "RuntimeError: beta broke" in err
    assert len(cached_files(dirs["cache_dir"])) == 3
    assert "RuntimeError: beta broke" in (dirs["report_dir"] / "toy.md").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("alpha.yaml", "model: {name: a, options: {value: 1.0}}\ntrainig: {sleep_s: 0}\n"),
         "alpha.yaml: unknown key 'trainig'; valid keys: data, evaluation, fast, model, reference"),
        (("alpha.yaml", "model: {name: a, options: {valeu: 1.0}}\n"),
         "alpha.yaml model.options: unknown key 'valeu'; valid keys: value."),
        (("alpha.yaml", "model: {name: a, options: {value: 1.0}}\nfast: {split: {seed: [0]}}\n"),
         "alpha.yaml fast: split: unknown key 'seed'; valid keys: seeds."),
        (("alpha.yaml", "model: {name: a, options: {value: one}}\n"),
         "alpha.yaml model.options.value must be a number \\(the number returned\\), not 'one'."),
        (("alpha.yaml", "model: {name: a}\nsplit: {seeds: 3}\n"),
         "alpha.yaml split.seeds must be a list of integers \\(split seeds\\), not 3."),
        (("alpha.yaml", "model: [a\n"), "alpha.yaml is not valid YAML"),
        (("alpha.yaml", "model: {name: a}\nreference:\n  - {valu: 1.0}\n"),
         "alpha.yaml reference\\[0\\]: unknown key 'valu'; valid keys: double, value, where."),
        (("_experiment.yaml", EXPERIMENT.replace("task: echo", "task: ecko")), "task must be one of"),
    ],
)
def test_config_errors_are_one_line(dirs, capsys, edit, message):
    name, text = edit
    (dirs["config_dir"] / "toy" / name).write_text(text)
    code = main(["toy", "--config-dir", str(dirs["config_dir"]), "--cache-dir", str(dirs["cache_dir"]),
                 "--report-dir", str(dirs["report_dir"])])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (dirs["cache_dir"] / "toy").exists()  # nothing ran


def test_unknown_experiment_and_model(dirs):
    with pytest.raises(ConfigError, match="no experiment 'nope'.*experiments: toy"):
        run(["nope"], **dirs)
    with pytest.raises(ConfigError, match="has no model 'gamma'; models: alpha, beta"):
        run(["toy"], models=["gamma"], **dirs)


def test_missing_data_names_the_recipe(dirs):
    text = EXPERIMENT.replace("data: {description: nothing, path: null}",
                              "data: {description: the full screen, path: data/absent.h5ad, recipe: make data-absent}")  # fmt: skip
    write_experiment(dirs["config_dir"], experiment=text)
    with pytest.raises(ConfigError) as err:
        run(["toy"], **dirs)
    message = str(err.value)
    assert "needs data/absent.h5ad (the full screen), which is not there; run `make data-absent` first" in message
    assert "FAST=1" in message and "\n" not in message


def test_progress_lines_name_experiment_model_seed_and_eta(dirs):
    stream = io.StringIO()
    run(["toy"], stream=stream, **dirs)
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("[")]
    assert len(lines) == 6
    assert lines[0].startswith("[1/6] toy alpha seed=0: ok in ")
    assert "ETA " in lines[0] and lines[-1].endswith("ETA 0s")


# --------------------------------------------------------------------- the real configs
def test_repository_configs_load_and_expand():
    names = list_experiments()
    assert names == ["comparative_sim", "kang", "norman_ood", "replogle", "sparse_shift"]
    expected_full = {"norman_ood": 4 * 3 * 5, "replogle": (3 + 3 + 1 + 1) * 3, "sparse_shift": 7 * 5,
                     "comparative_sim": 7 * 3 * 3, "kang": 6 * 2}  # fmt: skip
    for name in names:
        for fast in (False, True):
            exp = load_experiment(REPO / "experiments" / name, fast=fast)
            jobs = expand_jobs(exp)
            assert len({j.key for j in jobs}) == len(jobs)
            if not fast:
                assert len(jobs) == expected_full[name], name
    norman = load_experiment(REPO / "experiments" / "norman_ood", fast=False)
    corr = next(m for m in norman.models if m.model_id == "samsvae_correlated")
    # MODELS.md §9's numbers are in the config, not in code
    models_md = (REPO.parent / "shared" / "docs" / "MODELS.md")
    if models_md.exists():
        assert "0 / .682 / .858" in models_md.read_text()
    assert {"where": {"split.fraction": 0.0}, "rel_iwelbo": 0.0, "pearson": 0.682, "pearson_top": 0.858,
            "iwelbo": -1780.43} in corr.config["reference"]  # fmt: skip


@pytest.mark.parametrize(("name", "recipe"), [("norman_ood", "make data-norman"), ("replogle", "make data-replogle-gwps")])
def test_full_runs_without_the_data_fail_with_the_recipe(name, recipe, tmp_path, capsys):
    exp = load_experiment(REPO / "experiments" / name, fast=False)
    path = exp.models[0].config["data"]["path"]
    if (REPO / path).exists():
        pytest.skip(f"{path} is there")
    code = main([name, "--cache-dir", str(tmp_path / "cache"), "--report-dir", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"run `{recipe}` first" in err


# ------------------------------------------------------------- FAST reproductions (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["norman_ood", "replogle", "sparse_shift", "comparative_sim", "kang"])
def test_fast_reproduction(name, tmp_path, monkeypatch, capsys):
    """Each FAST=1 reproduction runs through the runner and writes a row per model."""
    if name in ("norman_ood", "replogle"):
        shared_file("norman2019_mcfaline2023_subset.h5ad")
    if name == "kang":
        shared_file("kang2018_pbmc_ifnb_subset.h5ad")
    monkeypatch.setenv("FAST", "1")
    cache, reports = tmp_path / "cache", tmp_path / "reports"
    code = main([name, "-j", "2", "--cache-dir", str(cache), "--report-dir", str(reports)])
    assert code == 0, capsys.readouterr().err
    report = reports / f"{name}.fast.md"
    assert report.is_file() and (reports / f"{name}.fast.png").is_file()
    text = report.read_text()
    exp = load_experiment(REPO / "experiments" / name, fast=True)
    jobs = expand_jobs(exp)
    table_rows = [line for line in text.split("## Jobs")[0].splitlines() if line.startswith("| ")][1:]
    for model in exp.models:
        assert any(row.startswith(f"| {model.label}") for row in table_rows), model.label
    assert len(list((cache / name).glob("*.json"))) == len(jobs)
    # a second run reads everything from the cache
    out = run([name], fast=True, cache_dir=cache, report_dir=reports)
    assert out["ran"] == [] and len(out["cached"]) == len(jobs)
