"""`make examples` (examples.py): refused while lib/, notebooks/ or params/ have uncommitted changes; every notebook
runs before any example is replaced, each replaced whole, its versions.json naming the commit. The notebooks,
plans and screenshots are fakes here (the real ones take hours)."""
import json
import subprocess

import pytest

from rrt.examples import check_committed, regenerate, select, swap_in

NOTEBOOKS = ("00_explore", "01_init_ablation")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path):
    """A committed checkout: two notebooks, lib/, params/, and the old examples (a stale file in each)."""
    root = tmp_path / "repo"
    for rel in ("lib/rrt/x.py", "params/01_init_ablation/cpu.yaml", "README.md",
                *(f"notebooks/{nb}.ipynb" for nb in NOTEBOOKS),
                *(f"outputs/examples/cpu/{nb}/stale.csv" for nb in NOTEBOOKS),
                "outputs/examples/plans/stale.txt", "outputs/examples/screenshots/examples-cpu-00_explore.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("old\n")
    git(root.parent, "init", "-q", str(root))
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    return root


class Fakes:
    """The notebook runner, plan writer and screenshot taker, recording what they were asked."""

    def __init__(self, repo, *, commit=None, fail_on=None):
        self.repo, self.commit, self.fail_on, self.ran = repo, commit, fail_on, []

    def run_notebook(self, notebook, scale, run_dir, overrides, repo):
        self.ran.append((notebook, scale, str(run_dir), overrides))
        if notebook == self.fail_on:
            raise subprocess.CalledProcessError(1, ["papermill", notebook])
        (repo / run_dir).mkdir(parents=True)
        (repo / run_dir / "runs.csv").write_text("run\n")
        (repo / run_dir / f"{notebook}.html").write_text("<html>")  # rendered pages are not committed
        (repo / run_dir / "versions.json").write_text(json.dumps({"git_commit": self.commit or git(repo, "rev-parse",
                                                                                                  "HEAD")}))

    def write_plans(self, out_dir, repo):
        out_dir.mkdir(parents=True)
        (out_dir / "01_init_ablation-paper-gemma-2b.csv").write_text("run\n")

    def take_screenshots(self, root, out_dir):
        out_dir.mkdir(parents=True)
        for name in ("index", *(f"cpu-{nb}" for nb in NOTEBOOKS)):
            (out_dir / f"{name}.png").write_bytes(b"\x89PNG")


def run(repo, fakes, only=()):
    return regenerate(repo=repo, stamp="20260101-000000", only=only, run_notebook=fakes.run_notebook,
                      write_plans=fakes.write_plans, take_screenshots=fakes.take_screenshots, log=lambda line: None)


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("change", ["lib/rrt/x.py", "notebooks/01_init_ablation.ipynb", "params/01_init_ablation/new.yaml"])
def test_refused_in_one_line_while_the_code_has_uncommitted_changes(repo, change):
    (repo / change).write_text("changed\n")  # an edit, or an untracked file
    before = files(repo / "outputs")
    fakes = Fakes(repo)
    with pytest.raises(ValueError, match=r"^refusing to regenerate the examples: uncommitted changes under lib/, "
                                         rf"notebooks/, params/ \({change}\); commit them first") as err:
        run(repo, fakes)
    assert "\n" not in str(err.value) and fakes.ran == [] and files(repo / "outputs") == before


def test_a_change_outside_the_code_is_no_reason_to_refuse(repo):
    (repo / "README.md").write_text("edited\n")
    assert check_committed(repo) == git(repo, "rev-parse", "HEAD")


def test_every_example_plan_and_screenshot_is_replaced_whole(repo):
    fakes = Fakes(repo)
    examples = run(repo, fakes)
    assert examples == repo / "outputs" / "examples"
    # every notebook ran at cpu scale into its own relative run directory; those that train, into a fresh store
    assert fakes.ran == [("00_explore", "cpu", "outputs/00_explore/cpu-20260101-000000", {}),
                         ("01_init_ablation", "cpu", "outputs/01_init_ablation/cpu-20260101-000000",
                          {"runs_root": "outputs/runs-examples-20260101-000000"})]
    for nb in NOTEBOOKS:  # the stale file is gone with its old directory, the rendered page was not copied
        assert sorted(p.name for p in (examples / "cpu" / nb).iterdir()) == ["runs.csv", "versions.json"]
        commit = json.loads((examples / "cpu" / nb / "versions.json").read_text())["git_commit"]
        assert commit == git(repo, "rev-parse", "HEAD")
    assert [p.name for p in (examples / "plans").iterdir()] == ["01_init_ablation-paper-gemma-2b.csv"]
    assert sorted(p.name for p in (examples / "screenshots").iterdir()) == [
        "cpu-00_explore.png", "cpu-01_init_ablation.png", "index.png"]
    assert not [p for p in (repo / "outputs").rglob(".*") if p.name != ".gitkeep"]  # no staging left behind


def test_a_failed_notebook_leaves_every_example_as_it_was(repo):
    examples = repo / "outputs" / "examples"
    before = {f: (examples / f).read_text() for f in files(examples)}
    fakes = Fakes(repo, fail_on="01_init_ablation")
    with pytest.raises(subprocess.CalledProcessError):
        run(repo, fakes)
    assert [nb for nb, *_ in fakes.ran] == list(NOTEBOOKS)  # 00 ran; it was not swapped in before 01 finished
    assert {f: (examples / f).read_text() for f in files(examples)} == before


def test_an_example_made_by_another_checkout_is_refused(repo):
    with pytest.raises(ValueError, match="versions.json names commit 0123abc, not"):
        run(repo, Fakes(repo, commit="0123abc"))
    assert (repo / "outputs/examples/cpu/00_explore/stale.csv").exists()


def test_only_the_chosen_notebooks_rerun_and_the_others_stay_as_they_were(repo):
    fakes = Fakes(repo)
    examples = run(repo, fakes, only=["01"])
    assert [nb for nb, *_ in fakes.ran] == ["01_init_ablation"]
    assert (examples / "cpu/00_explore/stale.csv").read_text() == "old\n"
    assert sorted(p.name for p in (examples / "cpu/01_init_ablation").iterdir()) == ["runs.csv", "versions.json"]


def test_an_unknown_notebook_is_refused_before_anything_runs(repo):
    fakes = Fakes(repo)
    with pytest.raises(ValueError, match=r"^no notebook '07': choose from 00_explore, 01_init_ablation"):
        run(repo, fakes, only=["01", "07"])
    assert fakes.ran == []
    assert select([], list(NOTEBOOKS)) == list(NOTEBOOKS)
    assert select(["01_init_ablation", "00"], list(NOTEBOOKS)) == list(NOTEBOOKS)  # run order, not the order asked


def test_swap_in_replaces_a_directory_and_creates_a_new_one(tmp_path):
    new, dest = tmp_path / "new", tmp_path / "ex" / "a"
    new.mkdir()
    (new / "r.csv").write_text("1\n")
    dest.parent.mkdir()
    swap_in(new, dest)  # no old directory
    (new / "r.csv").write_text("2\n")
    swap_in(new, dest)
    assert (dest / "r.csv").read_text() == "2\n" and sorted(p.name for p in dest.parent.iterdir()) == ["a"]
