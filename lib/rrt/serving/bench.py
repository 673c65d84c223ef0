"""Tokens/s on CPU: vanilla HF generate (static batches) vs the CDB engine, exits off and oracle exits.

    python -m rrt.serving.bench --model tiny-llama --num-blocks 2 --out outputs/serving_bench.csv

Measures wall-clock of the whole workload (warm-up run first, median of --repeats). This is the
real engine on real hardware, not the paper's simulator (§3.8, which counts only block time):
on CPU with tiny models, Python scheduling overhead dominates, so read the numbers as a check
that the pipeline runs end to end, not as a reproduction of Fig. 8.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import rrt
from rrt.exits import OracleExit, record_oracle_trajectories
from rrt.serving.engine import Engine, Request

TEXT = ("Recursive transformers share one block of layers and loop it; continuous depth-wise "
        "batching lets tokens at different loops share a single call of that block. ")


def main(argv=None) -> list[dict]:
    """Run the benchmark, write the CSV, print and return its rows."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = rrt.load_model(args.model)
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=args.num_blocks, lora_rank=args.lora_rank))
    ids = tok(TEXT * 4).input_ids
    prompts = [ids[i * 7:i * 7 + args.prompt_len] for i in range(args.requests)]  # equal lengths: no padding
    rows = [_time("vanilla_hf_generate_static", args, lambda: _static_generate(model, prompts, args))]
    outputs = Engine(rec, token_budget=args.token_budget).run(_requests(prompts, args))
    trajectories = record_oracle_trajectories(rec, [p + outputs[i] for i, p in enumerate(prompts)])
    for name, policy in [("recursive_cdb_no_exit", None), ("recursive_cdb_oracle_exit",
                                                           OracleExit(dict(enumerate(trajectories))))]:
        engines = []

        def run(policy=policy):
            engines.append(Engine(rec, token_budget=args.token_budget, exit_policy=policy,
                                  max_active=args.requests))
            engines[-1].run(_requests(prompts, args))
        row = _time(name, args, run)
        s = engines[-1].summary()
        row.update(steps=s["steps"], mean_batch_fill=round(s["mean_batch_fill"], 3),
                   exits_per_loop=" ".join(map(str, s["exits_per_loop"])))
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(r)
    return rows


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="static batch size for HF generate")
    p.add_argument("--token-budget", type=int, default=64, help="engine items per step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/serving_bench.csv")
    return p


def _requests(prompts, args):
    return [Request(list(p), args.new_tokens) for p in prompts]


def _static_generate(model, prompts, args):
    for i in range(0, len(prompts), args.batch_size):
        batch = torch.tensor(prompts[i:i + args.batch_size])
        model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, pad_token_id=0,
                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)


def _time(name, args, fn) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = args.requests * args.new_tokens
    return {"method": name, "model": args.model, "num_blocks": args.num_blocks, "lora_rank": args.lora_rank,
            "requests": args.requests, "new_tokens": args.new_tokens, "seconds_median": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1)}


if __name__ == "__main__":
    main()
