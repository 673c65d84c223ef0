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
from rrt.progress import GridProgress, nested_bars_off
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


def execute(run: Run, *, original, tokenizer, data: StudyData, evaluation: dict, grid=None) -> dict:
    """Train `run` (resuming whatever it has), evaluate it, write its results file; return the results.
    grid: the `GridProgress` that shows this run's steps (None: training draws its own bar)."""
    from accelerate import PartialState

    from rrt.train import train

    reads = [p for p in (run.config.init_from, run.config.teacher) if p and run.needs]
    missing = [p for p in reads if not (Path(p) / "model.safetensors").exists()]
    if missing:
        raise ValueError(f"run {run.name!r} reads {missing} (the final checkpoint of {list(run.needs)}), which is "
                         f"not there yet: train the plan in order (its runs are listed dependencies first)")
    result = train(run.config, train_blocks=data.train, original=original, progress=grid.step if grid else None)
    if not PartialState().is_main_process:  # under a multi-process launch, one process evaluates
        return {}
    if grid:
        grid.note("evaluating")
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


def by_role(tables: dict[str, pd.DataFrame], *roles: str) -> dict[str, pd.DataFrame]:
    """Return the tables with only the rows of runs in `roles` (study | baseline | variant | uptrained);
    tables without a `role` column are returned whole."""
    return {k: v[v["role"].isin(roles)].reset_index(drop=True) if "role" in v else v for k, v in tables.items()}


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

def served_models(study, original, tokenizer) -> dict:
    """Return {config name: recursive model} the study serves: its checkpoint, dummy-weight conversions
    (a `bench.PAPER_CONFIGS` model), or 04's early-exit runs from the run store, trained there when missing."""
    import torch

    from rrt.serving.bench import config_name

    if study.checkpoint:
        rec = rrt.load(study.checkpoint, dtype=original.dtype, device=original.device)
        return {config_name(rec): rec}
    if not study.trains():
        return {f"B={b} r={r}": rrt.convert(original, rrt.RecursiveSpec(num_blocks=b, lora_rank=r))
                for b in study.num_blocks for r in study.lora_ranks}
    from rrt.train import train

    recipe = study.training()
    data = None
    out = {}
    served = study.served()
    grid = GridProgress(sum(len(runs) for runs in served.values()), desc="served runs")
    for (b, r), runs in served.items():
        for run in runs:
            grid.start(run.name, steps=run.config.steps)
            if run.trained():
                grid.done("read back")
                continue
            data = data or study_data(data_spec(recipe), tokenizer)
            grid.note("training")
            train(run.config, train_blocks=data.train, original=original, progress=grid.step)
            grid.done()
        rec = rrt.load(str(runs[1].final_checkpoint), dtype=original.dtype, device=original.device)
        out[f"B={b} r={r}"] = rec.eval()
    grid.close()
    torch.set_num_threads(study.threads)  # training may have changed it
    return out


@nested_bars_off()  # the served models' bar is the one shown
def throughput_study(study, original, tokenizer) -> dict[str, pd.DataFrame]:
    """Serve every model of the study through the CDB engine and its baselines (Fig. 8, Tables 16–19, App. N).

    Per served model: confidence thresholds calibrated on held-out text (`calibration`), the
    benchmark (`throughput`: every system, ratios, real / bound; `step_costs`: Table 16/18's time per
    call per row count; `paper_sim`; `latency`: Poisson arrivals), the held-out perplexity of each
    exit × KV policy as served (`quality`), and few-shot accuracy as served (`accuracy`). `deltas`
    is Tables 17/19: Δ_V (vs vanilla static) and Δ_Seq (vs vanilla continuous) per system; `targets`
    the serving targets per served model (`rrt.serving.targets`).
    """
    from rrt.serving.bench import Workload, calibrated_policies, heldout_text, run_benchmark
    from rrt.serving.scoring import served_few_shot, served_perplexity

    corpus, _, split = study.corpus.partition("/")
    workload = Workload(corpus=corpus, split=split, source=study.data_source, num_requests=study.num_requests,
                        prefix_len=study.prefix_len, decode_len=study.decode_len, seed=study.seed)
    cap = int(study.memory_cap_gb * 2**30) or None
    scored = bool(study.tasks) and tokenizer is not None  # dummy-weight models have no tokenizer
    heldout = heldout_text(tokenizer, study.calibration_corpus, vocab_size=original.config.vocab_size,
                           source=study.data_source, seed=study.seed)
    tables = {k: [] for k in ("throughput", "step_costs", "paper_sim", "latency", "calibration", "quality", "accuracy")}
    if scored:
        acc = few_shot(original, tokenizer, tasks=list(study.tasks), limit=study.task_limit, model_name="vanilla")
        tables["accuracy"].append(acc.assign(config="vanilla", exit_policy="none", kv_policy="-", mean_exit_loop=0.0))
    models = served_models(study, original, tokenizer)
    grid = GridProgress(len(models), desc="served models")
    for config, rec in models.items():
        grid.start(config)
        grid.note("benchmark")
        b = num_loops(rec)
        tag = {"config": config, "num_blocks": b}
        policies, calibration = calibrated_policies(rec, heldout, study.exit_policies,
                                                    target_agreement=study.target_agreement)
        tables["calibration"] += [{**tag, **row, "corpus": study.calibration_corpus} for row in calibration]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_benchmark(original, tokenizer, rec, workload=workload, max_active=study.max_active,
                                   token_budget=study.token_budget, repeats=study.repeats,
                                   kv_policies=tuple(study.kv_policies), exit_policies=policies,
                                   arrival_rate=study.arrival_rate or None, memory_cap_bytes=cap)
        for name, df in result.tables().items():
            key = "throughput" if name == "bench" else name
            if key == "throughput":  # what the numbers ran on
                df = df.assign(device=result.settings["device"], dtype=result.settings["dtype"])
            tables[key].append(df.assign(**tag, mean_loops_replayed=result.mean_loops))
        exits = {"none": "none", "oracle": "oracle", **policies}
        for (name, policy), kv in itertools.product(exits.items(), study.kv_policies):
            if name == "none" and kv != study.kv_policies[0]:
                continue  # nothing exits early: every KV policy serves the same scores
            kv_label = kv if name != "none" else "-"
            grid.note(f"scoring exit {name}, kv {kv_label}")
            ppl = served_perplexity(rec, heldout, exit_policy=policy, kv_policy=kv, max_active=study.max_active)
            tables["quality"].append({**tag, "exit_policy": name, "kv_policy": kv_label, "corpus": study.calibration_corpus,
                                      **ppl})
            if scored:
                acc = served_few_shot(rec, tokenizer, tasks=list(study.tasks), limit=study.task_limit,
                                      exit_policy=policy, kv_policy=kv, max_active=32, token_budget=256,
                                      model_name=config)
                tables["accuracy"].append(acc.assign(config=config, exit_policy=name, kv_policy=kv_label))
        grid.done()
    grid.close()
    out = {k: pd.concat(v, ignore_index=True) if v and isinstance(v[0], pd.DataFrame) else pd.DataFrame(v)
           for k, v in tables.items()}
    out["deltas"] = deltas(out["throughput"])
    out["targets"] = targets(out["throughput"])
    out["max_batch"] = max_batch(out["step_costs"]) if len(out["step_costs"]) else pd.DataFrame()
    return out


def deltas(throughput: pd.DataFrame) -> pd.DataFrame:
    """Tables 17/19: per served model and system, tokens/s and Δ_V / Δ_Seq (× vanilla static / continuous)."""
    cols = ["config", "system", "exit_policy", "kv_policy", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
            "delta_v", "delta_seq", "delta_seq_bound", "delta_seq_rows", "ratio_vs_hf_generate", "real_over_bound",
            "mean_loops_per_token"]
    return throughput[[c for c in cols if c in throughput]].copy()


def targets(throughput: pd.DataFrame) -> pd.DataFrame:
    """Per served model, the serving targets read off its benchmark rows (`rrt.serving.targets`)."""
    from rrt.serving.targets import targets_table
    out = pd.concat([targets_table(rows).assign(config=config)
                     for config, rows in throughput.groupby("config", sort=False)], ignore_index=True)
    return out[["config", *(c for c in out.columns if c != "config")]]


def max_batch(step_costs: pd.DataFrame) -> pd.DataFrame:
    """Per model: the largest measured row count within the memory cap (Tables 16/18's max batch)."""
    fits = step_costs[step_costs["fits"]]
    return fits.groupby(["config", "model"])["rows"].max().rename("max_rows_within_cap").reset_index()


def throughput_vs_accuracy(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Fig. 8's points: per served model, system, exit and KV policy, Δ_V (min–max over repeats) and accuracy ± stderr."""
    t = tables["throughput"].copy()
    base = t["tokens_per_s"] / t["delta_v"]
    t["delta_v_min"], t["delta_v_max"] = t["tokens_per_s_min"] / base, t["tokens_per_s_max"] / base
    acc = tables["accuracy"]
    if len(acc):
        by = acc.groupby(["config", "exit_policy", "kv_policy"])
        avg = by.agg(avg_accuracy=("value", "mean"),
                     accuracy_stderr=("stderr", lambda s: (s.pow(2).sum() ** 0.5) / len(s))).reset_index()
        # the vanilla rows and the no-exit rows are scored without exits
        t["acc_config"] = t["config"].where(~t["system"].str.startswith(("vanilla", "hf_")), "vanilla")
        t["acc_exit"] = t["exit_policy"].replace({"oracle (own output)": "oracle"})
        t["acc_kv"] = t["kv_policy"].where(t["acc_exit"] != "none", "-")
        t = t.merge(avg, how="left", left_on=["acc_config", "acc_exit", "acc_kv"],
                    right_on=["config", "exit_policy", "kv_policy"], suffixes=("", "_acc"))
        t = t.drop(columns=[c for c in t if c.endswith("_acc") or c.startswith("acc_")])
        # the LoRA-removed model is timed, never evaluated: its accuracy is not the served model's
        t.loc[t["system"].str.endswith("_no_lora"), ["avg_accuracy", "accuracy_stderr"]] = float("nan")
    cols = ["config", "system", "exit_policy", "kv_policy", "tokens_per_s", "delta_v", "delta_v_min", "delta_v_max",
            "avg_accuracy", "accuracy_stderr"]
    return t[[c for c in cols if c in t]]


if __name__ == "__main__":
    main()
