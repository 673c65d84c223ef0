"""The notebooks' studies: grids of training runs (TrainConfig fields), evaluated into tidy tables.

Each notebook resolves its parameters (`rrt.params`), loads the model and data once, then calls
one grid builder here (`init_ablation_runs`, `rank_sweep_runs`, …) and `run_grid`, which trains,
evaluates and frees every run in turn. A run lives in <run_dir>/runs/<name>; `train` resumes a
run of the same config there, so re-running a notebook in the same run_dir skips finished runs.
"""
from __future__ import annotations

import argparse
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

import rrt
from rrt.data import PACKED_CACHE, load_packed, train_seqs_to_pack
from rrt.evaluation import few_shot, per_loop_perplexity, perplexity
from rrt.recursive import num_loops


@dataclass
class StudyData:
    """Packed token sequences: the training set and each held-out set by name ("corpus/split")."""
    train: object
    evals: dict


def study_data(params: dict, tokenizer, cache_dir=PACKED_CACHE) -> StudyData:
    """Return the packed training and held-out sequences a notebook's parameters name.

    Sequences are packed once per (tokenizer, corpus, length, cap) into cache_dir and read back
    memory-mapped. A hub corpus with max_train_seqs None is packed up to what the notebook's longest
    run reads (`train_seqs_to_pack`), not whole.
    """
    common = dict(tokenizer=tokenizer, seq_len=params["seq_len"], source=params["data_source"], cache_dir=cache_dir)
    steps = max(params.get(k) or 0 for k in ("steps", "long_steps", "uptrain_steps"))
    max_train = train_seqs_to_pack(params["max_train_seqs"], params["data_source"], steps=steps,
                                   batch_size=params["batch_size"], grad_accum=params["grad_accum"])
    if max_train != params["max_train_seqs"]:
        print(f"hub corpus {params['train_corpus']}: packing the {max_train} sequences the longest run reads")
    train = load_packed(params["train_corpus"], params["train_split"], max_seqs=max_train, **common)
    evals = {}
    for name in params["eval_corpora"]:
        corpus, _, split = name.partition("/")
        evals[name] = load_packed(corpus, split or "test", max_seqs=params["max_eval_seqs"], **common)
    return StudyData(train=train, evals=evals)


def train_fields(params: dict) -> dict:
    """Return the TrainConfig fields every run of a notebook shares."""
    return dict(model=params["model"], steps=params["steps"], batch_size=params["batch_size"],
                grad_accum=params["grad_accum"], lr=params["lr"], warmup_steps=params["warmup_steps"],
                seq_len=params["seq_len"], seed=params["seed"], save_every=params["steps"],
                data=f"{params['train_corpus']}/{params['train_split']}[:{params['max_train_seqs']}]")


def run_grid(runs: dict[str, dict], *, params: dict, run_dir: Path, original, tokenizer, data: StudyData,
             per_loop: bool = False) -> dict[str, pd.DataFrame]:
    """Train each named run, evaluate it, return tidy tables {"runs", "curves", "perplexity", "accuracy"}.

    "runs" has one row per run: its checkpoint and parameter counts. Every row of every table
    carries the run's name and its distinguishing fields, so tables plot directly. per_loop
    evaluates every loop exit (static exiting, §3.7) instead of the last only.
    """
    from rrt.train import train
    from rrt.trainconfig import TrainConfig

    summary, curves, ppl, acc = [], [], [], []
    for name, fields in tqdm(runs.items(), desc="runs"):
        config = TrainConfig(out=str(Path(run_dir) / "runs" / _slug(name)), **{**train_fields(params), **fields})
        result = train(config, train_blocks=data.train, original=original)
        tags = {"run": name, **{k: str(v) for k, v in fields.items() if k != "init_from"}}
        curves += [{**tags, **r} for r in result.metrics if r["kind"] == "train"]
        model = result.model.eval()
        summary.append({**tags, "checkpoint": str(result.checkpoint), **rrt.count_parameters(model)})
        ppl += [{**tags, **row} for row in evaluate_perplexity(model, data, per_loop=per_loop)]
        if params["tasks"]:
            acc.append(evaluate_accuracy(model, tokenizer, params, per_loop=per_loop).assign(**tags))
        del result, model
    return {"runs": pd.DataFrame(summary), "curves": pd.DataFrame(curves), "perplexity": pd.DataFrame(ppl),
            "accuracy": pd.concat(acc, ignore_index=True) if acc else pd.DataFrame()}


def concat_tables(*grids: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Return the tables of several `run_grid` calls stacked name by name."""
    return {k: pd.concat([g[k] for g in grids], ignore_index=True) for k in grids[0]}


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


def evaluate_accuracy(model, tokenizer, params: dict, *, per_loop: bool = False) -> pd.DataFrame:
    """Return few-shot accuracy rows on the notebook's tasks (every loop exit if per_loop)."""
    loops = range(num_loops(model)) if per_loop else [None]
    return pd.concat([few_shot(model, tokenizer, tasks=params["tasks"], limit=params["task_limit"],
                               loop_idx=b, batch_size=8) for b in loops], ignore_index=True)


def average_accuracy(acc: pd.DataFrame, by=("run",)) -> pd.DataFrame:
    """Return the mean accuracy over tasks per run (and loop), the paper's "Avg" column."""
    keys = list(by) + (["loop_idx"] if "loop_idx" in acc and acc["loop_idx"].notna().any() else [])
    return acc.groupby(keys, dropna=False)["value"].mean().rename("avg_accuracy").reset_index()


def save_tables(run_dir: Path, params: dict, **tables: pd.DataFrame) -> None:
    """Write each table as <name>.csv and <name>.json (rows + the parameters that produced them)."""
    from rrt.evaluation import save_results

    for name, df in tables.items():
        save_results(df, run_dir, params=params, name=name)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------- grids, one per notebook

def init_ablation_runs(params: dict) -> dict[str, dict]:
    """Fig. 5 / Table 5: every looped-layer init × block count, plus full- and reduced-size baselines."""
    runs = {f"{init} B={b}": dict(num_blocks=b, init=init, kd=params["kd"])
            for b, init in itertools.product(params["num_blocks"], params["inits"])}
    if params["baselines"]:
        runs["full-size"] = dict(num_blocks=1, baseline="full", kd=params["kd"])
        runs |= {f"reduced-size B={b}": dict(num_blocks=b, baseline="reduced", kd=None) for b in params["num_blocks"]}
    return runs


def rank_sweep_runs(params: dict) -> dict[str, dict]:
    """Fig. 6–7 / Table 9: init × LoRA rank × LoRA init × norm tying (rank 0 = the plain recursive model)."""
    runs = {}
    for init, rank, lora_init, untie in itertools.product(params["inits"], params["ranks"], params["lora_inits"],
                                                          params["untie_norms"]):
        if rank == 0 and (lora_init != params["lora_inits"][0]):
            continue  # rank 0 has no LoRA to initialise
        runs[f"{init} r={rank} {lora_init}{' untied' if untie else ''}"] = dict(
            num_blocks=params["num_blocks"], init=init, lora_rank=rank, lora_init=lora_init, untie_norms=untie)
    return runs


def distillation_runs(params: dict) -> dict[str, dict]:
    """Fig. 7b / Table 11: CE alone vs CE + KD with each divergence, and a longer FKL run."""
    base = dict(num_blocks=params["num_blocks"], init=params["init"])
    runs = {loss: {**base, "kd": None if loss == "ce" else loss} for loss in params["losses"]}
    runs[f"fkl {params['long_steps']} steps"] = {**base, "kd": "fkl", "steps": params["long_steps"]}
    return runs


def early_exit_runs(params: dict, uptrained: str) -> dict[str, dict]:
    """Table 1 / 13: weighted vs aggressive (each coefficient), ± self-distillation, post- vs co-training,
    and the frozen uptrained model with only an LM-head LoRA. `uptrained`: an rrt.save checkpoint dir."""
    base = dict(num_blocks=params["num_blocks"], init=params["init"], objective="early_exit", kd="fkl")
    post = {**base, "init_from": uptrained}
    runs = {"post weighted": {**post, "exit_scheme": "weighted", "exit_coefficient": None}}
    for c in params["coefficients"]:
        runs[f"post aggressive {c}"] = {**post, "exit_coefficient": c}
        runs[f"post aggressive {c} +SD"] = {**post, "exit_coefficient": c, "self_distill": True}
    c = params["coefficients"][0]
    runs[f"co aggressive {c} +SD"] = {**base, "exit_coefficient": c, "self_distill": True}
    runs[f"post head-LoRA {c} +SD"] = {**post, "exit_coefficient": c, "self_distill": True,
                                       "trainable": "head_lora", "head_lora_rank": params["head_lora_rank"]}
    return runs


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


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- serving (notebook 05)

def throughput_study(model, tokenizer, params: dict) -> dict[str, pd.DataFrame]:
    """Return the real benchmark and the paper-method simulation for every (B, LoRA rank) (Fig. 8, Tables 16–17).

    Tables: "throughput" (one row per system and configuration, ratios to vanilla static batching),
    "simulated", "real_vs_simulated", "block_times", and "accuracy" (few-shot accuracy of the vanilla
    and each recursive model; oracle exits emit the last loop's tokens, so they share its accuracy).
    """
    from rrt.serving.bench import real_vs_simulated, run_benchmark, run_simulation

    knobs = {k: params[k] for k in ("num_requests", "prompt_len", "new_tokens", "token_budget", "batch_size",
                                    "repeats", "seed")}
    tables = {"throughput": [], "simulated": [], "real_vs_simulated": [], "block_times": [], "accuracy": []}
    scored = bool(params["tasks"]) and tokenizer is not None  # dummy-weight models have no tokenizer
    if scored:
        tables["accuracy"].append(evaluate_accuracy(model, tokenizer, params).assign(model="vanilla"))
    for b, rank in tqdm(list(itertools.product(params["num_blocks"], params["lora_ranks"])), desc="configs"):
        tag = {"num_blocks": b, "lora_rank": rank}
        rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=b, lora_rank=rank))
        bench = run_benchmark(model, tokenizer, recursive=rec, num_blocks=b, lora_rank=rank, **knobs)
        sim, blocks = run_simulation(model, rec, bench.attrs["trajectories"], batch_size=params["batch_size"],
                                     prompt_len=params["prompt_len"], new_tokens=params["new_tokens"])
        tables["throughput"].append(bench.assign(**tag))
        tables["simulated"].append(sim.assign(**tag))
        tables["real_vs_simulated"].append(real_vs_simulated(bench, sim).assign(**tag))
        tables["block_times"].append(blocks.assign(**tag))
        if scored:
            tables["accuracy"].append(evaluate_accuracy(rec, tokenizer, params).assign(model=f"B={b} r={rank}", **tag))
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
