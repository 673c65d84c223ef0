"""Fault injection for what notebooks, plans and the report write (issue 29, "Nothing used silently"):

- probe 2: two `make run`s (or two notebook starts) in the same second get two run directories, never one;
- probe 6: an unknown corpus, task or model stops a study before any directory is created, and a finished
  run's run.json is not rewritten by a later start of the same plan;
- probe 7: a full disk during a table, figure, JSON or page write raises an OSError naming the file, leaves
  the previous file whole and no temp file; `make report` over a damaged notebook names it and goes on;
- small ones: `~` in a path field is the home directory; a killed notebook's status names its cell.

A full disk is the kernel's own write failure: RLIMIT_FSIZE makes every write past the limit fail (EFBIG), for
pandas, matplotlib and plain writes alike, as ENOSPC would.
"""
import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import rrt.notebook  # noqa: E402
from rrt import plots_base, report, tables  # noqa: E402
from rrt.evaluation import save_results  # noqa: E402
from rrt.notebook import load_params, start  # noqa: E402
from rrt.rundir import write_json  # noqa: E402
from rrt.trainconfig import TrainConfig  # noqa: E402
from tests.test_report import OK, executed, run_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---- probe 2: two starts in one second, two run directories ------------------------------------------------

class FrozenClock:
    """datetime as rrt.notebook sees it, stopped at one second: every start happens "at once"."""
    class datetime:
        @staticmethod
        def now():
            import datetime
            return datetime.datetime(2026, 3, 1, 12, 0, 0)


def test_two_notebook_starts_in_one_second_get_two_run_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(rrt.notebook, "dt", FrozenClock)
    monkeypatch.setattr(rrt.notebook, "OUTPUTS", tmp_path)
    study = load_params("00_explore", "smoke")
    first, second = start(study), start(study)
    assert first != second
    assert sorted(p.name for p in (tmp_path / "00_explore").iterdir()) == ["smoke-20260301-120000",
                                                                          "smoke-20260301-120000-2"]
    assert json.loads((second / "config.json").read_text())["scale"] == "smoke"


@pytest.mark.slow
def test_two_make_runs_in_one_second_get_two_run_directories(tmp_path):
    """`make run` with one STAMP (as two starts in one second have): each papermill run gets its own directory."""
    log = tmp_path / "calls"
    stub = tmp_path / "python"  # stands in for .venv/bin/python: records the run directory papermill is given
    stub.write_text(f'#!/bin/bash\nwhile [ $# -gt 0 ]; do [ "$1" = run_dir ] && echo "$2" >> {log}; shift; done\n')
    stub.chmod(0o755)
    stamp = f"test-{tmp_path.name}"
    made = []
    try:
        for _ in range(2):
            done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "run", "NB=00_explore", "SCALE=smoke",
                                   f"STAMP={stamp}", f"PY={stub}"], cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        made = log.read_text().split()
        assert [Path(d).name for d in made] == [f"smoke-{stamp}", f"smoke-{stamp}-2"]
        assert all(Path(d).is_dir() for d in made)
    finally:
        for d in (ROOT / "outputs" / "00_explore").glob(f"smoke-{stamp}*"):
            d.rmdir()


# ---- probe 6: validation before anything is written; a finished run's run.json kept -------------------------

@pytest.mark.parametrize("notebook, overrides, named", [
    ("01_init_ablation", {"eval_corpora": ["nosuch/test"]}, "eval_corpora: unknown embedded corpus 'nosuch'; known:"),
    ("01_init_ablation", {"eval_corpora": ["wikitext2/nosplit"]}, "eval_corpora: corpus 'wikitext2' (embedded) has "
                                                                  "no split 'nosplit'; known: ['test', 'validation']"),
    ("01_init_ablation", {"train_corpus": "nosuch"},
     "train_corpus='nosuch', train_split='validation': unknown embedded corpus 'nosuch'; known:"),
    ("01_init_ablation", {"train_split": "train"},
     "train_corpus='wikitext2', train_split='train': corpus 'wikitext2' (embedded) has no split 'train'"),
    ("01_init_ablation", {"eval_corpora": ["slimpajama/test"]}, "eval_corpora: unknown embedded corpus 'slimpajama'"),
    ("01_init_ablation", {"tasks": ["nosuch"]}, "tasks holds 'nosuch'; valid: lambada_openai"),
    ("01_init_ablation", {"model": "nosuch-model"}, "model 'nosuch-model': no config found"),
    ("05_throughput", {"calibration_corpus": "nosuch/test"}, "calibration_corpus: unknown embedded corpus 'nosuch'"),
    ("05_throughput", {"corpora": ["tinystories/validation"]}, "corpora: corpus 'tinystories' (embedded) has no split"),
])
def test_an_unknown_corpus_task_or_model_stops_the_study_before_anything_is_written(tmp_path, notebook, overrides,
                                                                                    named):
    with pytest.raises(ValueError) as e:
        load_params(notebook, "smoke", runs_root=str(tmp_path / "runs"), run_dir=str(tmp_path / "nb"), **overrides)
    assert named in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_finished_runs_run_json_is_not_rewritten_by_a_later_start(tmp_path):
    common = dict(runs_root=str(tmp_path / "runs"))
    start(load_params("01_init_ablation", "smoke", run_dir=str(tmp_path / "first"), **common))
    files = sorted((tmp_path / "runs").glob("*/run.json"))
    assert len(files) == 7
    before = {f: (f.read_bytes(), f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    with pytest.raises(ValueError, match="unknown embedded corpus 'nosuch'"):
        start(load_params("01_init_ablation", "smoke", run_dir=str(tmp_path / "failed"), eval_corpora=["nosuch/test"],
                          **common))
    start(load_params("01_init_ablation", "smoke", run_dir=str(tmp_path / "again"), **common))
    assert sorted((tmp_path / "runs").glob("*/run.json")) == files  # no new run directory
    assert {f: (f.read_bytes(), f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == before
    assert not (tmp_path / "failed").exists()


# ---- probe 7: a full disk mid-write keeps the previous file; the report names a damaged notebook -------------

@contextlib.contextmanager
def disk_full_after(limit: int):
    """Every file write past `limit` bytes fails in the kernel (EFBIG), as a full disk fails with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


BIG = pd.DataFrame({"run": [f"run {i}" for i in range(2000)], "perplexity": [float(i) for i in range(2000)]})
SMALL = pd.DataFrame({"run": ["a"], "perplexity": [1.0]})


def figure():
    fig, ax = plt.subplots()
    ax.plot(range(500), [i * 0.5 for i in range(500)])
    return fig


WRITERS = {  # name: (write the small version, write the big one; return the file that must stay whole)
    "save_results csv": lambda d, df: save_results(df, d, params={}, name="perplexity", versions={})[0],
    "tables.save csv": lambda d, df: (tables.save(df, d, "table1", "caption"), d / "tables" / "table1.csv")[1],
    "plots save png": lambda d, df: (plots_base.save(figure() if len(df) > 1 else plt.figure(), d, "fig"),
                                     d / "figures" / "fig.png")[1],
    "write_json": lambda d, df: write_json(d / "results.json", df.to_dict("records")),
    "report index": lambda d, df: report.write_index(d) if len(df) > 1 else _index(d),
    "papermill notebook": lambda d, df: _papermill_notebook(d / "01_init_ablation.ipynb", df),
}


def _papermill_notebook(path, df):
    """How papermill writes the executed notebook after each cell (`make run` runs it through rrt.nbrun)."""
    from papermill.iorw import write_ipynb
    from rrt.nbrun import whole_notebook_writes
    whole_notebook_writes()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ipynb(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(df.to_csv())]), str(path))
    return path


def _index(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text("<p>the previous index</p>")
    return root / "index.html"


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_mid_write_names_the_file_and_keeps_the_previous_one(tmp_path, writer):
    if writer == "report index":  # a big index: many runs
        for i in range(60):
            run_dir(tmp_path, f"01_init_ablation/smoke-20260101-1000{i:02d}", "01_init_ablation")
    path = WRITERS[writer](tmp_path, SMALL)
    previous = path.read_bytes()
    with disk_full_after(len(previous) + 16), pytest.raises(OSError) as e:
        WRITERS[writer](tmp_path, BIG)
    assert e.value.errno == errno.EFBIG
    assert str(path) in str(e.value)
    assert path.read_bytes() == previous
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []


def test_the_report_names_a_damaged_notebook_and_renders_the_others(tmp_path, capsys):
    good = run_dir(tmp_path, "01_init_ablation/smoke-20260101-100000", "01_init_ablation",
                   executed(OK, scale="smoke", end_time="2026-01-01T10:05:00+00:00"))
    bad = run_dir(tmp_path, "01_init_ablation/smoke-20260102-100000", "01_init_ablation",
                  executed(OK, scale="smoke", end_time="2026-01-02T10:05:00+00:00"))
    notebook = bad / "01_init_ablation.ipynb"
    notebook.write_bytes(notebook.read_bytes()[:200])  # the disk filled while papermill wrote it
    by_dir = {e.dir: e for e in report.entries(tmp_path)}
    assert by_dir[bad].status.startswith(f"unreadable: {notebook} is not valid JSON")
    assert by_dir[good].status == "ok"
    from rrt.cli import report_main
    report_main([str(tmp_path)])
    page = (tmp_path / "index.html").read_text()
    assert f"unreadable: {notebook} is not valid JSON" in page
    assert (good / "01_init_ablation.html").exists() and not (bad / "01_init_ablation.html").exists()
    assert f"not rendered: {notebook}" in capsys.readouterr().err


# ---- small ones: `~` in paths; a killed notebook's cell ------------------------------------------------------

def test_a_tilde_in_a_path_field_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    study = load_params("01_init_ablation", "smoke", runs_root="~/runs", run_dir="~/nb")
    assert study.runs_root == str(tmp_path / "runs") and study.run_dir == str(tmp_path / "nb")
    assert all(run.dir.parent == tmp_path / "runs" for run in study.runs())
    served = load_params("05_throughput", "smoke", checkpoint="~/ckpt", runs_root="~/runs")
    assert served.checkpoint == str(tmp_path / "ckpt")
    config = TrainConfig(out="~/run", init_from="~/up", teacher="~/teacher", kd="fkl")
    assert (config.out, config.init_from, config.teacher) == tuple(str(tmp_path / n) for n in ("run", "up", "teacher"))
    assert config.hash() == TrainConfig(out="x", init_from=str(tmp_path / "up"), teacher=str(tmp_path / "teacher"),
                                        kd="fkl").hash()


def test_a_killed_notebook_names_the_cell_it_stopped_in():
    """papermill marks a cell running before the kernel numbers it: a kill then leaves no execution count."""
    nb = executed([("x = 1", "completed", []), ("y = 2", "completed", []), ("train()", "running", [])],
                  scale="smoke", end_time=None)
    nb.cells[2].execution_count = None
    assert report.status(nb) == "stopped at cell 3 of 3 (not yet numbered)"
