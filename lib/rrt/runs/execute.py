"""The one loop that trains a run or reads it back, and the tidy tables a plan's runs give.

`run_plan` walks a plan in order. A run whose results are already in its directory (same config
hash, same evaluation) is read back, not retrained; a run trained elsewhere (a cluster job:
`python -m rrt.runs <run dir>/run.json`) is only evaluated; anything else is trained here. Every
table is rewritten after each run, so a crash loses at most the run in flight. `train_runs` is the
same walk without evaluation, for runs that are served rather than scored (05).

Tables keep two namespaces apart: a run's tags (its name, role and distinguishing fields, as in
runs.csv) and its metrics (`loss`, `loss/ce`, `loss/kd`, `ppl/loop_0`, …; loops numbered from 0).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import PartialState

from rrt.data import PACKED_CACHE, load_packed
from rrt.evaluation import few_shot, per_loop_perplexity, perplexity, save_results
from rrt.models import load_model
from rrt.progress import GridProgress, nested_bars_off
from rrt.recursive import count_parameters
from rrt.rundir import read_json, versions, write_json
from rrt.runs.memory import check_fits
from rrt.runs.store import PRETRAINED, DataSpec, EvalSpec, Run, read_run_file
from rrt.shards import PackedShards, pack_sets, packed_path
from rrt.spec import num_loops
from rrt.train.loop import train

TABLES = ("runs", "curves", "perplexity", "accuracy")


@dataclass
class StudyData:
    """Packed token sequences: the training set and each held-out set by name ("corpus/split")."""
    train: object
    evals: dict


def load_data(spec: DataSpec, tokenizer, cache_dir=PACKED_CACHE) -> StudyData:
    """Return the packed training and held-out sequences of a `DataSpec`, cached and memory-mapped.

    A hub corpus is read from the shards `make pack` wrote (under spec.packed_dir, default outputs/packed;
    missing ones are an error naming the command, never packed here), their content verified by the main process
    (the processes of a launch read the same files); an embedded one is packed in-process.
    """
    if spec.data_source == "hub":
        verify = PartialState(cpu=not torch.cuda.is_available()).is_main_process
        sets = [PackedShards(packed_path(s, tokenizer, root=spec.packed_dir or None), verify=verify)
                for s in pack_sets(spec)]
        return StudyData(train=sets[0], evals=dict(zip(spec.eval_corpora, sets[1:])))
    common = dict(tokenizer=tokenizer, seq_len=spec.seq_len, source=spec.data_source, cache_dir=cache_dir)
    train_seqs = load_packed(spec.train_corpus, spec.train_split, max_seqs=spec.max_train_seqs, **common)
    evals = {}
    for name in spec.eval_corpora:
        corpus, _, split = name.partition("/")
        evals[name] = load_packed(corpus, split or "test", max_seqs=spec.max_eval_seqs, **common)
    return StudyData(train=train_seqs, evals=evals)


def run_plan(study, *, original, tokenizer, data: StudyData, run_dir: Path) -> dict[str, pd.DataFrame]:
    """Train (or read back) and evaluate each run of a study's plan in order; return the tidy tables,
    written after every run (a crash loses at most the run in flight).

    study: an `rrt.plans` training study (its cached `runs()`, `eval_spec()` and `to_dict()` are read).
    """
    evaluation = study.eval_spec()
    rows = {k: [] for k in TABLES}
    runs = study.runs()
    if study.read_only:  # the sweep's collect job: the runs were jobs; training one here would be a second copy
        check_done(runs, lambda run: read_results(run, evaluation) is not None, study.notebook, "evaluated")
    grid = GridProgress(len(runs), desc="runs")
    with nested_bars_off():
        for run in runs:
            grid.start(run.name, steps=run.config.steps)
            results = read_results(run, evaluation)
            if results:
                grid.done("read back")
            else:
                grid.note("training")
                results = execute(run, original=original, tokenizer=tokenizer, data=data, evaluation=evaluation,
                                  grid=grid)
                grid.done()
            tags = {"run": run.name, "role": run.role, **{k: _tag(v) for k, v in run.tags.items()}}
            rows["runs"].append(_merge(tags, {"run_dir": run.dir.name, "config_hash": run.key,
                                              "tokens": run.tokens, **results["summary"]}))
            for name in ("curves", "perplexity", "accuracy"):
                rows[name] += [_merge(tags, r) for r in results[name]]
            save_tables(run_dir, study, **_frames(rows))
    grid.close()
    return _frames(rows)


def check_done(runs: list[Run], done, notebook: str, what: str) -> None:
    """Raise naming every run for which `done(run)` is false (a read-only study trains nothing)."""
    missing = [run for run in runs if not done(run)]
    if missing:
        names = "; ".join(f"{run.name!r} ({'trained, not evaluated' if run.trained() else 'not trained'}: "
                          f"{run.dir / 'run.json'})" for run in missing)
        raise RuntimeError(f"read_only: {len(missing)} of {len(runs)} runs are not {what}, and a read-only study "
                           f"trains nothing: {names}. Run each as a job (`python -m rrt.runs <run.json>`, "
                           f"`make sweep NB={notebook} SCALE=..`; `make sweep-status` shows their logs), or run the "
                           f"notebook with read_only=False")


def train_runs(runs: list[Run], *, original, data: StudyData, desc: str = "runs") -> list[Path]:
    """Train every run not yet done, in order (no evaluation); return each run's final checkpoint."""
    grid = GridProgress(len(runs), desc=desc)
    with nested_bars_off():
        for run in runs:
            grid.start(run.name, steps=run.config.steps)
            if run.trained():
                grid.done("read back")
                continue
            grid.note("training")
            _train(run, original=original, data=data, grid=grid)
            grid.done()
    grid.close()
    return [run.final_checkpoint for run in runs]


def execute(run: Run, *, original, tokenizer, data: StudyData, evaluation: EvalSpec, grid=None) -> dict:
    """Train `run` (resuming whatever it has), evaluate it, write its results file; return the results.
    A pretrained run trains nothing: `original` itself is evaluated (checkpoint "-", no curves).
    grid: the `GridProgress` that shows this run's steps (None: training draws its own bar)."""
    result = None if run.role == PRETRAINED else _train(run, original=original, data=data, grid=grid)
    if not PartialState().is_main_process:  # under a multi-process launch, one process evaluates
        return {}
    if grid:
        grid.note("evaluating")
    model = (result.model if result else original.to(PartialState().device)).eval()  # as train() moves it
    results = {"summary": {"checkpoint": str(Path(result.checkpoint).relative_to(run.dir)) if result else "-",
                           **count_parameters(model)},  # the checkpoint: in the run store
               "curves": [r for r in result.metrics if r["kind"] == "train"] if result else [],
               "perplexity": _evaluate_perplexity(model, data, per_loop=evaluation.per_loop),
               "accuracy": (_evaluate_accuracy(model, tokenizer, evaluation).to_dict("records")
                            if evaluation.tasks else [])}
    write_json(_results_path(run, evaluation), results)  # atomic: a results file is whole or absent
    return results


def execute_run(path: str | Path):
    """Train and evaluate the run of a run.json (`python -m rrt.runs`): the cluster's unit of work.

    Under a multi-process launcher every process trains (DDP/ZeRO); each node's first process packs
    the data while the others wait; the main process evaluates and writes the run's results file.
    """
    run, data, evaluation = read_run_file(path)
    check_memory(run)
    original, tokenizer = load_model(run.config.model)
    with PartialState(cpu=not torch.cuda.is_available()).local_main_process_first():
        packed = load_data(data, tokenizer)
    results = execute(run, original=original, tokenizer=tokenizer, data=packed, evaluation=evaluation)
    if results:
        print(f"run {run.name!r} done: {run.dir}")
    return results


def read_results(run: Run, evaluation: EvalSpec) -> dict | None:
    """Return a finished run's results for this evaluation, or None (not trained, or evaluated otherwise)."""
    results = read_json(_results_path(run, evaluation))
    return results if results is not None and run.trained() else None


def _train(run: Run, *, original, data: StudyData, grid=None):
    """Train one run on the data's training sequences, after checking the checkpoints it reads are there."""
    reads = [p for p in (run.config.init_from, run.config.teacher) if p and run.needs]
    missing = [p for p in reads if not (Path(p) / "model.safetensors").exists()]
    if missing:
        raise ValueError(f"run {run.name!r} reads {missing} (the final checkpoint of {list(run.needs)}), which is "
                         f"not there yet: train the plan in order (its runs are listed dependencies first)")
    check_memory(run)
    return train(run.config, train_seqs=data.train, original=original, progress=grid.step if grid else None)


def check_memory(run: Run) -> None:
    """Refuse, before any weights load, a run whose memory estimate exceeds the GPU it would train on (on CUDA; a
    plan with gpu_memory_gb already sized every run to 90% of that number, rrt.runs.memory.fit_memory)."""
    if torch.cuda.is_available() and run.role != PRETRAINED:  # nothing trains: evaluation only
        device = torch.cuda.current_device()
        check_fits(run.config, name=run.name, limit_bytes=torch.cuda.get_device_properties(device).total_memory,
                   where=f"cuda:{device} ({torch.cuda.get_device_name(device)})")


def _results_path(run: Run, evaluation: EvalSpec) -> Path:
    key = hashlib.sha256(json.dumps(evaluation.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return run.dir / f"results-{key}.json"


def _merge(tags: dict, metrics: dict) -> dict:
    clash = set(tags) & set(metrics)
    if clash:
        raise ValueError(f"metric names {sorted(clash)} collide with run tags; rename the metric")
    return {**tags, **metrics}


def _tag(value):
    return value if isinstance(value, (int, float, bool)) else str(value)


def _frames(rows: dict) -> dict[str, pd.DataFrame]:
    return {k: pd.DataFrame(v) for k, v in rows.items()}


def _evaluate_perplexity(model, data: StudyData, *, per_loop: bool = False) -> list[dict]:
    """Return rows (corpus, loop_idx, perplexity) on every held-out set; loop_idx None = the model's output."""
    rows = []
    for corpus, seqs in data.evals.items():
        if per_loop and num_loops(model) > 1:
            rows += [{"corpus": corpus, "loop_idx": int(r.loop_idx), "perplexity": float(r.perplexity)}
                     for r in per_loop_perplexity(model, seqs).itertuples()]
        else:
            rows.append({"corpus": corpus, "loop_idx": None, "perplexity": perplexity(model, seqs)})
    return rows


def _evaluate_accuracy(model, tokenizer, evaluation: EvalSpec) -> pd.DataFrame:
    """Return few-shot accuracy rows on the evaluation's tasks (every loop exit if per_loop)."""
    loops = range(num_loops(model)) if evaluation.per_loop else [None]
    return pd.concat([few_shot(model, tokenizer, tasks=list(evaluation.tasks), limit=evaluation.task_limit,
                               loop_idx=b, batch_size=8, source=evaluation.data_source) for b in loops],
                     ignore_index=True)


def average_accuracy(acc: pd.DataFrame, by=("run",)) -> pd.DataFrame:
    """Return the mean accuracy over tasks per run (and loop), the paper's "Avg" column."""
    if acc.empty:
        return pd.DataFrame(columns=[*by, "avg_accuracy"])
    keys = list(by) + (["loop_idx"] if "loop_idx" in acc and acc["loop_idx"].notna().any() else [])
    return acc.groupby(keys, dropna=False)["value"].mean().rename("avg_accuracy").reset_index()


def by_role(tables: dict[str, pd.DataFrame], *roles: str) -> dict[str, pd.DataFrame]:
    """Return the tables with only the rows of runs in `roles` (study | baseline | variant | uptrained);
    tables without a `role` column are returned whole."""
    return {k: v[v["role"].isin(roles)].reset_index(drop=True) if "role" in v else v for k, v in tables.items()}


def save_tables(run_dir: Path, study, **tables: pd.DataFrame) -> None:
    """Write each table as <name>.csv and <name>.json (rows + the study's parameters that produced them)."""
    found = versions()  # once per call: it asks git twice
    for name, df in tables.items():
        save_results(df, run_dir, params=study.to_dict(), name=name, versions=found)
