"""Notebook 05's study carried out (§3.8, Fig. 8, Tables 16–19, App. N): the served models (from the run
store, through rrt.runs), each benchmarked against every system, scored as served, and the tables read off.

At cluster scale (`data_source: hub`) the requests and the calibration text come from the packed held-out sets
that `make pack` wrote for the served models' recipe (04's `eval_corpora`), never from the hub: 05's job runs
offline. The calibration sequences are exactly what packing the streamed corpus would give (the same token
stream, cut at 128); the requests are whole documents of that stream, shuffled by the seed, where the embedded
path shuffles the corpus's documents (`rrt.serving.workload.corpus_samples`).
"""
from __future__ import annotations

import itertools
import random
import warnings

import numpy as np
import pandas as pd
import torch

from rrt.checkpoint import load
from rrt.evaluation import few_shot
from rrt.progress import GridProgress, nested_bars_off
from rrt.recursive import convert
from rrt.data import packed_bos
from rrt.runs.execute import check_done, load_data, train_runs
from rrt.serving.bench import Workload, calibrated_policies, config_name, heldout_text, run_benchmark
from rrt.serving.workload import Sample
from rrt.serving.scoring import served_few_shot, served_perplexity
from rrt.serving.targets import targets_table
from rrt.spec import RecursiveSpec, num_loops


def served_models(study, original, tokenizer) -> dict:
    """Return {config name: recursive model} the study serves: its checkpoint, dummy-weight conversions
    (a `recipes.PAPER_MODELS` scale name), or 04's early-exit runs from the run store, trained there when missing."""
    if study.checkpoint:
        rec = load(study.checkpoint, dtype=original.dtype, device=original.device)
        return {config_name(rec): rec}
    if not study.trains():
        return {f"B={b} r={r}": convert(original, RecursiveSpec(num_blocks=b, lora_rank=r))
                for b in study.num_blocks for r in study.lora_ranks}
    served = study.served()
    runs = [run for pair in served.values() for run in pair]
    if not all(run.trained() for run in runs):
        if study.read_only:  # the sweep's notebook job: its waves trained these runs
            check_done(runs, lambda run: run.trained(), study.notebook, "trained")
        train_runs(runs, original=original, data=load_data(study.training().data_spec(), tokenizer),
                   desc="served runs")
        torch.set_num_threads(study.threads)  # training may have changed it
    return {f"B={b} r={r}": load(str(post.final_checkpoint), dtype=original.dtype, device=original.device).eval()
            for (b, r), (_, post) in served.items()}


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
    corpus, _, split = study.corpus.partition("/")
    fields = dict(corpus=corpus, split=split, source=study.data_source, num_requests=study.num_requests,
                  prefix_len=study.prefix_len, decode_len=study.decode_len, seed=study.seed)
    cap = int(study.memory_cap_gb * 2**30) or None
    scored = bool(study.tasks) and tokenizer is not None  # dummy-weight models have no tokenizer
    if study.data_source == "hub" and tokenizer is not None:
        evals = load_data(study.training().data_spec(), tokenizer).evals  # make pack's shards
        workload = PackedWorkload(packed_stream(evals[study.corpus], tokenizer), tokenizer, **fields)
        heldout = repack(packed_stream(evals[study.calibration_corpus], tokenizer), tokenizer)
    else:
        workload = Workload(**fields)
        heldout = heldout_text(tokenizer, study.calibration_corpus, vocab_size=original.config.vocab_size,
                               source=study.data_source, seed=study.seed)
    tables = {k: [] for k in ("throughput", "step_costs", "paper_sim", "latency", "calibration", "quality", "accuracy")}
    if scored:
        acc = few_shot(original, tokenizer, tasks=list(study.tasks), limit=study.task_limit, model_name="vanilla",
                       source=study.data_source)
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
                                      exit_policy=policy, kv_policy=kv, max_active=study.max_active,
                                      token_budget=study.token_budget, model_name=config, source=study.data_source)
                tables["accuracy"].append(acc.assign(config=config, exit_policy=name, kv_policy=kv_label))
        grid.done()
    grid.close()
    out = {k: pd.concat(v, ignore_index=True) if v and isinstance(v[0], pd.DataFrame) else pd.DataFrame(v)
           for k, v in tables.items()}
    out["deltas"] = deltas(out["throughput"])
    out["targets"] = targets(out["throughput"])
    out["max_batch"] = max_batch(out["step_costs"]) if len(out["step_costs"]) else pd.DataFrame()
    return out


class PackedWorkload(Workload):
    """App. N's queue cut from the documents of a packed held-out set: `num_requests` distinct documents, shuffled
    by the seed, each long enough for a prompt and one continuation token (as `corpus_samples` cuts them).

    Not a dataclass of its own: the benchmark's settings (`asdict(workload)`) keep Workload's fields only."""

    def __init__(self, stream: np.ndarray, tokenizer, **fields):
        super().__init__(**fields)
        object.__setattr__(self, "stream", stream)  # Workload is frozen
        object.__setattr__(self, "eos", tokenizer.eos_token_id)

    def samples(self, tokenizer, vocab_size: int) -> list[Sample]:
        bos = packed_bos(tokenizer)
        head = [] if bos is None else [bos]
        body = self.prefix_len - len(head)
        ends = np.flatnonzero(self.stream == self.eos)  # documents are joined by EOS; the tail after the last is cut
        docs = [self.stream[a:b] for a, b in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]
        order = list(range(len(docs)))
        random.Random(self.seed).shuffle(order)
        picked = [k for k in order if len(docs[k]) > body][:self.num_requests]
        if len(picked) < self.num_requests:
            raise ValueError(f"{self.corpus}/{self.split} (packed): only {len(picked)} of {len(docs)} documents have "
                             f"more than {body} tokens; need num_requests={self.num_requests}")
        return [Sample(head + docs[k][:body].tolist(), docs[k][body:body + self.decode_len].tolist(),
                       f"{self.corpus}/{self.split}[packed document {k}]") for k in picked]


def packed_stream(seqs, tokenizer) -> np.ndarray:
    """The token stream a packed set was cut from: every sequence without its BOS, in order (`rrt.data.pack`)."""
    skip = 0 if packed_bos(tokenizer) is None else 1
    rows = (seqs[i] for i in range(len(seqs)))
    return np.concatenate([np.asarray(r["input_ids"] if isinstance(r, dict) else r)[skip:] for r in rows])


def repack(stream: np.ndarray, tokenizer, *, seqs: int = 16, seq_len: int = 128) -> list[list[int]]:
    """`heldout_text`'s sequences from a packed stream: what `load_packed(seq_len=128, max_seqs=16)` gives."""
    bos = packed_bos(tokenizer)
    body = seq_len - (bos is not None)
    if len(stream) < seqs * body:
        raise ValueError(f"the packed held-out set has {len(stream)} tokens; calibration needs {seqs} × {body}")
    return [([] if bos is None else [bos]) + stream[i * body:(i + 1) * body].tolist() for i in range(seqs)]


def deltas(throughput: pd.DataFrame) -> pd.DataFrame:
    """Tables 17/19: per served model and system, tokens/s and Δ_V / Δ_Seq (× vanilla static / continuous)."""
    cols = ["config", "system", "exit_policy", "kv_policy", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
            "delta_v", "delta_seq", "delta_seq_bound", "delta_seq_rows", "ratio_vs_hf_generate", "real_over_bound",
            "mean_loops_per_token"]
    return throughput[[c for c in cols if c in throughput]].copy()


def targets(throughput: pd.DataFrame) -> pd.DataFrame:
    """Per served model, the serving targets read off its benchmark rows (`rrt.serving.targets`)."""
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
