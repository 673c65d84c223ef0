"""`make sweep`: a notebook's plan as cluster jobs, or papermill over a grid of notebook parameters.

**A plan** (`make sweep NB=03_distillation SCALE=paper-gemma-2b [BACKEND=slurm]`): every run of the
study's plan (`rrt.plans`; 05's served models are the same kind of runs) is its own job, `python -m rrt.runs
<run dir>/run.json` (`accelerate launch --num_processes <gpus_per_run>` for several GPUs), launched in waves (a
run that reads another's checkpoint, 03's KD teacher or 04's uptrained model, waits for it). A plan on hub data
starts with the packing wave (`python -m rrt pack`, CPU only, the one job that reaches the hub: it also fetches
the models' weights); every later job runs offline. Last, the collect job reads the run store only: it names the
runs that are not done (`plan_status`) and fails, or renders the notebook with `read_only` set (05's needs a GPU).

`--backend slurm` writes into outputs/sweeps/<notebook>-<scale>/ one sbatch file per wave (an array, one task per
run) with --time from the plan's hours (capped: a longer run continues after a requeue), --requeue, and
--signal=B:USR1 ahead of the limit, which the job's bash trap forwards to the training processes; they
checkpoint and exit 75 and the job requeues itself (`scontrol requeue`), as submitit's Checkpointable does.
submit.sh chains the jobs (afterok; --kill-on-invalid-dep=yes, so a failure cancels what waits on it instead of
leaving it pending forever) and prints each job id; `make sweep-status` reports each run. The local backend runs
the same commands in turn. Why plain sbatch files rather than submitit: they are text a reviewer reads and a
cluster user edits (partition, account, modules) and commits; nothing of ours runs on the login node after
`bash submit.sh`; and our jobs are `accelerate launch` process groups, whereas submitit pickles one Python
callable and handles the signal in that one process, which under a launcher is the wrong one (see TRAP).

**A grid** (`make sweep GRID=params/grids/NAME.yaml [BACKEND=slurm]`): a grid file names a notebook, the params file it starts from and lists of values to combine:

    notebook: 02_relaxation_rank_sweep
    base: params/02_relaxation_rank_sweep/cpu.yaml
    grid: {num_blocks: [2, 3], seed: [0, 1]}

Each combination is one run in outputs/sweeps/<grid>/<key=value,...>/; a run whose DONE marker
exists is skipped, so re-running a sweep finishes what is missing. `--backend slurm` writes an
array-job script (one papermill run per task, each calling `python -m rrt sweep --task`) instead.
Its command line is rrt.cli's `sweep` and `sweep-status`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import shlex
import subprocess
import time
from pathlib import Path

import yaml

from rrt.notebook import load_params, planned
from rrt.rundir import LOCK, RunLock, read_json, write_json, write_text
from rrt.runs.cost import plan_table
from rrt.runs.execute import read_results
from rrt.runs.store import RUN_FILE, write_run_files

REPO = Path(__file__).resolve().parents[2]
DONE = "DONE"
MANIFEST = "jobs.json"  # in a plan's sweep directory: the overrides it was written with, each run's wave and task
RESUMABLE = 75  # a training process's exit status when it checkpointed on a signal and resumes when run again


def expand(grid_file: str | Path) -> tuple[str, list[dict]]:
    """Return (notebook, [parameters of each run]) for a grid file, base params first, grid values over them."""
    spec = yaml.safe_load(Path(grid_file).read_text())
    unknown = set(spec) - {"notebook", "base", "grid"}
    if unknown or "notebook" not in spec or not isinstance(spec.get("grid"), dict):
        raise ValueError(f"{grid_file}: a grid file holds notebook, base (optional) and grid (a mapping); "
                         f"unknown keys: {sorted(unknown)}")
    base = yaml.safe_load((REPO / spec["base"]).read_text()) if spec.get("base") else {}
    keys = list(spec["grid"])
    runs = [{**base, **dict(zip(keys, values))} for values in itertools.product(*spec["grid"].values())]
    return spec["notebook"], runs


def _run_name(params: dict, keys) -> str:
    """Return a run directory name from the grid's own keys: key=value joined by commas."""
    return ",".join(f"{k}={json.dumps(params[k]).replace(' ', '')}" for k in keys) or "base"


def plan(grid_file, out_root: Path) -> list[tuple[str, Path, dict]]:
    """Return [(notebook, run_dir, parameters)] for every run of the grid."""
    notebook, runs = expand(grid_file)
    keys = list(yaml.safe_load(Path(grid_file).read_text())["grid"])
    root = out_root / "sweeps" / Path(grid_file).stem
    return [(notebook, root / _run_name(p, keys), p) for p in runs]


def execute(notebook: str, run_dir: Path, params: dict) -> None:
    """Run one notebook with papermill into run_dir; mark it DONE when it finished without error."""
    import papermill  # lazy: 1.8 s of imports (nbformat's jsonschema) that every other command line would pay

    run_dir.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(REPO / "notebooks" / f"{notebook}.ipynb"), str(run_dir / f"{notebook}.ipynb"),
                               parameters={**params, "run_dir": str(run_dir)}, progress_bar=True, cwd=str(REPO))
    write_text(run_dir / DONE, "ok\n")


def run_local(grid_file, out_root: Path = REPO / "outputs", run=execute) -> list[Path]:
    """Run every incomplete run of the grid in turn; return the run dirs executed now."""
    done_now = []
    for i, (notebook, run_dir, params) in enumerate(plan(grid_file, out_root)):
        if (run_dir / DONE).exists():
            print(f"[{i}] skip (complete): {run_dir}")
            continue
        print(f"[{i}] run: {run_dir}")
        run(notebook, run_dir, params)
        done_now.append(run_dir)
    return done_now


def write_slurm(grid_file, out_root: Path = REPO / "outputs") -> Path:
    """Write an sbatch array script, one papermill run per task; return its path."""
    runs = plan(grid_file, out_root)
    root = out_root / "sweeps" / Path(grid_file).stem
    root.mkdir(parents=True, exist_ok=True)
    script = root / "sweep.sbatch"
    write_text(script, f"""#!/bin/bash
#SBATCH --job-name=rrt-{Path(grid_file).stem}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --gres=gpu:1
#SBATCH --output={root}/slurm-%A_%a.out
# Generated by `make sweep GRID={grid_file} BACKEND=slurm`; submit with: sbatch {script}
cd {REPO}
.venv/bin/python -m rrt sweep {Path(grid_file).resolve()} --task "$SLURM_ARRAY_TASK_ID"
""")
    return script


# ---------------------------------------------------------------- a study's plan as jobs

@dataclasses.dataclass(frozen=True, kw_only=True)
class Slurm:
    """What the plan's jobs ask SLURM for (`python -m rrt sweep --backend slurm`: one flag per field)."""
    env: str = ""                 # shell line that activates the environment in every job, e.g. "conda activate rrt"; empty: source <repo>/.venv/bin/activate
    max_time: str = "24:00:00"    # longest --time asked for ([D-]HH:MM:SS); a longer run checkpoints at the limit and continues after its requeue
    time_factor: float = 1.5      # --time = the wave's longest run (its H100 hours / its GPUs, `make plan`) × this + setup_minutes
    setup_minutes: int = 60       # per training job beyond the planned hours: loading the model and data, the final evaluation
    grace_seconds: int = 900      # --signal=B:USR1@this: SLURM's warning before the time limit, to end a step and write a checkpoint
    cpus_per_gpu: int = 8         # --cpus-per-task of a training job, per GPU
    mem_gb_per_gpu: int = 64      # --mem of a training job, per GPU (host memory: the weights load on the CPU first)
    pack_parts: int = 8           # array tasks of the packing wave (`python -m rrt pack --part K/N`)
    pack_cpus: int = 16           # --cpus-per-task of a packing task, its --workers
    partition: str = ""           # --partition of every job (empty: the cluster's default)

    def __post_init__(self):
        _seconds("max_time", self.max_time)
        for name in ("time_factor", "setup_minutes", "grace_seconds", "cpus_per_gpu", "mem_gb_per_gpu", "pack_parts",
                     "pack_cpus"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.grace_seconds >= _seconds("max_time", self.max_time):
            raise ValueError(f"grace_seconds={self.grace_seconds} must be shorter than max_time={self.max_time}")

    def activate(self) -> str:
        return self.env or f"source {REPO}/.venv/bin/activate"

    def header(self, name: str, log: Path, *, cpus: int, mem_gb: int, seconds: float, gpus: int = 0,
               array: int = 0, dependent: bool = False) -> str:
        """The #SBATCH lines of one job."""
        lines = [f"--job-name={name}", f"--output={log}", "--open-mode=append", "--nodes=1", "--ntasks=1",
                 f"--cpus-per-task={cpus}", f"--mem={mem_gb}G",
                 f"--time={_slurm_time(min(seconds, _seconds('max_time', self.max_time)))}"]
        lines += [f"--array=0-{array - 1}"] if array else []
        lines += [f"--gres=gpu:{gpus}"] if gpus else []
        lines += [f"--partition={self.partition}"] if self.partition else []
        lines += ["--kill-on-invalid-dep=yes"] if dependent else []  # SLURM cancels it when what it waits on fails
        return "\n".join(f"#SBATCH {line}" for line in lines)


def waves(runs) -> list[list]:
    """Return the runs in waves: each run after every run whose checkpoint it reads (`Run.needs`)."""
    depth: dict[str, int] = {}
    for run in runs:  # a plan lists dependencies first
        depth[run.name] = 1 + max((depth[n] for n in run.needs if n in depth), default=-1)
    return [[r for r in runs if depth[r.name] == d] for d in range(max(depth.values(), default=-1) + 1)]


def write_plan_jobs(notebook: str, scale: str, out_root: Path = REPO / "outputs", slurm: Slurm | None = None,
                    **overrides) -> Path:
    """Write the plan's run files, its sbatch files (packing, one array per wave, the collect job) and submit.sh,
    which submits them chained; return submit.sh."""
    slurm = slurm or Slurm()
    study, recipe, runs = _plan_runs(notebook, scale, overrides)
    root = sweep_root(notebook, scale, out_root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = []  # (shell variable, sbatch file, dependency kind)
    if recipe.data_source == "hub":
        jobs += [("pack", _write_pack(root, notebook, scale, slurm, study, runs), None),
                 ("fetch", _write_fetch(root, notebook, scale, slurm, study, runs), "afterok")]
    manifest = {}
    table = plan_table(study.runs())  # the whole plan: a later wave's rows name the runs they read
    hours = dict(zip(table["run_dir"], table["h100_hours"]))
    for i, wave in enumerate(waves(runs)):
        jobs.append((f"w{i}", _write_wave(root, i, wave, notebook, scale, slurm, hours), "afterok"))
        manifest.update({r.dir.name: {"run": r.name, "wave": i, "task": k} for k, r in enumerate(wave)})
    jobs.append(("collect", _write_collect(root, study, notebook, scale, slurm, overrides), "afterany"))
    write_json(root / MANIFEST, {"notebook": notebook, "scale": scale, "overrides": overrides, "runs": manifest})
    lines = ["#!/bin/bash", f"# Generated by `make sweep NB={notebook} SCALE={scale} BACKEND=slurm`: bash {root}/submit.sh",
             "set -euo pipefail", f"cd {REPO}"]
    done = []
    for var, script, kind in jobs:
        # afterok chains the training waves (a failure cancels what follows: --kill-on-invalid-dep); the collect job
        # waits for every one of them to end, however it ended, and reports
        after = {"afterok": done[-1:], "afterany": [v for v in done if v.startswith("w")] or done[-1:]}.get(kind, [])
        dependency = f"--dependency={kind}:{':'.join('$' + v for v in after)} " if after else ""
        lines += [f"{var}=$(sbatch --parsable {dependency}{script})", f"{var}=${{{var}%%;*}}",  # "id;cluster" on federations
                  f'echo "{var}: job $' + var + f' ({script.name})"']
        done.append(var)
    lines.append(f'echo "status: make sweep-status NB={notebook} SCALE={scale}"')
    submit = root / "submit.sh"
    write_text(submit, "\n".join(lines) + "\n")
    return submit


def run_plan_locally(notebook: str, scale: str, shell=None, **overrides) -> list[str]:
    """Run every missing run of the plan as its own job, in waves, on this machine (packing first); return the
    commands run. The notebook itself (`make run`) then collects: it reads back every finished run."""
    _, recipe, runs = _plan_runs(notebook, scale, overrides)
    shell = shell or (lambda cmd: subprocess.run(cmd, shell=True, check=True, cwd=REPO))
    commands = [f".venv/bin/python -m rrt pack {notebook} {scale}"] if recipe.data_source == "hub" else []
    commands += [".venv/bin/" + _launch_command(run) for wave in waves(runs) for run in wave]
    for command in commands:
        print(f"run: {command}")
        shell(command)
    return commands


def sweep_root(notebook: str, scale: str, out_root: Path = REPO / "outputs") -> Path:
    """The directory of a plan's sbatch files, job logs and job exit statuses."""
    return Path(out_root) / "sweeps" / f"{notebook}-{scale}"


def plan_status(notebook: str, scale: str, out_root: Path = REPO / "outputs", **overrides) -> list[dict]:
    """Return one row per run of the plan: run, state, newest checkpoint step, log, run_dir.

    state: done | running (lock held: <holder>) | failed (exit N) | trained-not-evaluated |
    interrupted at step N | not started. The overrides `make sweep` wrote the plan with (its jobs.json) apply."""
    root = sweep_root(notebook, scale, out_root)
    manifest = read_json(root / MANIFEST) or {"overrides": {}, "runs": {}}
    study = load_params(notebook, scale, **{**manifest["overrides"], **overrides})
    recipe = planned(study)
    if recipe is None:
        raise ValueError(f"{notebook} trains nothing: there is no plan to report on")
    rows = []
    for run in study.runs():
        job = manifest["runs"].get(run.dir.name)
        logs = sorted(root.glob(f"slurm-w{job['wave']}-*_{job['task']}.out"), key=lambda p: p.stat().st_mtime) \
            if job else []
        step = _newest_step(run.dir)
        rows.append({"run": run.name, "state": _state(run, recipe.eval_spec(), root / "exit" / run.dir.name, step),
                     "step": step, "log": str(logs[-1]) if logs else "-", "run_dir": str(run.dir)})
    return rows


def _state(run, evaluation, exit_file: Path, step: int | None) -> str:
    lock = run.dir / LOCK
    # a live writer refreshes its lock's time (RunLock's heartbeat); a killed job's lock goes stale and means nothing
    if lock.exists() and time.time() - lock.stat().st_mtime <= RunLock(run.dir).stale_after_s:
        holder = lock.read_text(errors="replace").strip() or "holder unknown"
        return f"running (lock held: {holder})"
    if read_results(run, evaluation) is not None:
        return "done"
    status = int(exit_file.read_text()) if exit_file.exists() else None
    if status not in (None, 0, RESUMABLE):
        return f"failed (exit {status})"
    if run.trained():
        return "trained-not-evaluated"
    return f"interrupted at step {step}" if step else "not started"


def _newest_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint directory (names only: verifying a 10 GB checkpoint is resume's job)."""
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return max(steps, default=None)


def _plan_runs(notebook: str, scale: str, overrides: dict):
    """Return (the study, the recipe its runs follow, its runs not done), after writing every run.json.

    Not done: without results for this recipe's evaluation. A run another notebook trained (01's Stepwise model in
    04) is then a job too, which only evaluates it: the collect job reads results and computes none."""
    study = load_params(notebook, scale, **overrides)
    recipe = planned(study)
    if recipe is None:
        raise ValueError(f"{notebook} trains nothing: run it with `make run NB={notebook} SCALE={scale}`")
    write_run_files(study.runs(), recipe.data_spec(), recipe.eval_spec())
    return study, recipe, [r for r in study.runs() if read_results(r, recipe.eval_spec()) is None]


def _launch_command(run) -> str:
    """Return the shell command that trains and evaluates one run as its own job (PATH: the job's environment)."""
    run_file = run.dir / RUN_FILE
    if run.config.num_processes == 1:
        return f"python -m rrt.runs {run_file}"
    return (f"accelerate launch --config_file params/accelerate/ddp.yaml "
            f"--num_processes {run.config.num_processes} -m rrt.runs {run_file}")


def _preamble(slurm: Slurm, *, offline: bool = True) -> str:
    return "\n".join([f"cd {REPO}", slurm.activate()] + (
        ["export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the packing wave fetched what the jobs read: none reaches "
         "the hub"] if offline else []))


def _write_pack(root, notebook, scale, slurm, study, runs) -> Path:
    script = root / "pack.sbatch"
    header = slurm.header(f"rrt-{notebook}-{scale}-pack", root / "slurm-pack-%A_%a.out", cpus=slurm.pack_cpus,
                          mem_gb=4 * slurm.pack_cpus, seconds=_seconds("max_time", slurm.max_time),
                          array=slurm.pack_parts)
    write_text(script, f"""#!/bin/bash
{header}
#SBATCH --requeue
# The packing wave: tokenizes the plan's hub corpora into shards under outputs/packed/ (`make pack`), CPU only.
# Each task packs its share of the shards; a finished shard is never redone, so a requeued task resumes.
set -euo pipefail
{_preamble(slurm, offline=False)}
python -m rrt pack {notebook} {scale} --workers "$SLURM_CPUS_PER_TASK" --part "$SLURM_ARRAY_TASK_ID/{slurm.pack_parts}"
""")
    return script


def _write_fetch(root, notebook, scale, slurm, study, runs) -> Path:
    """The packing wave's last job: the packed set's index (every shard is there by now), and the models' weights
    in the HF cache, so that every later job runs offline."""
    models = sorted({study.model, *(r.config.model for r in runs)})
    hub = [m for m in models if "/" in m and not Path(m).exists()]
    script = root / "fetch.sbatch"
    header = slurm.header(f"rrt-{notebook}-{scale}-fetch", root / "slurm-fetch-%j.out", cpus=slurm.pack_cpus,
                          mem_gb=4 * slurm.pack_cpus, seconds=_seconds("max_time", slurm.max_time), dependent=True)
    downloads = "\n".join(f'hf download {m} --include "*.json" "*.safetensors" "tokenizer*"' for m in hub)
    if getattr(study, "data_source", "") == "hub" and study.tasks:  # lm-eval's built-in tasks: their hub datasets
        downloads += f"\npython -c 'from rrt.evaluation import download_tasks; download_tasks({json.dumps(study.tasks)})'"
    write_text(script, f"""#!/bin/bash
{header}
# After every packing task: the same command without --part finds each shard done and writes the index.
set -euo pipefail
{_preamble(slurm, offline=False)}
python -m rrt pack {notebook} {scale} --workers "$SLURM_CPUS_PER_TASK"
{downloads}
""")
    return script


def _write_wave(root, i, wave, notebook, scale, slurm, h100_hours) -> Path:
    gpus = max(r.config.num_processes for r in wave)
    hours = max(h100_hours[r.dir.name] / r.config.num_processes for r in wave)
    seconds = hours * 3600 * slurm.time_factor + slurm.setup_minutes * 60
    cases = "\n".join(f"  {k}) run_dir={r.dir}; launcher={int(r.config.num_processes > 1)}; "
                      f"cmd=({_launch_command(r)}) ;;  # {r.name}" for k, r in enumerate(wave))
    script = root / f"wave{i}.sbatch"
    header = slurm.header(f"rrt-{notebook}-{scale}-w{i}", root / f"slurm-w{i}-%A_%a.out", cpus=slurm.cpus_per_gpu * gpus,
                          mem_gb=slurm.mem_gb_per_gpu * gpus, seconds=seconds, gpus=gpus, array=len(wave),
                          dependent=True)
    write_text(script, f"""#!/bin/bash
{header}
#SBATCH --requeue
#SBATCH --signal=B:USR1@{slurm.grace_seconds}
# Wave {i} of the plan (`make plan NB={notebook} SCALE={scale}`), one array task per run.
# --time: the wave's longest run ({hours:.1f} h on its GPUs) × {slurm.time_factor} + {slurm.setup_minutes} min, at most
# {slurm.max_time}; a run still training at the limit checkpoints on SLURM's warning and is requeued, resuming there.
set -uo pipefail  # not -e: the run's exit status decides below between requeue and failure
{_preamble(slurm)}
case "$SLURM_ARRAY_TASK_ID" in
{cases}
  *) echo "wave {i} has no array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
{TRAP.replace('{exit_dir}', str(root / 'exit'))}""")
    return script


def _write_collect(root, study, notebook, scale, slurm, overrides) -> Path:
    """The last job: reads the run store only (`read_only`): names what is missing and fails, or renders the
    notebook. 05's notebook serves the models, so it gets one GPU; the others read tables on a CPU."""
    gpus = 1 if notebook == "05_throughput" else 0
    params = f" -y {shlex.quote(json.dumps(overrides))}" if overrides else ""
    script = root / "collect.sbatch"
    header = slurm.header(f"rrt-{notebook}-{scale}-collect", root / "slurm-collect-%j.out", cpus=slurm.cpus_per_gpu,
                          mem_gb=slurm.mem_gb_per_gpu, seconds=_seconds("max_time", slurm.max_time), gpus=gpus,
                          dependent=True)
    write_text(script, f"""#!/bin/bash
{header}
# Trains nothing: lists the runs that are not done with their logs and exits 1, or renders the notebook from the
# finished run directories (read_only: the notebook stops, naming a run, rather than train it).
set -euo pipefail
{_preamble(slurm)}
python -m rrt sweep-status {notebook} {scale} --check --out-root {root.parents[1]}
base={root.parents[1]}/{notebook}/{scale}-$(date +%Y%m%d-%H%M%S); run_dir=$base; n=1
mkdir -p "$(dirname "$base")"  # then mkdir creates the run directory or fails: a taken name gets -2, -3, ...
until mkdir "$run_dir" 2>/dev/null; do test -d "$run_dir" || {{ mkdir "$run_dir"; exit 1; }}; n=$((n + 1)); run_dir=$base-$n; done
python -m rrt.nbrun notebooks/{notebook}.ipynb "$run_dir/{notebook}.ipynb" -f params/{notebook}/{scale}.yaml{params} \\
  -p read_only True -p run_dir "$run_dir" --log-output --no-progress-bar
""")
    return script


def _seconds(name: str, text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", text)
    if not match:
        raise ValueError(f"{name}={text!r} is not a SLURM time [D-]HH:MM:SS, e.g. 24:00:00 or 2-00:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _slurm_time(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 1440}-{minutes % 1440 // 60:02d}:{minutes % 60:02d}:00"


# The training job's end: the run in the background, SLURM's warning forwarded, requeued when it checkpointed.
TRAP = r"""exit_file=""" + "{exit_dir}" + r"""/$(basename "$run_dir")
mkdir -p "$(dirname "$exit_file")"
rm -f "$exit_file"
warned=0
forward() {
  # SLURM's warning (--signal=B:USR1) reaches this shell only. Under accelerate launch it goes to the workers,
  # the launcher's children, not to the launcher: torch's elastic agent has no handler for SIGUSR1 (it would die
  # and orphan its workers), and on SIGTERM it kills the workers 30 s later, too soon to write a checkpoint.
  # Each training process ends its optimiser step, writes a checkpoint and exits 75.
  if (( launcher )); then pkill -USR1 -P "$pid"; else kill -USR1 "$pid"; fi
}
trap 'warned=1; forward' USR1
trap forward TERM  # scancel or preemption: checkpoint if there is time, never requeue here (SLURM decides)
"${cmd[@]}" &  # in the background: bash runs a trap only when the command it waits on returns, and `wait` returns
pid=$!
while wait "$pid"; status=$?; kill -0 "$pid" 2>/dev/null; do :; done  # a trap interrupts wait: wait again
echo "$status" > "$exit_file"
# After the warning the run exits 75: it wrote a checkpoint and resumes exactly when run again. Under accelerate
# launch a worker's 75 reaches this shell as the launcher's 1 (torch elastic reports any failed worker so): after
# the warning, any failure is taken for the interrupted run it almost surely is; the rerun resumes or fails anew.
# Without the warning (scancel, preemption) nothing is requeued here: a cancelled job stays cancelled.
if (( warned && status != 0 )); then
  echo "requeueing job $SLURM_JOB_ID: $run_dir resumes from its newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
"""
