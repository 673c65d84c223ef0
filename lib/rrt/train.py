"""Uptraining and early-exit training (§3.6–3.7): `train(config, train_blocks=…, eval_blocks=…)`.

One loop for every regime in `TrainConfig`: AdamW + cosine schedule with warmup, gradient
accumulation and clipping, bf16 autocast on GPU (fp32 on CPU), an online teacher (the original
model, frozen), per-loop perplexity on held-out blocks, metrics in `metrics.jsonl`, and atomic
checkpoints that resume the same trajectory. It runs under `accelerate launch` (DDP or DeepSpeed
ZeRO-2, params/accelerate/): layers share nn.Parameters across depths, so per-layer FSDP wrapping
is never used. Data position = the step: step s reads a fixed slice of a seeded per-epoch permutation.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rrt.checkpoint import WEIGHTS, save, unique_state_dict
from rrt.losses import early_exit_loss, shift_for_next_token, uptrain_loss
from rrt.recursive import loop_logits
from rrt.trainconfig import TrainConfig, build_student, build_teacher

STATE = "training_state.pt"


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path          # the last checkpoint (rrt.load reads it)
    metrics: list[dict]       # every record of metrics.jsonl
    model: nn.Module          # the trained model (unwrapped, on the training device)


def train(config: TrainConfig, *, train_blocks, eval_blocks=None, original: nn.Module | None = None) -> RunResult:
    """Train per `config`; return the run directory, its last checkpoint and the metrics records.

    train_blocks / eval_blocks: a Dataset with `input_ids` or a LongTensor [n_blocks, block_len].
    original: the loaded `config.model` (conversion source and teacher; moved to the device, put
    in eval mode); loaded here when None. Restarting with the same config resumes from the last
    checkpoint in `config.out`; a different config there fails before training.
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from rrt.evaluation import per_loop_perplexity

    blocks = _Blocks(train_blocks, "train_blocks")
    if config.seq_len is not None and blocks.shape[1] != config.seq_len:
        raise ValueError(f"train blocks have length {blocks.shape[1]}, config.seq_len={config.seq_len}")
    run_dir = Path(config.out)
    latest = _check_run_dir(run_dir, config)
    mixed = "bf16" if config.precision == "bf16" or (config.precision == "auto" and torch.cuda.is_available()) else "no"
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.grad_accum,
                      cpu=not torch.cuda.is_available())
    _seed_everything(config.seed)
    if original is None:
        from rrt.models import load_model
        original, _ = load_model(config.model)
    student = build_student(config, original)
    teacher = build_teacher(config, original, acc.device)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    start = 0
    if latest is not None:  # model first (before DDP broadcasts it), optimiser after prepare
        start = _load_model_state(student, latest)
    exits = _Exits(student, every_loop=config.objective == "early_exit").to(acc.device)
    exits, optimizer = acc.prepare(exits, optimizer)  # the scheduler is stepped by us, once per step
    if latest is not None and start < config.steps:  # a finished run has nothing left to resume
        _load_training_state(latest, optimizer, scheduler, acc.process_index)
    metrics = _Metrics(run_dir / "metrics.jsonl", acc.is_main_process, keep_until=start)
    if acc.is_main_process and latest is None:
        _write_run_files(run_dir, config)

    def evaluate(step):
        if eval_blocks is not None and acc.is_main_process:
            student.eval()
            with acc.autocast():
                df = per_loop_perplexity(student, eval_blocks, batch_size=config.eval_batch_size)
            student.train()
            metrics.write({"kind": "eval", "step": step,
                           **{f"ppl/loop_{r.loop_idx}": float(r.perplexity) for r in df.itertuples()}})
        acc.wait_for_everyone()

    if start == 0:
        evaluate(0)
    checkpoint = latest
    tokens_per_step = config.batch_size * config.grad_accum * blocks.shape[1] * acc.num_processes
    student.train()
    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=start, disable=not acc.is_main_process, desc="train")
    for step in range(start + 1, config.steps + 1):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for micro in range(config.grad_accum):
            x = _micro_batch(blocks, config, step, micro, acc).to(acc.device)
            with acc.accumulate(exits):
                loss, parts = _loss(exits, teacher, x, config, acc)
                acc.backward(loss)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / config.grad_accum
        # every part averaged over processes (equal tokens per process: the global token mean)
        sums = dict(zip(sums, acc.reduce(torch.tensor(list(sums.values()), device=acc.device), "mean").tolist()))
        step_loss = sums["loss"]
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"non-finite loss {step_loss} at step {step}; stopped before the "
                                     f"optimiser step; last good checkpoint: {checkpoint}")
        grad_norm = acc.clip_grad_norm_(params, config.clip) if config.clip > 0 else None
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        record = {"kind": "train", "step": step, **sums, "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / seconds}
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if config.eval_every and step % config.eval_every == 0 and step != config.steps:
            evaluate(step)
        if step % config.save_every == 0 or step == config.steps:
            checkpoint = _save_checkpoint(run_dir, step, student, optimizer, scheduler, acc, config.keep_checkpoints,
                                          last=step == config.steps)
    bar.close()
    if start < config.steps:
        evaluate(config.steps)
    return RunResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics.read(), model=student)


class _Exits(nn.Module):
    """The student's exits as one module, so DDP/DeepSpeed see the forward: every loop, or the last."""

    def __init__(self, model: nn.Module, every_loop: bool):
        super().__init__()
        self.model, self.every_loop = model, every_loop

    def forward(self, input_ids):
        if self.every_loop:
            return loop_logits(self.model, input_ids)
        return [self.model(input_ids=input_ids, use_cache=False).logits]


def _loss(exits, teacher, x, config: TrainConfig, acc):
    """Return (loss, detached parts) for one micro-batch x [batch, seq] (uptrain_loss or early_exit_loss)."""
    with acc.autocast():
        logits = exits(x)                                       # B × [batch, seq, vocab]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = shift_for_next_token(teacher(input_ids=x, use_cache=False).logits, x)[0]
    shifted = [shift_for_next_token(lg, x)[0] for lg in logits]  # B × [batch, seq-1, vocab]
    labels = x[:, 1:]
    if config.objective == "uptrain":
        return uptrain_loss(shifted[-1], labels, teacher_logits, kd_weight=config.kd_weight,
                            kind=config.kd or "fkl", temperature=config.temperature)
    return early_exit_loss(shifted, labels, scheme=config.exit_scheme, coefficient=config.exit_coefficient,
                           self_distill=config.self_distill, self_distill_kind=config.self_distill_kind,
                           teacher_logits=teacher_logits, kd_weight=config.kd_weight,
                           kd_kind=config.kd or "fkl", temperature=config.temperature)


def _micro_batch(blocks: "_Blocks", config: TrainConfig, step: int, micro: int, acc) -> torch.Tensor:
    """Return the blocks [batch, seq] of (step, micro-batch, process): a function of the step alone.

    Sample i of the run reads epoch i // n's permutation (seeded by seed and epoch) at i mod n.
    """
    n = blocks.shape[0]
    first = (((step - 1) * config.grad_accum + micro) * acc.num_processes + acc.process_index) * config.batch_size
    return blocks[[int(_epoch_order(n, config.seed, i // n)[i % n]) for i in range(first, first + config.batch_size)]]


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class _Blocks:
    """Training blocks read by row: a LongTensor, or a packed Dataset left where it is (memory-mapped
    Arrow from `load_packed(..., cache_dir=...)`), so cluster-scale token counts never sit in memory."""

    def __init__(self, blocks, name):
        if torch.is_tensor(blocks):
            self.data, shape = blocks.long(), tuple(blocks.shape)
        else:
            self.data = blocks.with_format("numpy", columns=["input_ids"])
            shape = (len(blocks), len(blocks[0]["input_ids"])) if len(blocks) else (0,)
        if len(shape) != 2 or shape[1] < 2 or shape[0] < 1:
            raise ValueError(f"{name} must be [n_blocks >= 1, block_len >= 2] token ids; got shape {shape}")
        self.shape = shape

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        if torch.is_tensor(self.data):
            return self.data[rows]
        return torch.as_tensor(np.stack(self.data[rows]["input_ids"])).long()


# ---- run directory, checkpoints, resume -------------------------------------------------------

def _check_run_dir(run_dir: Path, config: TrainConfig) -> Path | None:
    """Return the last checkpoint of a run of the same config in run_dir (None if fresh); raise if it differs."""
    saved = run_dir / "config.json"
    if not saved.exists():
        return None
    old = json.loads(saved.read_text())
    new = config.to_dict()
    diff = {k: (old.get(k), new[k]) for k in new if k != "out" and old.get(k) != new[k]}
    if diff:
        raise ValueError(f"{run_dir} holds a run of a different config; differing fields (saved, given): {diff}. "
                         f"Use another `out` directory, or the saved config to resume.")
    return latest_checkpoint(run_dir)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the newest complete checkpoint directory of a run (None if none)."""
    found = sorted((Path(run_dir) / "checkpoints").glob("step-*"))  # temp dirs start with "."
    return found[-1] if found else None


def _save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, acc, keep: int, last: bool) -> Path:
    """Write checkpoints/step-N atomically: into a temp dir, then one rename (a crash leaves the last one).

    The last checkpoint of a run holds the model and step only: optimiser moments (twice the model's size) and
    RNG states could only serve more steps, and a longer run is another config, refused here.
    """
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        save(model, tmp)  # compact: each shared tensor once, the spec in config.json
        torch.save({"step": step, "scheduler": scheduler.state_dict()}, tmp / STATE)
    acc.wait_for_everyone()
    if not last:  # every process writes its optimiser state (ZeRO shards it) and RNG states
        torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / f"rank{acc.process_index}.pt")
        acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def _load_model_state(model: nn.Module, checkpoint: Path) -> int:
    """Copy the checkpoint's unique tensors into `model` in place (ties survive); return its step."""
    from safetensors.torch import load_file

    state, own = load_file(checkpoint / WEIGHTS), unique_state_dict(model)
    if set(state) != set(own):
        raise ValueError(f"checkpoint {checkpoint} does not match the model built from the config: "
                         f"{sorted(set(state) ^ set(own))[:5]}")
    full = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in state.items():
            full[key].copy_(value)
    return torch.load(checkpoint / STATE, weights_only=False)["step"]


def _load_training_state(checkpoint: Path, optimizer, scheduler, rank: int) -> None:
    shared = torch.load(checkpoint / STATE, weights_only=False)
    mine = torch.load(checkpoint / f"rank{rank}.pt", weights_only=False)
    scheduler.load_state_dict(shared["scheduler"])
    optimizer.load_state_dict(mine["optimizer"])
    _set_rng_state(mine["rng"])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_run_files(run_dir: Path, config: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    versions = {p: importlib.metadata.version(p) for p in ("rrt", "torch", "transformers", "accelerate", "datasets")}
    versions["python"] = sys.version.split()[0]
    (run_dir / "versions.json").write_text(json.dumps(versions, indent=2))
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


class _Metrics:
    """metrics.jsonl, one record a line; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, writer: bool, keep_until: int):
        self.path, self.writer = path, writer
        if writer and path.exists():  # a fresh start (keep_until 0) keeps nothing of a killed attempt
            kept = [r for r in self.read() if keep_until and r["step"] <= keep_until]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# ---- command line ------------------------------------------------------------------------------

def main(argv=None) -> RunResult:
    """`python -m rrt.train --model smollm2-135m --num-blocks 2 --kd fkl --steps 100 --out DIR`.

    Every TrainConfig field is a flag (--field-name); the data flags pack a vendored corpus (or,
    with --data-source hub, a streamed hub corpus; rrt.data.load_packed) into --seq-len blocks:
    training on --train-corpus/--train-split, per-loop perplexity on the first --eval-max-blocks
    blocks of --eval-corpus/--eval-split. Under a multi-process launcher each node's first process
    packs into the cache while the others wait, then read it.
    """
    import argparse

    from rrt.data import PACKED_CACHE, load_packed, train_seqs_to_pack
    from rrt.models import load_model
    from rrt.trainconfig import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--train-corpus", default="wikitext2")
    parser.add_argument("--train-split", default="validation")  # WikiText-2 train is not vendored
    parser.add_argument("--eval-corpus", default="wikitext2")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--max-train-blocks", type=int, default=None)
    parser.add_argument("--eval-max-blocks", type=int, default=32)
    parser.add_argument("--data-source", choices=("embedded", "hub"), default="embedded",
                        help="vendored corpora (offline) or the hub's (slimpajama, redpajama, pg19; streamed)")
    parser.add_argument("--data-cache", default=None,
                        help="cache directory for packed blocks (hub default: ~/.cache/rrt/packed)")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or 128
    if args.data_source == "hub":
        args.data_cache = args.data_cache or str(PACKED_CACHE)
    args.max_train_blocks = train_seqs_to_pack(args.max_train_blocks, args.data_source, steps=args.steps,
                                               batch_size=args.batch_size, grad_accum=args.grad_accum,
                                               processes=int(os.environ.get("WORLD_SIZE", "1")))
    data = (f"{args.train_corpus}/{args.train_split}[:{args.max_train_blocks}] -> "
            f"{args.eval_corpus}/{args.eval_split}[:{args.eval_max_blocks}] @ {seq_len}")
    config = config_from_args(args, seq_len=seq_len, data=data)
    original, tok = load_model(config.model)
    common = dict(tokenizer=tok, seq_len=seq_len, cache_dir=args.data_cache, source=args.data_source)
    from accelerate import PartialState  # the same process group `train` then uses
    with PartialState(cpu=not torch.cuda.is_available()).local_main_process_first():
        train_blocks = load_packed(args.train_corpus, args.train_split, max_seqs=args.max_train_blocks, **common)
        eval_blocks = (load_packed(args.eval_corpus, args.eval_split, max_seqs=args.eval_max_blocks, **common)
                       if args.eval_max_blocks else None)
    result = train(config, train_blocks=train_blocks, eval_blocks=eval_blocks, original=original)
    if os.environ.get("RANK", "0") == "0":  # the CLI (not the library) may read the launcher's env
        print(f"run: {result.run_dir}  last checkpoint: {result.checkpoint}")
    return result


if __name__ == "__main__":
    main()
