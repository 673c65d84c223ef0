"""Every command line of rrt, one place: `python -m rrt <command>`, plus `python -m rrt.train` (one ad-hoc
training run) and `python -m rrt.runs <run.json>` (one planned run, a sweep job).

A flag that sets a dataclass field takes its help from that field's comment in the source (`rrt.cliargs`),
so `--help` says what `TrainConfig` says, in the same words; the library modules hold no CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from accelerate import PartialState

from rrt import examples, explore, gpucheck, report, sweep
from rrt.checkpoint import load
from rrt.claims import claims_main, claims_parser
from rrt.cliargs import add_dataclass_arguments, dataclass_from_args
from rrt.data import SOURCES, load_packed, train_seqs_to_pack
from rrt.devices import machine_text, resolve_device
from rrt.exits import SCORED_POLICIES
from rrt.models import load_model, load_tokenizer, model_config
from rrt.notebook import check_params, load_params, planned
from rrt.params import overrides_yaml, parse_overrides
from rrt.plans import STUDIES
from rrt.study import SCALES
from rrt.suite import owners, suite_text
from rrt.recipes import PAPER_MODELS
from rrt.recursive import convert
from rrt.rundir import write_config, write_csv, write_text, write_versions
from rrt.runs.cost import COST_RULE, format_tokens, plan_table, totals_text
from rrt.runs.memory import HEADROOM, MEMORY_RULE
from rrt.runs.execute import execute_run, load_data
from rrt.runs.store import DataSpec
from rrt.serving.bench import (DTYPES, Workload, calibrated_policies, heldout_text, load_bench_model, run_benchmark,
                               serving_dtype, summary_table)
from rrt.serving.engine import KV_POLICIES
from rrt.serving.targets import targets_table, targets_over_dirs
from rrt.shards import DOCS_PER_SHARD, PACKED_DIR, estimate_text, pack_spec, parse_part
from rrt.spec import RecursiveSpec, check_choice
from rrt.train.loop import train
from rrt.trainconfig import TrainConfig

REPO = sweep.REPO


# ---------------------------------------------------------------- python -m rrt.train / rrt.runs

def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rrt.train", description="Train one run: every TrainConfig field is a flag; the data flags pack "
        "a vendored corpus (or, with --data-source hub, a streamed hub corpus) into --seq-len sequences: training on "
        "--train-corpus/--train-split, per-loop perplexity on the first of --eval-corpora.")
    add_dataclass_arguments(parser, TrainConfig)
    add_dataclass_arguments(parser.add_argument_group("data"), DataSpec, skip=("seq_len",))
    parser.add_argument("--data-cache", default=None,
                        help="cache directory for an embedded corpus' packed sequences (default: none); a hub "
                             "corpus is read from the shards `make pack` wrote (--packed-dir)")
    return parser


def train_main(argv=None):
    """`python -m rrt.train --model smollm2-135m --num-blocks 2 --kd fkl --steps 100 --out DIR`."""
    parser = train_parser()
    args = parser.parse_args(argv)
    if len(args.eval_corpora) > 1:  # train() scores one held-out set; a plan (rrt.runs) scores several after
        parser.error(f"--eval-corpora takes one set here, got {args.eval_corpora}")
    check_choice("data_source", args.data_source, SOURCES)  # before the model loads
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # the CLI (not the library) reads the launcher's env
    seq_len = args.seq_len or 128
    max_train_seqs = train_seqs_to_pack(args.max_train_seqs, args.data_source, steps=args.steps,
                                        batch_size=args.batch_size, grad_accum=args.grad_accum, processes=processes)
    data = dataclass_from_args(DataSpec, args, seq_len=seq_len, max_train_seqs=max_train_seqs)
    label = (f"{data.train_corpus}/{data.train_split}[:{data.max_train_seqs}] -> "
             f"{data.eval_corpora[0]}[:{data.max_eval_seqs}] @ {seq_len}")
    config = dataclass_from_args(TrainConfig, args, seq_len=seq_len, data=label, num_processes=processes)
    original, tok = load_model(config.model)
    cache = args.data_cache
    with PartialState(cpu=not torch.cuda.is_available()).local_main_process_first():  # the group `train` joins
        packed = load_data(data, tok, cache_dir=cache)
    result = train(config, train_seqs=packed.train, eval_seqs=next(iter(packed.evals.values())) if data.max_eval_seqs
                   else None, original=original)
    if os.environ.get("RANK", "0") == "0":
        print(f"run: {result.run_dir}  last checkpoint: {result.checkpoint}")
    return result


def runs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rrt.runs", description="Train and evaluate one planned run as its own job (under "
        "`accelerate launch --num_processes N` for N GPUs); a finished run is only read back.")
    parser.add_argument("run_file", metavar="RUN.json", help="<run dir>/run.json, written by `make plan`/`make sweep` "
                        "or a notebook's first cell (rrt.runs.write_run_files)")
    return parser


def runs_main(argv=None):
    return execute_run(runs_parser().parse_args(argv).run_file)


# ---------------------------------------------------------------- python -m rrt <command>

def plan_parser() -> argparse.ArgumentParser:
    parser = _parser("plan", "Print a notebook's plan: every run, its tokens and H100 hours; loads no weights.")
    parser.add_argument("notebook", choices=[*sorted(STUDIES), "all"], help="the notebook whose study is planned "
                        "(all: each notebook's own runs and hours, and the suite's, every run counted once)")
    parser.add_argument("scale", help=f"a params file: {', '.join(SCALES)}, or the path of a YAML file")
    parser.add_argument("--csv", default=None, help="also write the table here")
    return parser


def plan_main(argv=None):
    """`make plan NB=01_init_ablation SCALE=paper-gemma-2b`: print the plan; loads no weights."""
    parser = plan_parser()
    args = parser.parse_args(argv)
    if args.notebook == "all":  # every notebook's own runs and hours, then the suite's, each run counted once
        return print(suite_text(args.scale))
    try:
        study = load_params(args.notebook, args.scale)
    except (ValueError, TypeError) as err:  # a bad plan: its message names the key, no traceback needed
        parser.exit(2, f"{parser.prog}: bad plan {args.notebook} {args.scale}: {err}\n")
    recipe = planned(study)
    if recipe is None:
        print(f"{args.notebook} trains nothing; its parameters:\n{json.dumps(study.to_dict(), indent=2)}")
        return None
    table = plan_table(study.runs(), owners=owners(args.scale) if args.scale in SCALES else None)
    show = table.drop(columns=["config_hash", "active_params"])
    gb = {k: "{:.1f}".format for k in show if k.endswith("_gb")}
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
        print(show.to_string(index=False, formatters={"tokens": format_tokens, "tokens_per_step": format_tokens,
                                                       "flops": "{:.2e}".format, "h100_hours": "{:,.1f}".format, **gb}))
    store = recipe.store()
    print(f"\n{totals_text(table, args.notebook)}; {COST_RULE}.\n"
          f"memory per GPU: {table.memory_gb.max():.1f} GB at most ({MEMORY_RULE}"
          + (f"; sized to fit {HEADROOM:.0%} of gpu_memory_gb={recipe.gpu_memory_gb:g}" if recipe.gpu_memory_gb else "")
          + f"); checkpoints {table.checkpoint_gb.sum():,.0f} GB on disk, one per run.\n"
          f"run store: {store.relative_to(REPO) if store.is_relative_to(REPO) else store}\n"
          + estimate_text(recipe.data_spec(), model_config(recipe.model).vocab_size))
    if args.csv:
        write_csv(args.csv, table)
    return table


def sweep_parser() -> argparse.ArgumentParser:
    parser = _parser("sweep", "A notebook's plan as jobs (--notebook, --scale), or papermill over a grid file.")
    parser.add_argument("grid", nargs="?", default=None, help="a grid file (papermill over notebook parameters)")
    parser.add_argument("--notebook", default=None, help="a plan: the notebook (with --scale)")
    parser.add_argument("--scale", default=None, help="a plan: the params file of the notebook (with --notebook)")
    parser.add_argument("--backend", choices=("local", "slurm"), default="local",
                        help="run the jobs here in turn, or write sbatch scripts and submit.sh")
    parser.add_argument("--task", type=int, default=None, help="run only this index (SLURM array task)")
    group = parser.add_argument_group("slurm (a plan with --backend slurm)")
    add_dataclass_arguments(group, sweep.Slurm)
    for action in group._group_actions:  # this parser's formatter prints each default already
        action.help = action.help.rsplit(" (default:", 1)[0]
    return parser


def sweep_main(argv=None):
    """`make sweep`: a notebook's plan as jobs (--notebook, --scale), or papermill over a grid file."""
    parser = sweep_parser()
    args = parser.parse_args(argv)
    if (args.grid is None) == (args.notebook is None) or (args.notebook is None) != (args.scale is None):
        parser.error("give a grid file, or --notebook and --scale (a plan)")
    if args.notebook:
        if args.backend == "slurm":
            slurm = dataclass_from_args(sweep.Slurm, args)
            print(f"wrote {sweep.write_plan_jobs(args.notebook, args.scale, slurm=slurm)}; submit with bash")
        else:
            sweep.run_plan_locally(args.notebook, args.scale)
    elif args.task is not None:
        notebook, run_dir, params = sweep.plan(args.grid, REPO / "outputs")[args.task]
        if not (run_dir / sweep.DONE).exists():
            sweep.execute(notebook, run_dir, params)
    elif args.backend == "slurm":
        print(f"wrote {sweep.write_slurm(args.grid)}; submit it with sbatch")
    else:
        sweep.run_local(args.grid)


def sweep_status_parser() -> argparse.ArgumentParser:
    parser = _parser("sweep-status", "Each run of a plan: its state, newest checkpoint step and job log.")
    parser.add_argument("notebook", choices=sorted(STUDIES), help="the notebook whose plan is reported")
    parser.add_argument("scale", help=f"a params file: {', '.join(SCALES)}, or the path of a YAML file")
    parser.add_argument("--out-root", type=Path, default=REPO / "outputs",
                        help="where `make sweep` wrote sweeps/<notebook>-<scale>/ (its logs and jobs.json)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every run is done, naming the others and their logs (the collect job)")
    return parser


def sweep_status_main(argv=None):
    """`make sweep-status`: each run of a plan: done, running, interrupted, failed or not started, and its log."""
    args = sweep_status_parser().parse_args(argv)
    table = pd.DataFrame(sweep.plan_status(args.notebook, args.scale, args.out_root))
    show = table.assign(step=table["step"].map(lambda s: "-" if pd.isna(s) else str(int(s))))
    with pd.option_context("display.max_rows", None, "display.max_colwidth", None, "display.width", 250):
        print(show.drop(columns=["run_dir"]).to_string(index=False))
    missing = table[table["state"] != "done"]
    print(f"\n{len(table) - len(missing)} of {len(table)} runs done")
    if args.check and len(missing):
        print(f"not done, so the notebook is not rendered (nothing is trained here): "
              f"{', '.join(missing['run'])}; logs: {', '.join(missing['log'])}", file=sys.stderr)
        sys.exit(1)
    return table


def pack_parser() -> argparse.ArgumentParser:
    parser = _parser("pack", "Tokenize a plan's training and held-out corpora into shard files, before training "
                             "(a hub corpus is read only from them); resumable, the same bytes for any --workers.")
    parser.add_argument("notebook", choices=sorted(STUDIES), help="the notebook whose plan's data is packed")
    parser.add_argument("scale", help=f"a params file: {', '.join(SCALES)}, or the path of a YAML file")
    parser.add_argument("--workers", type=int, default=1, help="processes tokenizing shards at once")
    parser.add_argument("--out", default=None, help="root of the packed sets (default: the plan's packed_dir, "
                                                    f"else {PACKED_DIR.relative_to(REPO)})")
    parser.add_argument("--part", default=(0, 1), type=parse_part, help="K/N: only shards u with u mod N = K (task "
                        "K of an N-task SLURM array); the last part to finish writes index.json")
    parser.add_argument("--docs-per-shard", type=int, default=DOCS_PER_SHARD,
                        help="documents per shard of an embedded corpus (a hub corpus: one shard per file)")
    return parser


def pack_main(argv=None):
    """`make pack NB=.. SCALE=..`: tokenize a plan's corpora into shard files (training reads them)."""
    parser = pack_parser()
    args = parser.parse_args(argv)
    try:
        study = load_params(args.notebook, args.scale)
    except (ValueError, TypeError) as err:
        parser.exit(2, f"{parser.prog}: bad plan {args.notebook} {args.scale}: {err}\n")
    if (recipe := planned(study)) is None:
        print(f"{args.notebook} trains nothing: nothing to pack")
        return None
    return pack_spec(recipe.data_spec(), load_tokenizer(recipe.model), root=args.out, workers=args.workers,
                     part=args.part, docs_per_shard=args.docs_per_shard)


def report_parser() -> argparse.ArgumentParser:
    parser = _parser("report", "Render every executed notebook under a root to HTML, with an index page.")
    parser.add_argument("root", nargs="?", default="outputs", help="the folder searched for executed notebooks")
    parser.add_argument("--screenshots", metavar="DIR", nargs="?", const="", help="also write full-page PNGs of "
                        "every page into DIR (given without DIR: <root>/screenshots/<time>/)")
    return parser


def report_main(argv=None):
    """`make report`: render every executed notebook under a root to HTML, with an index page."""
    args = report_parser().parse_args(argv)
    found = report.entries(root := Path(args.root))
    for entry in filter(report.unreadable, found):  # listed on the index, not rendered: say so here too
        print(f"not rendered: {entry.notebook} ({entry.status})", file=sys.stderr)
    print(f"wrote {report.write_index(root, found)}")
    shots = None if args.screenshots is None else Path(args.screenshots or report.screenshot_dir(root))
    for shot in report.screenshots(root, shots) if shots else ():
        print(f"wrote {shot}")


def init_perplexity_parser() -> argparse.ArgumentParser:
    parser = _parser("init-perplexity", "Perplexity right after conversion (no training), per init × LoRA rank × "
                                        "norm tying (02's curve).")
    parser.add_argument("--model", default="smollm2-135m", help="rrt.load_model source")
    parser.add_argument("--corpus", default="wikitext2", help="held-out corpus")
    parser.add_argument("--split", default="test", help="its split")
    parser.add_argument("--num-blocks", type=int, default=2, help="B of the conversions")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    parser.add_argument("--max-seqs", type=int, default=16, help="packed sequences scored")
    parser.add_argument("--device", default="auto", help="where the conversions are scored: auto (CUDA when torch "
                                                         "sees a GPU) | cpu | cuda")
    parser.add_argument("--out", default=None, help="CSV path for the table")
    return parser


def init_perplexity_main(argv=None):
    """Perplexity right after conversion (no training), per init × LoRA rank × norm tying (02's curve)."""
    args = init_perplexity_parser().parse_args(argv)
    model, tok = load_model(args.model, device=resolve_device(args.device))
    seqs = load_packed(args.corpus, args.split, tokenizer=tok, seq_len=args.seq_len, max_seqs=args.max_seqs)
    df = explore.init_perplexity(model, seqs, num_blocks=args.num_blocks)
    print(df.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        write_csv(args.out, df)
    return df


def bench_parser() -> argparse.ArgumentParser:
    p = _parser("bench", "Serving benchmark: measured throughput of every system and its bound.")
    p.add_argument("--model", default="smollm2-135m",
                   help=f"rrt.load_model source or one of {', '.join(PAPER_MODELS)} (its shape, random weights)")
    p.add_argument("--checkpoint", default=None, help="an rrt.save directory: the recursive model to serve")
    p.add_argument("--num-blocks", type=int, default=2, help="without --checkpoint: convert (Stepwise) to B loops")
    p.add_argument("--lora-rank", type=int, default=0, help="without --checkpoint: per-loop LoRA rank")
    p.add_argument("--corpus", default="wikitext2", help="held-out documents the requests are cut from")
    p.add_argument("--split", default="test", help="its split")
    p.add_argument("--num-requests", type=int, default=16, help="requests in the offline queue")
    p.add_argument("--prefix-len", type=int, default=32, help="prompt tokens per request (App. N: 64 or 512)")
    p.add_argument("--decode-len", type=int, default=96, help="most output tokens per request (App. N: 256 or 2048)")
    p.add_argument("--seed", type=int, default=0, help="which documents")
    p.add_argument("--max-active", type=int, default=8, help="live requests (KV slots) for every system")
    p.add_argument("--memory-cap-gb", type=float, default=0.0,
                   help="each model at the largest batch within this memory, at most --max-active (App. N: 16)")
    p.add_argument("--token-budget", type=int, default=64, help="engine rows per step")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up; median, min, max")
    p.add_argument("--kv-policies", nargs="+", default=["propagate", "copy_kv"], choices=KV_POLICIES,
                   help="what exited tokens leave in deeper depths")
    p.add_argument("--exit-policies", nargs="*", default=[], choices=SCORED_POLICIES,
                   help="confidence exits to serve too, each calibrated on --calibration-corpus")
    p.add_argument("--target-agreement", type=float, default=0.9,
                   help="calibration: exits agree with the last loop on this share of held-out tokens")
    p.add_argument("--calibration-corpus", default="tinystories/test", help="held-out text the thresholds fit on")
    p.add_argument("--arrival-rate", type=float, default=None, help="requests/s of a Poisson latency run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="where to serve: auto (CUDA when torch sees a GPU) | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bf16 on a GPU or a CPU with bf16 matmuls (AVX512-BF16/AMX), else float32")
    p.add_argument("--no-hf-generate", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--out", default=None, help="directory of the results (default: new outputs/serving_bench/<time>-<pid>)")
    return p


def bench_main(argv=None):
    """Run the benchmark; write its CSVs (bench, step_costs, paper_sim, latency, targets), report.md, config.json."""
    args = bench_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = serving_dtype(device, args.dtype)
    model, tok = load_bench_model(args.model, device=device, dtype=dtype)
    if args.checkpoint and args.lora_rank:
        raise ValueError("--checkpoint serves the checkpoint's own LoRA: drop --lora-rank")
    rec = (load(args.checkpoint, dtype=dtype, device=device) if args.checkpoint
           else convert(model, RecursiveSpec(num_blocks=args.num_blocks, lora_rank=args.lora_rank)))
    workload = Workload(corpus=args.corpus, split=args.split, num_requests=args.num_requests,
                        prefix_len=args.prefix_len, decode_len=args.decode_len, seed=args.seed)
    text = heldout_text(tok, args.calibration_corpus, vocab_size=model.config.vocab_size) if args.exit_policies else []
    policies, calibration = calibrated_policies(rec, text, args.exit_policies, target_agreement=args.target_agreement)
    result = run_benchmark(model, tok, rec, workload=workload, max_active=args.max_active,
                           token_budget=args.token_budget, repeats=args.repeats, kv_policies=tuple(args.kv_policies),
                           exit_policies=policies, hf_generate=not args.no_hf_generate, progress=True,
                           arrival_rate=args.arrival_rate, memory_cap_bytes=int(args.memory_cap_gb * 2**30) or None)
    result.settings["calibration"] = calibration
    out = Path(args.out or REPO / "outputs" / "serving_bench" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    write_config(out, {**vars(args), **result.settings})
    write_versions(out)
    for name, df in {**result.tables(), "targets": (targets := targets_table(result.systems))}.items():
        write_csv(out / f"{name}.csv", df)
    command = " ".join(argv if argv is not None else sys.argv[2:])
    text = "\n\n".join([f"`python -m rrt bench {command}` on {result.settings['device']}; "
                        f"mean loops per token E = {result.mean_loops:.3f}", summary_table(result),
                        result.step_costs.to_markdown(index=False, floatfmt=".4g"),
                        "Targets (`rrt.serving.targets`):", targets.to_markdown(index=False, floatfmt=".3g")]) + "\n"
    write_text(out / "report.md", text)
    print(text)
    return result


def gpu_check_parser() -> argparse.ArgumentParser:
    p = _parser("gpu-check", "On one GPU, offline: 3 training steps of 04's paper-gemma-2b recipe (KD + early exit) "
                             "on a Gemma-2B-shaped model with random weights, peak memory against the memory model, "
                             "tokens/s and MFU; then the serving benchmark on the SmolLM2-135M and Gemma-2B shapes.")
    p.add_argument("--out", default=None, help="directory for the CSVs and config.json (default: "
                                               "outputs/gpu-check/<device name>-<time>)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same code on the CPU with tiny models and a tiny batch (seconds; what the tests run)")
    return p


def gpu_check_main(argv=None):
    """GPU check: does a paper-scale run fit and how fast it trains and serves (needs CUDA unless --dry-run)."""
    args = (parser := gpu_check_parser()).parse_args(argv)
    if not args.dry_run:
        try:
            resolve_device("cuda")
        except RuntimeError as err:  # no GPU: say what to check, before anything is written; no traceback
            parser.exit(1, f"{parser.prog}: needs a GPU (or --dry-run): {err}\n")
    result = gpucheck.run_gpu_check(out=args.out, dry_run=args.dry_run)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(result.train.T.to_string(header=False))
        print(result.systems[["shape", "num_blocks", "lora_rank", "system", "kv_policy", "tokens_per_s", "delta_seq",
                              "real_over_bound", "peak_memory_bytes"]].to_string(index=False))
    print(f"wrote {result.out}")
    return result


def targets_parser() -> argparse.ArgumentParser:
    p = _parser("targets", "The throughput targets read off bench output directories (bench.csv), one table.")
    p.add_argument("dirs", nargs="+", type=Path, help="bench output directories (bench.csv, config.json)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write DIR/targets.csv")
    return p


def targets_main(argv=None):
    """The throughput targets read off bench output directories (bench.csv), one table over them."""
    return targets_over_dirs((args := targets_parser().parse_args(argv)).dirs, write=not args.no_write)


def check_params_parser() -> argparse.ArgumentParser:
    p = _parser("check-params", "Check a notebook's parameters as `make run` would set them, creating nothing: "
                                "one line naming a bad one (and the closest valid name), exit 2.")
    p.add_argument("notebook", help="the notebook, e.g. 01_init_ablation")
    p.add_argument("scale", help=f"a params file: {', '.join(SCALES)}, or the path of a YAML file")
    p.add_argument("overrides", nargs="*", help="NAME=VALUE ..., each value YAML: steps=20 num_blocks=[2,3] lr=1e-4")
    p.add_argument("--yaml", action="store_true", help="print the overrides as one YAML line (papermill's -y)")
    return p


def check_params_main(argv=None):
    """Check a notebook's parameters (cell, params file, NAME=VALUE overrides); one line and exit 2 if bad."""
    args = (parser := check_params_parser()).parse_intermixed_args(argv)
    try:
        overrides = parse_overrides(" ".join(args.overrides))
        study = check_params(args.notebook, args.scale, overrides)
    except (ValueError, TypeError) as err:  # what the notebook's first cell would raise, as one line
        parser.exit(2, f"error: {args.notebook}: {' '.join(str(err).split())}\n")
    if args.yaml:
        print(overrides_yaml(overrides))
    return study


def examples_parser() -> argparse.ArgumentParser:
    p = _parser("examples", "Regenerate outputs/examples at this commit (refused while lib/, notebooks/ or params/ "
                            "have uncommitted changes): every notebook at cpu scale, the plans, the screenshots.")
    p.add_argument("--runs-root", default="", help="the run store the notebooks train into (default: a new "
                   "outputs/runs-examples-<time>, so no run trained by older code is read back)")
    p.add_argument("--notebooks", nargs="*", default=[], help="only these notebooks (names or numbers, e.g. 01 04; "
                   "default: all); the other examples stay as they were, each naming its own commit")
    return p


def examples_main(argv=None):
    """`make examples`: regenerate outputs/examples (every notebook at cpu scale, the plans, the screenshots)."""
    args = (parser := examples_parser()).parse_args(argv)
    try:
        examples.check_ready()  # before hours of notebooks, not after
        examples.select(args.notebooks, examples.notebooks())
    except (ValueError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    return examples.regenerate(runs_root=args.runs_root, only=args.notebooks)


def machine_main(argv=None):
    """What this machine computes: CPU flags, torch build, GPU, and the precision `auto` picks (bf16 or fp32)."""
    _parser("machine", machine_main.__doc__).parse_args(argv)
    print(machine_text())


COMMANDS = {"plan": plan_main, "sweep": sweep_main, "sweep-status": sweep_status_main, "report": report_main,
            "bench": bench_main, "targets": targets_main, "init-perplexity": init_perplexity_main,
            "gpu-check": gpu_check_main, "pack": pack_main, "machine": machine_main, "check-params": check_params_main,
            "examples": examples_main, "claims": claims_main}
# every parser, for `--help` and its test (each flag has a one-line description)
PARSERS = {"rrt.train": train_parser, "rrt.runs": runs_parser, "plan": plan_parser, "sweep": sweep_parser,
           "sweep-status": sweep_status_parser, "report": report_parser, "bench": bench_parser,
           "targets": targets_parser, "init-perplexity": init_perplexity_parser, "gpu-check": gpu_check_parser,
           "pack": pack_parser, "machine": lambda: _parser("machine", machine_main.__doc__),
           "check-params": check_params_parser, "examples": examples_parser, "claims": claims_parser}


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    """A `python -m rrt <command>` parser whose --help prints each flag's default after its description."""
    return argparse.ArgumentParser(prog=f"python -m rrt {command}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def main(argv=None):
    """`python -m rrt <command> [flags]`: one of COMMANDS (`python -m rrt <command> --help` for its flags)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = "\n".join(f"  {name:16} {(fn.__doc__ or '').splitlines()[0]}" for name, fn in COMMANDS.items())
        print(f"usage: python -m rrt <command> [flags]\n\ncommands:\n{names}\n\nalso: python -m rrt.train "
              f"(one ad-hoc training run), python -m rrt.runs RUN.json (one planned run)")
        return 0 if argv[:1] in (["--help"], ["-h"]) else 2
    COMMANDS[argv[0]](argv[1:])  # each returns its table or result for callers in Python, not an exit status
    return 0
