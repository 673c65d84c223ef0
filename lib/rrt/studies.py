"""The notebooks' studies carried out: a plan's runs trained, evaluated and collected into tidy tables.

`run_plan` walks a plan (`rrt.plans`) in order. A run whose results are already in its directory
(same config hash, same evaluation) is read back, not retrained; a run trained elsewhere (a cluster
job: `python -m rrt.train --config <run dir>/run.json`) is only evaluated; anything else is trained
here. Every table is rewritten after each run, so a crash loses at most the run in flight.

Tables keep two namespaces apart: a run's tags (its name, role and distinguishing fields, as in
runs.csv) and its metrics (`loss`, `loss/ce`, `loss/kd`, `ppl/loop_0`, …; loops numbered from 0).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

import rrt
from rrt.data import PACKED_CACHE, load_packed
from rrt.evaluation import few_shot, per_loop_perplexity, perplexity, save_results
from rrt.plans import Run, Study, TrainingStudy
from rrt.recursive import num_loops
from rrt.rundir import read_json, versions, write_json

TABLES = ("runs", "curves", "perplexity", "accuracy")


@dataclass
class StudyData:
    """Packed token sequences: the training set and each held-out set by name ("corpus/split")."""
    train: object
    evals: dict


def data_spec(study: TrainingStudy) -> dict:
    """Return what to pack: corpora, length, and how many training sequences (a hub corpus: the study's
    max_train_seqs, which its validation checks covers the furthest-reading run; never all of SlimPajama)."""
    return {"train_corpus": study.train_corpus, "train_split": study.train_split, "data_source": study.data_source,
            "seq_len": study.seq_len, "max_train_seqs": study.max_train_seqs, "eval_corpora": list(study.eval_corpora),
            "max_eval_seqs": study.max_eval_seqs}


def evaluation_spec(study: TrainingStudy) -> dict:
    """Return what a finished run is evaluated on (its results file is keyed by this)."""
    return {"eval_corpora": list(study.eval_corpora), "max_eval_seqs": study.max_eval_seqs, "seq_len": study.seq_len,
            "data_source": study.data_source, "tasks": list(study.tasks), "task_limit": study.task_limit,
            "per_loop": study.per_loop}


def study_data(spec: dict, tokenizer, cache_dir=PACKED_CACHE) -> StudyData:
    """Return the packed training and held-out sequences of a `data_spec`, cached and memory-mapped."""
    common = dict(tokenizer=tokenizer, seq_len=spec["seq_len"], source=spec["data_source"], cache_dir=cache_dir)
    train = load_packed(spec["train_corpus"], spec["train_split"], max_seqs=spec["max_train_seqs"], **common)
    evals = {}
    for name in spec["eval_corpora"]:
        corpus, _, split = name.partition("/")
        evals[name] = load_packed(corpus, split or "test", max_seqs=spec["max_eval_seqs"], **common)
    return StudyData(train=train, evals=evals)


def run_plan(study: TrainingStudy, *, original, tokenizer, data: StudyData, run_dir: Path) -> dict[str, pd.DataFrame]:
    """Train (or read back) and evaluate each run of the study's plan in order; return the tidy tables,
    written after every run (a crash loses at most the run in flight)."""
    evaluation = evaluation_spec(study)
    rows = {k: [] for k in TABLES}
    runs = study.runs()
    for run in tqdm(runs, desc="runs"):
        results = read_results(run, evaluation) or execute(run, original=original, tokenizer=tokenizer, data=data,
                                                           evaluation=evaluation)
        tags = {"run": run.name, "role": run.role, **{k: _tag(v) for k, v in run.tags.items()}}
        rows["runs"].append(_merge(tags, {"run_dir": run.dir.name, "config_hash": run.key,
                                          "tokens": run.tokens, **results["summary"]}))
        for name in ("curves", "perplexity", "accuracy"):
            rows[name] += [_merge(tags, r) for r in results[name]]
        save_tables(run_dir, study, **_frames(rows))
    return _frames(rows)


def execute(run: Run, *, original, tokenizer, data: StudyData, evaluation: dict) -> dict:
    """Train `run` (resuming whatever it has), evaluate it, write its results file; return the results."""
    from accelerate import PartialState

    from rrt.train import train

    reads = [p for p in (run.config.init_from, run.config.teacher) if p and run.needs]
    missing = [p for p in reads if not (Path(p) / "model.safetensors").exists()]
    if missing:
        raise ValueError(f"run {run.name!r} reads {missing} (the final checkpoint of {list(run.needs)}), which is "
                         f"not there yet: train the plan in order (its runs are listed dependencies first)")
    result = train(run.config, train_blocks=data.train, original=original)
    if not PartialState().is_main_process:  # under a multi-process launch, one process evaluates
        return {}
    model = result.model.eval()
    results = {"summary": {"checkpoint": str(Path(result.checkpoint).relative_to(run.dir)),  # in the run store
                           **rrt.count_parameters(model)},
               "curves": [r for r in result.metrics if r["kind"] == "train"],
               "perplexity": evaluate_perplexity(model, data, per_loop=evaluation["per_loop"]),
               "accuracy": (evaluate_accuracy(model, tokenizer, evaluation).to_dict("records")
                            if evaluation["tasks"] else [])}
    write_json(_results_path(run, evaluation), results)  # atomic: a results file is whole or absent
    return results


def read_results(run: Run, evaluation: dict) -> dict | None:
    """Return a finished run's results for this evaluation, or None (not trained, or evaluated otherwise)."""
    path = _results_path(run, evaluation)
    results = read_json(path)
    return results if results is not None and run.trained() else None


def _results_path(run: Run, evaluation: dict) -> Path:
    key = hashlib.sha256(json.dumps(evaluation, sort_keys=True).encode()).hexdigest()[:8]
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


def evaluate_perplexity(model, data: StudyData, *, per_loop: bool = False) -> list[dict]:
    """Return rows (corpus, loop_idx, perplexity) on every held-out set; loop_idx None = the model's output."""
    rows = []
    for corpus, seqs in data.evals.items():
        if per_loop and num_loops(model) > 1:
            rows += [{"corpus": corpus, "loop_idx": int(r.loop_idx), "perplexity": float(r.perplexity)}
                     for r in per_loop_perplexity(model, seqs).itertuples()]
        else:
            rows.append({"corpus": corpus, "loop_idx": None, "perplexity": perplexity(model, seqs)})
    return rows


def evaluate_accuracy(model, tokenizer, evaluation: dict) -> pd.DataFrame:
    """Return few-shot accuracy rows on the evaluation's tasks (every loop exit if per_loop)."""
    loops = range(num_loops(model)) if evaluation.get("per_loop") else [None]
    return pd.concat([few_shot(model, tokenizer, tasks=list(evaluation["tasks"]), limit=evaluation["task_limit"],
                               loop_idx=b, batch_size=8) for b in loops], ignore_index=True)


def average_accuracy(acc: pd.DataFrame, by=("run",)) -> pd.DataFrame:
    """Return the mean accuracy over tasks per run (and loop), the paper's "Avg" column."""
    if acc.empty:
        return pd.DataFrame(columns=[*by, "avg_accuracy"])
    keys = list(by) + (["loop_idx"] if "loop_idx" in acc and acc["loop_idx"].notna().any() else [])
    return acc.groupby(keys, dropna=False)["value"].mean().rename("avg_accuracy").reset_index()


def save_tables(run_dir: Path, study: Study, **tables: pd.DataFrame) -> None:
    """Write each table as <name>.csv and <name>.json (rows + the study that produced them)."""
    found = versions()  # once per call: it asks git twice
    for name, df in tables.items():
        save_results(df, run_dir, params=study.to_dict(), name=name, versions=found)


# ---------------------------------------------------------------- no training: conversions only

def init_perplexity(model, sequences, *, num_blocks=2, inits=("stepwise", "average", "lower"),
                    ranks=(0, 64, 128, 256, "full"), untie_norms=(False, True), batch_size=8) -> pd.DataFrame:
    """Return held-out perplexity right after conversion for each init × LoRA rank × norm tying.

    SVD init (eq. 4) makes rank interpolate between the recursive model (r=0) and, with per-depth
    norms, the original (full rank): the paper's "perplexity at initialisation" view (Fig. 16).
    """
    from rrt.relax import truncate_lora

    full = max(min(w.shape) for w in model.parameters() if w.ndim == 2)
    rows = [{"model": "original", "init": "-", "lora_rank": "-", "untie_norms": "-",
             "perplexity": perplexity(model, sequences, batch_size=batch_size), **rrt.count_parameters(model)}]
    # One full-rank SVD conversion per (init, tying); lower ranks truncate it (truncate_lora), largest first.
    by_size = sorted(ranks, key=lambda r: full if r == "full" else r, reverse=True)
    for init, untie in tqdm(list(itertools.product(inits, untie_norms)), desc="init perplexity"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full rank is clamped per matrix on purpose
            rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=num_blocks, init=init, untie_norms=untie,
                                                       lora_rank=full))
        for rank in by_size:
            truncate_lora(rec, full if rank == "full" else rank)
            rows.append({"model": f"B={num_blocks}", "init": init, "lora_rank": rank, "untie_norms": untie,
                         "perplexity": perplexity(rec, sequences, batch_size=batch_size),
                         **rrt.count_parameters(rec)})
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Perplexity right after conversion (no training).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="wikitext2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-seqs", type=int, default=16)
    parser.add_argument("--out", default=None, help="CSV path for the table")
    args = parser.parse_args(argv)
    model, tok = rrt.load_model(args.model)
    seqs = load_packed(args.corpus, args.split, tokenizer=tok, seq_len=args.seq_len, max_seqs=args.max_seqs)
    df = init_perplexity(model, seqs, num_blocks=args.num_blocks)
    print(df.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        df.to_csv(args.out, index=False)


# ---------------------------------------------------------------- serving (notebook 05)

def throughput_study(model, tokenizer, study) -> dict[str, pd.DataFrame]:
    """Return the real benchmark and the paper-method simulation for every (B, LoRA rank) (Fig. 8, Tables 16–17).

    Tables: "throughput" (one row per system and configuration, ratios to vanilla static batching),
    "simulated", "real_vs_simulated", "block_times", and "accuracy" (few-shot accuracy of the vanilla
    and each recursive model; oracle exits emit the last loop's tokens, so they share its accuracy).
    """
    from rrt.serving.bench import real_vs_simulated, run_benchmark, run_simulation

    knobs = dict(num_requests=study.num_requests, prompt_len=study.prompt_len, new_tokens=study.new_tokens,
                 token_budget=study.token_budget, max_active=study.max_active, repeats=study.repeats, seed=study.seed)
    evaluation = {"tasks": list(study.tasks), "task_limit": study.task_limit}
    tables = {"throughput": [], "simulated": [], "real_vs_simulated": [], "block_times": [], "accuracy": []}
    scored = bool(study.tasks) and tokenizer is not None  # dummy-weight models have no tokenizer
    if scored:
        tables["accuracy"].append(evaluate_accuracy(model, tokenizer, evaluation).assign(model="vanilla"))
    for b, rank in tqdm(list(itertools.product(study.num_blocks, study.lora_ranks)), desc="configs"):
        tag = {"num_blocks": b, "lora_rank": rank}
        rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=b, lora_rank=rank))
        bench = run_benchmark(model, tokenizer, recursive=rec, num_blocks=b, lora_rank=rank, **knobs)
        sim, blocks = run_simulation(model, rec, bench.attrs["trajectories"], max_active=study.max_active,
                                     prompt_len=study.prompt_len, new_tokens=study.new_tokens)
        tables["throughput"].append(bench.assign(**tag))
        tables["simulated"].append(sim.assign(**tag))
        tables["real_vs_simulated"].append(real_vs_simulated(bench, sim).assign(**tag))
        tables["block_times"].append(blocks.assign(**tag))
        if scored:
            tables["accuracy"].append(evaluate_accuracy(rec, tokenizer, evaluation).assign(model=f"B={b} r={rank}", **tag))
    return {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame() for k, v in tables.items()}


def throughput_vs_accuracy(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Return one point per system and configuration: throughput ratio and the model's average accuracy (Fig. 8)."""
    acc = tables["accuracy"].groupby("model")["value"].mean() if len(tables["accuracy"]) else pd.Series(dtype=float)
    rows = tables["throughput"].assign(
        config=lambda d: "B=" + d.num_blocks.astype(str) + " r=" + d.lora_rank.astype(str),
        model=lambda d: d.system.where(~d.system.str.startswith("vanilla"), "vanilla"))
    rows["model"] = rows["model"].where(rows["model"] == "vanilla", rows["config"])
    rows["avg_accuracy"] = rows["model"].map(acc)
    return rows[["system", "config", "tokens_per_s", "tokens_per_s_ratio", "avg_accuracy"]].rename(
        columns={"tokens_per_s_ratio": "throughput_ratio"})


if __name__ == "__main__":
    main()
