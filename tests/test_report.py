"""The report (report.py): one index row per notebook run, by notebook then newest first, with its scale,
date, commit and status (a failed run names its failing cell), committed examples included; screenshots
when Chromium is installed."""
import json
import shutil
import sys
from datetime import datetime

import nbformat
import pytest

from rrt import report
from rrt.cli import report_main as main
from rrt.report import entries, screenshot_dir, screenshots, status, write_index

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def executed(cells, *, scale, end_time):
    """An executed notebook as papermill writes it: per-cell papermill metadata, the run's parameters."""
    nb = nbformat.v4.new_notebook()
    for n, (source, state, outputs) in enumerate(cells, start=1):
        cell = nbformat.v4.new_code_cell(source, execution_count=n, outputs=outputs)
        cell.metadata["papermill"] = {"status": state, "exception": state == "failed"}
        nb.cells.append(cell)
    nb.metadata["papermill"] = {"parameters": {"scale": scale}, "end_time": end_time,
                                "exception": any(state == "failed" for _, state, _ in cells)}
    return nb


def run_dir(root, rel, name, nb=None, *, scale="smoke", commit=COMMIT, figure=False):
    """A notebook's run directory under root: its executed notebook (if any), config.json, versions.json."""
    d = root / rel
    d.mkdir(parents=True)
    if nb is not None:
        nbformat.write(nb, d / f"{name}.ipynb")
    (d / "config.json").write_text(json.dumps({"notebook": name, "scale": scale}))
    if commit:
        (d / "versions.json").write_text(json.dumps({"torch": "2", "git_commit": commit}))
    if figure:
        (d / "figures").mkdir()
        (d / "figures" / "fig.png").write_bytes(b"\x89PNG")
    return d


OK = [("x = 1", "completed", [])]
FAILED = [("x = 1", "completed", []),
          ("import nope", "failed", [nbformat.v4.new_output("error", ename="ModuleNotFoundError",
                                                            evalue="No module named 'nope'", traceback=[])]),
          ("y = 2", "pending", [])]


@pytest.fixture()
def outputs(tmp_path):
    """outputs/ with two runs of 01 (one failed, newer), one of 00, an examples notebook and an examples
    directory of results without a notebook."""
    root = tmp_path / "outputs"
    run_dir(root, "01_init_ablation/smoke-20260101-100000", "01_init_ablation",
            executed(OK, scale="smoke", end_time="2026-01-01T10:05:00+00:00"), figure=True)
    run_dir(root, "01_init_ablation/cpu-20260102-100000", "01_init_ablation",
            executed(FAILED, scale="cpu", end_time="2026-01-02T10:05:00+00:00"), commit=None)
    run_dir(root, "00_explore/smoke-20260103-100000", "00_explore",
            executed(OK, scale="smoke", end_time="2026-01-03T10:05:00+00:00"), commit=COMMIT + "-dirty")
    run_dir(root, "examples/cpu/05_throughput", "05_throughput",
            executed(OK, scale="cpu", end_time="2025-12-01T10:05:00+00:00"), scale="cpu")
    results = run_dir(root, "examples/cpu/03_distillation", "03_distillation", scale="cpu")
    (results / "runs.csv").write_text("run\na\n")
    trained = root / "runs" / "tiny-llama-abc"  # the run store: training runs, not notebook runs
    trained.mkdir(parents=True)
    (trained / "versions.json").write_text("{}")
    return root


def test_entries_by_notebook_then_newest_first(outputs):
    rows = [(e.name, e.scale, e.dir.relative_to(outputs).as_posix()) for e in entries(outputs)]
    assert rows == [("00_explore", "smoke", "00_explore/smoke-20260103-100000"),
                    ("01_init_ablation", "cpu", "01_init_ablation/cpu-20260102-100000"),
                    ("01_init_ablation", "smoke", "01_init_ablation/smoke-20260101-100000"),
                    ("03_distillation", "cpu", "examples/cpu/03_distillation"),
                    ("05_throughput", "cpu", "examples/cpu/05_throughput")]


def test_entries_status_commit_and_date(outputs):
    by_dir = {e.dir.name: e for e in entries(outputs)}
    assert by_dir["cpu-20260102-100000"].status == "failed at In [2]: ModuleNotFoundError: No module named 'nope'"
    assert by_dir["cpu-20260102-100000"].commit == "?"  # it failed before versions.json was written
    assert by_dir["smoke-20260101-100000"].status == "ok"
    assert by_dir["smoke-20260101-100000"].commit == "0123456789"
    assert by_dir["smoke-20260103-100000"].commit == "0123456789-dirty"
    assert by_dir["smoke-20260101-100000"].date.isoformat() == "2026-01-01T10:05:00+00:00"
    assert by_dir["03_distillation"].status == "results only"


def test_status_of_a_killed_run():
    nb = executed([("x = 1", "completed", []), ("train()", "running", [])], scale="smoke", end_time=None)
    assert status(nb) == "stopped at In [2]"


def test_index_page(outputs):
    page = write_index(outputs).read_text()
    assert page.index("00_explore") < page.index("cpu-20260102-100000") < page.index("smoke-20260101-100000")
    assert "failed at In [2]: ModuleNotFoundError: No module named &#x27;nope&#x27;" in page
    assert '<a href="01_init_ablation/smoke-20260101-100000/01_init_ablation.html">' in page
    assert '<img src="01_init_ablation/smoke-20260101-100000/figures/fig.png"' in page
    assert '<a href="examples/cpu/03_distillation/runs.csv">runs.csv</a>' in page
    assert "2026-01-01 10:05" in page and "<code>0123456789</code>" in page
    assert (outputs / "examples/cpu/05_throughput/05_throughput.html").exists()
    assert "tiny-llama-abc" not in page


@pytest.mark.skipif(not any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium on PATH (apt-get install chromium): screenshots are not taken")
def test_screenshots(outputs, tmp_path):
    from PIL import Image

    main([str(outputs)])
    shots = screenshots(outputs, tmp_path / "shots", height=2000)
    assert [s.name for s in shots] == ["index.png", "00_explore-smoke-20260103-100000.png",
                                       "01_init_ablation-cpu-20260102-100000.png",
                                       "01_init_ablation-smoke-20260101-100000.png",
                                       "examples-cpu-05_throughput.png"]
    width, height = Image.open(shots[0]).size
    assert width == 1280 and height < 2000  # the blank bottom is cropped


def test_screenshots_by_default_beside_the_runs_never_into_the_examples(outputs, tmp_path, monkeypatch):
    """`make screenshots` (`--screenshots` without DIR): root/screenshots/<time>/; the committed examples untouched
    but for their rendered pages (.html, ignored by git). Chromium is a fake that writes a blank PNG."""
    fake = tmp_path / "chromium"
    fake.write_text(f"#!{sys.executable}\nimport sys\nfrom PIL import Image\n"
                    "shot = next(a for a in sys.argv if a.startswith('--screenshot=')).split('=', 1)[1]\n"
                    "Image.new('RGB', (1280, 40), 'white').save(shot)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(report, "find_chromium", lambda: str(fake))
    committed = sorted(p for p in (outputs / "examples").rglob("*") if p.suffix != ".html")
    main([str(outputs), "--screenshots"])
    (made,) = (outputs / "screenshots").iterdir()
    assert datetime.strptime(made.name, "%Y%m%d-%H%M%S")
    assert "index.png" in {p.name for p in made.iterdir()} and "examples-cpu-05_throughput.png" in {
        p.name for p in made.iterdir()}
    assert sorted(p for p in (outputs / "examples").rglob("*") if p.suffix != ".html") == committed
    assert screenshot_dir(outputs, datetime(2026, 1, 2, 3, 4, 5)) == outputs / "screenshots" / "20260102-030405"


def test_results_only_dated_by_their_run_directory_stamp(outputs):
    example = outputs / "examples/cpu/03_distillation"
    (example / "config.json").write_text(json.dumps({"notebook": "03_distillation", "scale": "cpu",
                                                     "run_dir": "outputs/03_distillation/cpu-20251124-094944"}))
    entry, = [e for e in entries(outputs) if e.dir == example]
    assert entry.date.astimezone().strftime("%Y-%m-%d %H:%M:%S") == "2025-11-24 09:49:44"  # local time, as stamped


def test_pages_load_the_widget_renderer_kept_beside_the_report(outputs):
    """00_explore's controls are widgets: their stored state renders offline only with the renderer at hand."""
    nb = executed(OK, scale="smoke", end_time="2026-01-04T10:05:00+00:00")
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                            "version_minor": 0}}
    run_dir(outputs, "00_explore/smoke-20260104-100000", "00_explore", nb)
    (outputs / ".widgets").mkdir()
    for name in ("embed-amd.js", "require.js"):
        (outputs / ".widgets" / name).write_text("")
    write_index(outputs)
    page = (outputs / "00_explore/smoke-20260104-100000/00_explore.html").read_text()
    assert "'../../.widgets/embed-amd.js'" in page and 'src="../../.widgets/require.js"' in page


def test_pages_let_wide_tables_scroll_and_headers_wrap(outputs):
    """A table wider than the page scrolls inside its output and its headers wrap (the screenshots cut it off before)."""
    write_index(outputs)
    page = (outputs / "01_init_ablation/smoke-20260101-100000/01_init_ablation.html").read_text()
    head = page[:page.index("</head>")]
    assert ".jp-OutputArea-output{overflow-x:auto" in head and "white-space:normal" in head
