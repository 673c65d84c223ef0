"""Notebook 05's study carried out (§3.8, Fig. 8, Tables 16–19, App. N): the served models (from the run
store, through rrt.runs), each benchmarked against every system, scored as served, and the tables read off.

At cluster scale (`data_source: hub`) the requests and the calibration text come from the packed held-out sets
that `make pack` wrote for the served models' recipe (04's `eval_corpora`), never from the hub: 05's job runs
offline. The calibration sequences are exactly what packing the streamed corpus would give (the same token
stream, cut at 128); the requests are windows of prompt + output tokens of that stream's documents, shuffled
by the seed, where the embedded path shuffles the corpus's documents (`rrt.serving.workload.corpus_samples`).
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
from rrt.verdicts import pooled_stderr


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
    runs = study.runs()  # the KD teacher, then every served model's uptraining and post-training
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

    Every model is benchmarked in each App. N setting (`shapes`) on each held-out set (`corpora`), each model at
    the largest batch within `memory_cap_gb` (`bench.batch_within_cap`); `throughput_by_corpus` keeps each set's
    rows, the other tables average them per setting (App. N: the average over three held-out sets).
    """
    cap = int(study.memory_cap_gb * 2**30) or None
    scored = bool(study.tasks) and tokenizer is not None  # dummy-weight models have no tokenizer
    evals = (load_data(study.training().data_spec(), tokenizer).evals  # make pack's shards
             if study.data_source == "hub" and tokenizer is not None else None)
    workloads = {(shape, corpus): _workload(study, shape, corpus, evals, tokenizer)
                 for shape in study.shapes for corpus in study.corpora}
    if evals is not None:
        heldout = repack(packed_stream(evals[study.calibration_corpus], tokenizer), tokenizer)
    else:
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
        b = num_loops(rec)
        tag = {"config": config, "num_blocks": b}
        policies, calibration = calibrated_policies(rec, heldout, study.exit_policies,
                                                    target_agreement=study.target_agreement)
        tables["calibration"] += [{**tag, **row, "corpus": study.calibration_corpus} for row in calibration]
        for ((prefix, decode), corpus), workload in workloads.items():
            grid.note(f"benchmark {prefix}/{decode} on {corpus}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run_benchmark(original, tokenizer, rec, workload=workload, max_active=study.max_active,
                                       token_budget=study.token_budget, repeats=study.repeats,
                                       kv_policies=tuple(study.kv_policies), exit_policies=policies,
                                       arrival_rate=study.arrival_rate or None, memory_cap_bytes=cap)
            setting = {"shape": f"{prefix}/{decode}", "corpus": corpus}
            for name, df in result.tables().items():
                key = "throughput" if name == "bench" else name
                if key == "throughput":  # what the numbers ran on
                    df = df.assign(device=result.settings["device"], dtype=result.settings["dtype"])
                tables[key].append(df.assign(**tag, **setting, mean_loops_replayed=result.mean_loops))
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
    out["throughput_by_corpus"] = out["throughput"]
    out["throughput"] = average_corpora(out["throughput"], ["shape", "config", "num_blocks", "system", "model",
                                                            "exit_policy", "kv_policy", "device", "dtype"])
    out["step_costs"] = average_corpora(out["step_costs"], ["shape", "config", "model", "rows"])
    out["deltas"] = deltas(out["throughput"])
    out["targets"] = targets(out["throughput"])
    out["max_batch"] = max_batch(out["throughput"])
    return out


def _workload(study, shape, corpus_split, evals, tokenizer) -> Workload:
    """App. N's queue of one setting (prompt, output tokens) on one held-out set: from `make pack`'s shards at
    cluster scale (`evals`), else the corpus itself."""
    corpus, _, split = corpus_split.partition("/")
    fields = dict(corpus=corpus, split=split, source=study.data_source, num_requests=study.num_requests,
                  prefix_len=shape[0], decode_len=shape[1], seed=study.seed)
    if evals is not None:
        return PackedWorkload(packed_stream(evals[corpus_split], tokenizer), tokenizer, **fields)
    return Workload(**fields)


def average_corpora(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The mean over held-out sets of every numeric column, per `keys` (App. N averages its three sets); the
    sets averaged in `corpus` ("a + b + c"). Text columns that vary by set (exits per loop) are dropped."""
    if df.empty or "corpus" not in df:
        return df
    keys = [k for k in keys if k in df]
    numeric = [c for c in df.select_dtypes("number").columns if c not in keys]
    flags = [c for c in df.select_dtypes("bool").columns if c not in keys]  # e.g. fits: all sets must fit
    grouped = df.groupby(keys, sort=False, dropna=False)
    out = grouped[numeric].mean()
    if flags:
        out = out.join(grouped[flags].all())
    corpora = " + ".join(dict.fromkeys(df["corpus"]))
    return out.reset_index().assign(corpus=corpora)


class PackedWorkload(Workload):
    """App. N's queue cut from the documents of a packed held-out set: each document split into consecutive windows
    of a prompt and its continuation (a long PG19 book gives many requests; App. N samples 20K), `num_requests` of
    the windows long enough for a prompt and one continuation token, shuffled by the seed.

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
        width = body + self.decode_len
        windows = [(k, start) for k, doc in enumerate(docs) for start in range(0, len(doc), width)
                   if len(doc) - start > body]
        random.Random(self.seed).shuffle(windows)
        if len(windows) < self.num_requests:
            raise ValueError(f"{self.corpus}/{self.split} (packed): its {len(docs)} documents give {len(windows)} "
                             f"windows of {body} prompt + {self.decode_len} output tokens; need num_requests="
                             f"{self.num_requests} (pack more held-out sequences: max_eval_seqs)")
        return [Sample(head + docs[k][start:start + body].tolist(),
                       docs[k][start + body:start + width].tolist(),
                       f"{self.corpus}/{self.split}[packed document {k}, token {start}]")
                for k, start in windows[:self.num_requests]]


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
    cols = ["shape", "config", "system", "exit_policy", "kv_policy", "max_active", "tokens_per_s", "tokens_per_s_min",
            "tokens_per_s_max", "delta_v", "delta_seq", "delta_seq_bound", "delta_seq_rows", "delta_seq_decode",
            "delta_seq_decode_rows", "ratio_vs_hf_generate", "real_over_bound", "mean_loops_per_token"]
    return throughput[[c for c in cols if c in throughput]].copy()


def targets(throughput: pd.DataFrame) -> pd.DataFrame:
    """Per served model, the serving targets read off its benchmark rows (`rrt.serving.targets`)."""
    keys = [k for k in ("shape", "config") if k in throughput]
    out = pd.concat([targets_table(rows).assign(**dict(zip(keys, key)))
                     for key, rows in throughput.groupby(keys, sort=False)], ignore_index=True)
    return out[[*keys, *(c for c in out.columns if c not in keys)]]


def max_batch(throughput: pd.DataFrame) -> pd.DataFrame:
    """Per setting and model: the batch it served at, the largest within the memory cap up to max_active (Tables 16
    and 18's max batch), with its weights and KV per token."""
    if throughput.empty:
        return pd.DataFrame()
    cols = ["shape", "model", "max_active", "weight_bytes", "kv_bytes_per_token"]
    return throughput[[c for c in cols if c in throughput]].drop_duplicates(["shape", "model"]).reset_index(drop=True)


def throughput_vs_accuracy(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Fig. 8's points: per served model, system, exit and KV policy, Δ_V (min–max over repeats) and accuracy ± stderr
    (and the gold answer's log-likelihood ± stderr, `rrt.evaluation.gold_summary`, where the rows have it)."""
    t = tables["throughput"].copy()
    base = t["tokens_per_s"] / t["delta_v"]
    t["delta_v_min"], t["delta_v_max"] = t["tokens_per_s_min"] / base, t["tokens_per_s_max"] / base
    acc = tables["accuracy"]
    if len(acc):
        by = acc.groupby(["config", "exit_policy", "kv_policy"])
        pooled = {"accuracy_stderr": ("stderr", pooled_stderr)}
        if "gold_ll" in acc:
            pooled |= {"gold_ll": ("gold_ll", "mean"), "gold_ll_stderr": ("gold_ll_stderr", pooled_stderr)}
        avg = by.agg(avg_accuracy=("value", "mean"), **pooled).reset_index()
        # the vanilla rows and the no-exit rows are scored without exits
        t["acc_config"] = t["config"].where(~t["system"].str.startswith(("vanilla", "hf_")), "vanilla")
        t["acc_exit"] = t["exit_policy"].replace({"oracle (own output)": "oracle"})
        t["acc_kv"] = t["kv_policy"].where(t["acc_exit"] != "none", "-")
        t = t.merge(avg, how="left", left_on=["acc_config", "acc_exit", "acc_kv"],
                    right_on=["config", "exit_policy", "kv_policy"], suffixes=("", "_acc"))
        t = t.drop(columns=[c for c in t if c.endswith("_acc") or c.startswith("acc_")])
        # the LoRA-removed model is timed, never evaluated: its accuracy is not the served model's
        t.loc[t["system"].str.endswith("_no_lora"), [c for c in SCORES if c in t]] = float("nan")
    cols = ["config", "system", "exit_policy", "kv_policy", "tokens_per_s", "delta_v", "delta_v_min", "delta_v_max",
            *SCORES]
    return t[[c for c in cols if c in t]]


SCORES = ("avg_accuracy", "accuracy_stderr", "gold_ll", "gold_ll_stderr")  # Fig. 8's y: mean over tasks, ± pooled
