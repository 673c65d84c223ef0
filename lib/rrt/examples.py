"""`make examples`: regenerate the committed examples (outputs/examples/) at the current commit.

Refuses while lib/, notebooks/ or params/ have uncommitted changes: each example's versions.json names the commit,
and that commit must be the code that made it. Every notebook runs at `cpu` scale into its own run directory
(outputs/<notebook>/cpu-<time>/, as `make demo`) with a fresh run store, so every run is trained by this commit's
code; only when all have finished is each copied into outputs/examples/cpu/<notebook>/, the old directory kept
until the new one is in place. Then the paper-scale plans (outputs/examples/plans/, `make plan`'s output) and the
screenshots (outputs/examples/screenshots/: index.png, cpu-<notebook>.png) are regenerated the same way.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from rrt.notebook import load_params, planned
from rrt.params import overrides_yaml
from rrt.plans import STUDIES
from rrt.report import find_chromium, screenshots, write_index
from rrt.rundir import read_json

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("lib", "notebooks", "params")  # what the examples' commit must hold unchanged
PLAN_SCALE = "paper-gemma-2b"             # the plans a cluster user reviews first


def regenerate(*, repo: Path = REPO, scale: str = "cpu", runs_root: str = "", stamp: str = "", only=(),
               run_notebook: Callable | None = None, write_plans: Callable | None = None,
               take_screenshots: Callable | None = None, log: Callable = print) -> Path:
    """Regenerate repo/outputs/examples: every notebook at `scale`, the plans, the screenshots; return that path.

    runs_root: the run store the notebooks train into (empty: a new outputs/runs-examples-<time>, so nothing is
    read back from runs trained by older code). only: the notebooks to rerun (names or their number, e.g. "01";
    empty: all); the others' examples stay as they are, each naming its own commit. run_notebook(notebook, scale, run_dir, overrides, repo),
    write_plans(out_dir, repo) and take_screenshots(root, out_dir) default to papermill, `python -m rrt plan` and
    headless Chromium (tests pass fakes).
    """
    commit = check_committed(repo)
    chosen = select(only, notebooks(repo))
    stamp = stamp or f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    runs_root = runs_root or f"outputs/runs-examples-{stamp}"
    examples, staging = repo / "outputs" / "examples", repo / "outputs" / f".examples-{stamp}"
    fresh = {}
    for notebook in chosen:  # all run before any is swapped in: a failure leaves the examples as they were
        run_dir = Path("outputs") / notebook / f"{scale}-{stamp}"  # relative: config.json then names no machine
        overrides = {"runs_root": runs_root} if "runs_root" in _fields(notebook) else {}
        log(f"examples: running {notebook} at {scale} into {run_dir}")
        (run_notebook or _run_notebook)(notebook, scale, run_dir, overrides, repo)
        check_made_by(repo / run_dir, commit)
        fresh[notebook] = repo / run_dir
    for notebook, run_dir in fresh.items():
        swap_in(run_dir, examples / scale / notebook)
    (write_plans or _write_plans)(staging / "plans", repo)
    swap_in(staging / "plans", examples / "plans")
    write_index(examples)
    (take_screenshots or screenshots)(examples, staging / "screenshots")
    swap_in(staging / "screenshots", examples / "screenshots")
    shutil.rmtree(staging, ignore_errors=True)
    log(f"examples: {examples} regenerated at {commit}; the run store {runs_root} can be removed")
    return examples


def check_ready(repo: Path = REPO) -> str:
    """Return the HEAD commit if the examples can be regenerated: the code committed, Chromium installed."""
    commit = check_committed(repo)
    find_chromium()
    return commit


def check_committed(repo: Path = REPO) -> str:
    """Return the HEAD commit; raise one line naming the files if lib/, notebooks/ or params/ have uncommitted
    changes (untracked files included)."""
    status = _git(repo, "status", "--porcelain", "--", *SOURCES).splitlines()
    if status:
        files = [line[3:] for line in status]
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise ValueError(f"refusing to regenerate the examples: uncommitted changes under "
                         f"{', '.join(s + '/' for s in SOURCES)} ({shown}); commit them first, so that each "
                         f"example's versions.json names the code that made it")
    return _git(repo, "rev-parse", "HEAD").strip()


def check_made_by(run_dir: Path, commit: str) -> None:
    """Raise unless run_dir/versions.json names `commit` (a kernel importing rrt from another checkout would not)."""
    found = str(read_json(run_dir / "versions.json").get("git_commit", "unknown"))
    if found.removesuffix("-dirty") != commit:
        raise ValueError(f"{run_dir}/versions.json names commit {found}, not {commit}: the notebook imported rrt "
                         f"from another checkout (pip install -e . here, or PYTHONPATH=lib)")


def swap_in(new: Path, dest: Path) -> None:
    """Replace dest by a copy of new (rendered .html left out): the copy is made beside dest first and the old
    directory kept until the new one is in place, so an interrupted swap never leaves a half-written example."""
    partial, old = dest.with_name(f".{dest.name}.new"), dest.with_name(f".{dest.name}.old")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(new, partial, ignore=shutil.ignore_patterns("*.html", ".ipynb_checkpoints"))
    if dest.exists():
        dest.rename(old)
    partial.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def notebooks(repo: Path = REPO) -> list[str]:
    """Every notebook under repo/notebooks, in order (00_explore first: 05 reads 04's runs)."""
    return sorted(p.stem for p in (repo / "notebooks").glob("*.ipynb"))


def select(only, available: list[str]) -> list[str]:
    """The notebooks named in `only` (a full name or its number prefix, e.g. "04"), in run order; all if empty.
    Raises one line naming an unknown one, before anything runs."""
    chosen = set()
    for name in only:
        hits = [nb for nb in available if nb == name or nb.split("_")[0] == name]
        if not hits:
            raise ValueError(f"no notebook {name!r}: choose from {', '.join(available)} (or their numbers)")
        chosen.update(hits)
    return [nb for nb in available if nb in chosen] if only else available


def planned_notebooks(scale: str = PLAN_SCALE) -> list[str]:
    """The notebooks whose study trains at `scale` (each gets a plan: `make plan NB=.. SCALE=..`)."""
    return [nb for nb in notebooks() if planned(load_params(nb, scale)) is not None]


def _run_notebook(notebook: str, scale: str, run_dir: Path, overrides: dict, repo: Path) -> None:
    """Execute notebooks/<notebook>.ipynb with papermill into repo/run_dir, as `make run` does."""
    (repo / run_dir).mkdir(parents=True)  # a second regeneration in the same second fails here, not half-way
    params = overrides_yaml({**overrides, "run_dir": str(run_dir)})
    subprocess.run([sys.executable, "-m", "rrt.nbrun", f"notebooks/{notebook}.ipynb", f"{run_dir}/{notebook}.ipynb",
                    "-f", f"params/{notebook}/{scale}.yaml", "-y", params, "--cwd", str(repo),
                    "--log-output", "--no-progress-bar"], cwd=repo, check=True)


def _write_plans(out_dir: Path, repo: Path) -> None:
    """Write <notebook>-<scale>.{csv,txt} (`python -m rrt plan`'s table and text) and all-<scale>.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for notebook in [*planned_notebooks(), "all"]:
        name = f"{notebook}-{PLAN_SCALE}"
        csv = [] if notebook == "all" else ["--csv", str(out_dir / f"{name}.csv")]
        with open(out_dir / f"{name}.txt", "w") as text:
            subprocess.run([sys.executable, "-m", "rrt", "plan", notebook, PLAN_SCALE, *csv], cwd=repo,
                           stdout=text, check=True)


def _fields(notebook: str) -> set[str]:
    return {f.name for f in dataclasses.fields(STUDIES[notebook])}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout
