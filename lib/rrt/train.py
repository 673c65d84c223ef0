"""Uptraining and early-exit training (§3.6–3.7): `train(config, train_blocks=…, eval_blocks=…)`.

One loop for every regime in `TrainConfig`: AdamW + cosine schedule with warmup, gradient
accumulation and clipping, bf16 autocast on GPU and on CPUs with bf16 matmuls (else fp32), an online teacher (the original
model, frozen), per-loop perplexity on held-out blocks, metrics in `metrics.jsonl`, and atomic
checkpoints that resume the same trajectory. It runs under `accelerate launch` (DDP or DeepSpeed
ZeRO-2, params/accelerate/): layers share nn.Parameters across depths, so per-layer FSDP wrapping
is never used. Data position = the step: step s reads a fixed slice of a seeded per-epoch permutation.

Nothing written goes silently wrong: a non-finite loss or gradient stops the step before the
optimiser moves; a checkpoint is written only with finite weights and carries a manifest (each
file's sha256, the step, the config hash) that resume verifies, falling back to the newest valid
one; one writer holds a run directory at a time (`RunLock`); a run resumes only on the same
training blocks (their fingerprint is kept in the run directory).

Sections: `train` and its three parts (`_setup`, `_optimiser_step`, `_evaluate`); the models a
config describes (`build_student`, `build_teacher`); loss and data; checkpoints and resume; the
command line (`main`, `add_config_arguments`, `config_from_args`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rrt.checkpoint import (TRAINING_STATE, WEIGHTS, CheckpointError, file_digest, fsync_path, load, load_into,
                            read_manifest, save, unique_state_dict, verify_manifest, write_manifest)
from rrt.losses import early_exit_loss, shift_for_next_token, uptrain_loss
from rrt.models import decoder_layers, native_bf16
from rrt.recursive import check_num_blocks, convert, loop_logits, spec_of
from rrt.rundir import (CONFIG, METRICS, Metrics, RunLock, read_config, read_json, write_config, write_json,
                        write_versions)
from rrt.trainconfig import TrainConfig


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path          # the last checkpoint (rrt.load reads it)
    metrics: list[dict]       # every record of metrics.jsonl
    model: nn.Module          # the trained model (unwrapped, on the training device)


def train(config: TrainConfig, *, train_blocks, eval_blocks=None, original: nn.Module | None = None,
          progress=None) -> RunResult:
    """Train per `config`; return the run directory, its last checkpoint and the metrics records.

    train_blocks / eval_blocks: a Dataset with `input_ids` or a LongTensor [n_blocks, block_len].
    original: the loaded `config.model` (conversion source and teacher; moved to the device, put
    in eval mode); loaded here when None. Restarting with the same config (and training blocks)
    resumes from the newest valid checkpoint in `config.out`; a different config there, or other
    blocks, fail before training, and so does a second writer while one holds the directory.
    progress: None draws train's own progress bar; a callable instead gets each step's record
    ({"step", "loss", "lr", "tokens_per_s", ...}) and no bar is drawn (a caller showing one bar for many runs).
    """
    blocks = _Blocks(train_blocks, "train_blocks")
    if config.seq_len is not None and blocks.shape[1] != config.seq_len:
        raise ValueError(f"train blocks have length {blocks.shape[1]}, config.seq_len={config.seq_len}")
    from accelerate import PartialState  # the process group the Accelerator below joins
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != config.num_processes:  # before any model is built
        raise ValueError(f"config.num_processes={config.num_processes} but {state.num_processes} processes were "
                         f"launched: tokens per step (batch_size × grad_accum × num_processes × seq_len) would not "
                         f"be the planned ones; launch with --num_processes {config.num_processes} or re-plan")
    lock = RunLock(config.out)  # the processes of one launch are one writer: its main process holds the lock
    _on_main(state, lock.acquire)
    try:
        return _train(config, blocks, eval_blocks, original, state, progress)
    finally:
        lock.release()  # a no-op off the main process


def _train(config: TrainConfig, blocks: "_Blocks", eval_blocks, original, state, progress) -> RunResult:
    """`train` once the run directory is held: resume or start, step, checkpoint, evaluate."""
    run_dir = Path(config.out)
    latest = _on_main(state, lambda: _check_run_dir(run_dir, config, blocks))
    run = _setup(config, original, latest)
    acc = run.acc
    metrics = Metrics(run_dir, writer=acc.is_main_process, keep_until=run.start)
    if acc.is_main_process:
        if latest is None or not (run_dir / CONFIG).exists():
            write_config(run_dir, config.to_dict())
        if latest is None or not (run_dir / BLOCKS).exists():
            write_json(run_dir / BLOCKS, blocks.fingerprint())
        if latest is None:
            write_versions(run_dir)
        else:  # a kill between a checkpoint's rename and its pruning left one too many
            _prune(run_dir / "checkpoints", config, run.start)

    evaluate = functools.partial(_evaluate, run, eval_blocks, config, metrics)  # evaluate(step)
    if run.start == 0:
        evaluate(0)
    checkpoint = latest
    tokens_per_step = config.batch_size * config.grad_accum * blocks.shape[1] * config.num_processes
    run.student.train()
    from tqdm.auto import tqdm
    show_bar = acc.is_main_process and progress is None
    with tqdm(total=config.steps, initial=run.start, disable=not show_bar, desc="train") as bar:
        for step in range(run.start + 1, config.steps + 1):
            t0 = time.perf_counter()
            parts = _optimiser_step(run, blocks, config, step, last_good=checkpoint)
            record = {"kind": "train", "step": step, **parts, "tokens": step * tokens_per_step,
                      "tokens_per_s": tokens_per_step / (time.perf_counter() - t0)}
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{parts['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if progress is not None and acc.is_main_process:
                progress(record)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                evaluate(step)
            if step % config.save_every == 0 or step == config.steps:
                checkpoint = _save_checkpoint(run_dir, step, run, config, last_good=checkpoint)
    # a run killed between its last checkpoint and this record (or on a resume) lacks it: write it now
    if not _on_main(acc, lambda: any(r["kind"] == "eval" and r["step"] == config.steps for r in metrics.read())):
        evaluate(config.steps)
    return RunResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics.read(), model=run.student)


@dataclass
class _Run:
    """What `_setup` builds: the accelerator, models, optimiser, schedule, and the step to resume after."""
    acc: object               # accelerate.Accelerator
    student: nn.Module        # the model being trained (unwrapped)
    teacher: nn.Module | None
    exits: nn.Module          # _Exits(student), as prepared by accelerate (DDP/DeepSpeed wrap this)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    start: int                # the last step already done (0: a fresh run)


def _setup(config: TrainConfig, original: nn.Module | None, latest: Path | None) -> _Run:
    """Build the accelerator, student, teacher, AdamW and cosine schedule; resume from `latest` if set."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_cosine_schedule_with_warmup

    mixed = "bf16" if config.precision == "bf16" or (config.precision == "auto" and native_bf16()) else "no"
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mixed:
        # accelerate keeps one precision per process and refuses another; one kernel may train runs of both (an
        # fp32 run after an "auto" one): drop that state (the process group, PartialState, is kept)
        AcceleratorState._reset_state()
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
    # fused AdamW (one kernel over every parameter; CPU and CUDA): the same update rule as torch's default, which on
    # CPU is a Python loop over tensors, 6× slower here (0.06 vs 0.35 s a step for SmolLM2-135M's 135M parameters)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                  fused=fused or None)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    start = 0
    if latest is not None:  # model first (before DDP broadcasts it), optimiser after prepare
        start = load_into(student, latest)
        if start is None:
            raise ValueError(f"checkpoint {latest} holds no {TRAINING_STATE}: not written by train()")
    exits = _Exits(student, every_loop=config.objective == "early_exit").to(acc.device)
    exits, optimizer = acc.prepare(exits, optimizer)  # the scheduler is stepped by us, once per step
    if latest is not None and start < config.steps:  # a finished run has nothing left to resume
        _load_training_state(latest, optimizer, scheduler, acc.process_index)
    return _Run(acc, student, teacher, exits, params, optimizer, scheduler, start)


def _optimiser_step(run: _Run, blocks: "_Blocks", config: TrainConfig, step: int, last_good: Path | None) -> dict:
    """Run one optimiser step (grad_accum micro-batches); return its loss parts, lr and grad_norm.

    Every part is averaged over micro-batches and processes (equal tokens per process: the global
    token mean). A non-finite loss or total gradient norm (taken with clipping off too) stops
    before the optimiser step, naming the last checkpoint (every one written has finite tensors).
    """
    acc = run.acc
    sums: dict[str, float] = {}
    for micro in range(config.grad_accum):
        x = _micro_batch(blocks, config, step, micro, acc).to(acc.device)
        with acc.accumulate(run.exits):
            loss, parts = _loss(run.exits, run.teacher, x, config, acc)
            acc.backward(loss)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) / config.grad_accum
    sums = dict(zip(sums, acc.reduce(torch.tensor(list(sums.values()), device=acc.device), "mean").tolist()))
    # max_norm inf scales by exactly 1.0: the norm without clipping (None under DeepSpeed, which keeps it)
    grad_norm = acc.clip_grad_norm_(run.params, config.clip if config.clip > 0 else math.inf)
    grad_norm = None if grad_norm is None else float(grad_norm)
    bad = {k: v for k, v in (("loss", sums["loss"]), ("grad_norm", grad_norm))
           if v is not None and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite {bad} at step {step}; stopped before the optimiser step (the weights "
                                 f"are those after step {step - 1}); last good checkpoint: {last_good}")
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**sums, "lr": lr, "grad_norm": grad_norm}


def _evaluate(run: _Run, eval_blocks, config: TrainConfig, metrics: Metrics, step: int) -> None:
    """Write per-loop perplexity on eval_blocks at `step` (main process; the others wait)."""
    from rrt.evaluation import per_loop_perplexity

    if eval_blocks is not None and run.acc.is_main_process:
        run.student.eval()
        with run.acc.autocast():
            df = per_loop_perplexity(run.student, eval_blocks, batch_size=config.eval_batch_size)
        run.student.train()
        metrics.write({"kind": "eval", "step": step,
                       **{f"ppl/loop_{r.loop_idx}": float(r.perplexity) for r in df.itertuples()}})
    run.acc.wait_for_everyone()


# ---- setup: the models a config describes --------------------------------------------------------

def build_student(config: TrainConfig, original: nn.Module) -> nn.Module:
    """Return the model to train (fp32 master weights), its trainable parameters set; `original` untouched.

    Conversion of `original` (co-training; baseline "full" is num_blocks=1, identical to it), the
    `init_from` checkpoint (post-training; given a head LoRA if the config asks for one), or a
    random L/B-layer model (baseline "reduced").
    """
    if config.baseline == "reduced":
        model = _reduced_model(original, config.num_blocks)
    elif config.init_from is not None:
        model = load(config.init_from, dtype=torch.float32)
        _check_init_from(config, spec_of(model))
        if config.head_lora_rank and not spec_of(model).head_lora_rank:
            from rrt.relax import add_head_lora
            add_head_lora(model, config.head_lora_rank, seed=config.seed)
    else:
        model = convert(original, config.spec()).float()
    _set_trainable(model, config.trainable)
    return model.train()


def _check_init_from(config: TrainConfig, saved) -> None:
    """Raise unless the init_from model's spec is the config's (a head LoRA may be added to it, Table 13)."""
    wanted = config.spec().to_dict()
    got = saved.to_dict()
    if got["head_lora_rank"] == 0:
        got["head_lora_rank"] = wanted["head_lora_rank"]
    diff = {k: (got[k], wanted[k]) for k in wanted if k != "seed" and got[k] != wanted[k]}
    if diff:
        raise ValueError(f"init_from={config.init_from!r} holds another spec; differing fields (saved, config): {diff}")


def build_teacher(config: TrainConfig, original: nn.Module, device) -> nn.Module | None:
    """Return the KD teacher, frozen, eval mode, on `device` (None without KD): `config.teacher` loaded
    (an rrt.save dir or a load_model source), or `original` itself when teacher is None."""
    if config.kd is None:
        return None
    dtype = getattr(torch, config.teacher_dtype)
    if config.teacher is not None:
        from rrt.models import load_model
        if (Path(config.teacher) / WEIGHTS).exists():
            original = load(config.teacher, dtype=dtype)
        else:
            original = load_model(config.teacher, dtype=dtype)[0]
    # a cast copies (the caller's original stays as it was); same dtype: the very same model, no copy
    teacher = original if next(original.parameters()).dtype == dtype else copy.deepcopy(original)
    teacher = teacher.to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


def _reduced_model(original: nn.Module, num_blocks: int) -> nn.Module:
    """Return a random-init model of L/B layers and the original's widths (the paper's small baseline)."""
    from transformers import AutoModelForCausalLM

    num_layers = len(decoder_layers(original))
    check_num_blocks(num_layers, num_blocks)
    cfg = copy.deepcopy(original.config)
    cfg.num_hidden_layers = num_layers // num_blocks
    if isinstance(getattr(cfg, "layer_types", None), list):  # Gemma 2/3: keep the first L/B types
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _set_trainable(model: nn.Module, trainable: str) -> None:
    """all: everything; base: all but LoRAs; lora: the LoRAs (the head LoRA too); head_lora: it alone."""
    from rrt.relax import set_trainable

    if trainable == "head_lora":
        model.requires_grad_(False)
        model.head_lora.requires_grad_(True)
    else:
        set_trainable(model, base=trainable in ("all", "base"), lora=trainable in ("all", "lora"))


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

    Sample i of the run reads epoch i // n's permutation (seeded by seed and epoch) at i mod n; the
    run's samples start at config.data_offset (post-training on "new" tokens skips the uptraining's).
    """
    n = blocks.shape[0]
    first = config.data_offset + (
        ((step - 1) * config.grad_accum + micro) * acc.num_processes + acc.process_index) * config.batch_size
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

    def fingerprint(self) -> dict:
        """Return the shape and a sha256 of 16 evenly spaced rows: cheap at any size, kept to refuse other blocks."""
        n = self.shape[0]
        rows = sorted({round(i * (n - 1) / 15) for i in range(16)})
        digest = hashlib.sha256(self[rows].numpy().astype("<i8").tobytes()).hexdigest()
        return {"shape": list(self.shape), "rows": rows, "sha256": digest}


# ---- run directory, checkpoints, resume -------------------------------------------------------

BLOCKS = "train_blocks.json"  # the training blocks' fingerprint (`_Blocks.fingerprint`)


def _check_run_dir(run_dir: Path, config: TrainConfig, blocks: "_Blocks") -> Path | None:
    """Return the newest valid checkpoint of this config in run_dir (None: start fresh); raise if the
    directory holds another config's run (its config.json or its checkpoints) or other training blocks."""
    old = read_config(run_dir)  # a config.json that is not JSON raises, naming it
    new = config.to_dict()
    if old is not None:
        diff = {k: (old.get(k), new[k]) for k in new if k != "out" and old.get(k) != new[k]}
        if diff:
            raise ValueError(f"{run_dir} holds a run of a different config; differing fields (saved, given): {diff}. "
                             f"Use another `out` directory, or the saved config to resume.")
    foreign = {p.name: h for p, h in _checkpoint_hashes(run_dir).items() if h != config.hash()}
    if foreign:
        raise ValueError(f"{run_dir} holds checkpoints of another config (config hash per checkpoint: {foreign}; "
                         f"this config's: {config.hash()}): use another `out` directory")
    latest = latest_checkpoint(run_dir, config_hash=config.hash())
    if old is None and latest is None and (run_dir / METRICS).exists() and (run_dir / METRICS).stat().st_size:
        raise ValueError(f"{run_dir} has a {METRICS} but no {CONFIG} and no valid checkpoint: which config wrote "
                         f"it is unknown; restore {run_dir / CONFIG} or use another `out` directory")
    if latest is None:
        return None
    if old is None:
        warnings.warn(f"{run_dir / CONFIG} is missing; {latest} is of this config (its manifest's hash): "
                      f"resuming from it and writing {CONFIG} again")
    saved, given = read_json(run_dir / BLOCKS), blocks.fingerprint()
    if saved is not None and saved != given:
        raise ValueError(f"{run_dir / BLOCKS}: this run trained on other blocks (saved {saved}, given {given}); "
                         f"the data label {config.data!r} does not tell them apart. Pass the same train_blocks, "
                         f"or use another `out` directory")
    return latest


def latest_checkpoint(run_dir: str | Path, config_hash: str | None = None) -> Path | None:
    """Return the newest checkpoint of a run whose manifest verifies (of `config_hash` if given; None if none),
    warning about each newer one that does not, naming its bad file."""
    for path in sorted(_step_dirs(Path(run_dir) / "checkpoints"), key=_step_of, reverse=True):
        try:
            manifest = verify_manifest(path)
            if manifest.get("step") != _step_of(path):
                raise CheckpointError(f"its manifest says step {manifest.get('step')}")
            if config_hash is not None and manifest.get("config_hash") != config_hash:
                raise CheckpointError(f"it is of config hash {manifest.get('config_hash')}, not {config_hash}")
            return path
        except CheckpointError as e:
            warnings.warn(f"checkpoint {path} is not usable, falling back to an older one: {e}")
    return None


def _step_dirs(root: Path) -> list[Path]:
    """Return the checkpoint directories step-N under root (temp dirs start with ".")."""
    return [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]


def _step_of(path: Path) -> int:
    return int(path.name[5:])


def _checkpoint_hashes(run_dir: Path) -> dict[Path, str]:
    """Return {checkpoint: its manifest's config hash} for every checkpoint whose manifest can be read."""
    found = {}
    for path in _step_dirs(run_dir / "checkpoints"):
        try:
            found[path] = read_manifest(path).get("config_hash")
        except CheckpointError:
            pass  # latest_checkpoint warns about it
    return found


def _save_checkpoint(run_dir: Path, step: int, run: "_Run", config: TrainConfig, last_good: Path | None) -> Path:
    """Write checkpoints/step-N atomically: into a temp dir, its manifest last, then one rename (a crash
    or a full disk leaves the last one); refuse non-finite weights before writing anything.

    The last checkpoint of a run holds the model and step only: optimiser moments (twice the model's size) and
    RNG states could only serve more steps, and a longer run is another config, refused here.
    """
    acc, root = run.acc, run_dir / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    bad = [k for k, t in unique_state_dict(run.student).items() if not torch.isfinite(t).all()]
    if bad:  # the same weights on every process: all raise
        raise FloatingPointError(f"non-finite weights after step {step} ({len(bad)} tensors, e.g. {bad[:3]}): "
                                 f"{final} not written; last good checkpoint: {last_good}")
    last = step == config.steps
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            save(run.student, tmp)  # compact: each shared tensor once, the spec in config.json
            torch.save({"step": step, "scheduler": run.scheduler.state_dict()}, tmp / TRAINING_STATE)
        acc.wait_for_everyone()
        digests = []
        if not last:  # every process writes its optimiser state (ZeRO shards it) and RNG states, and hashes it
            mine = tmp / f"rank{acc.process_index}.pt"
            torch.save({"optimizer": run.optimizer.state_dict(), "rng": _rng_state()}, mine)
            from accelerate.utils import gather_object
            digests = gather_object([(mine.name, file_digest(mine))])
        if acc.is_main_process:
            write_manifest(tmp, dict(digests), step=step, config_hash=config.hash())
            if final.exists():  # a stale one of this config (resume fell back past it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(root)
    except OSError as e:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"writing checkpoint {final} failed at {e.filename or tmp}: {e.strerror or e}; "
                               f"removed the partial copy; last good checkpoint: {last_good}") from e
    if acc.is_main_process:
        _prune(root, config, step)
    acc.wait_for_everyone()
    return final


def _prune(root: Path, config: TrainConfig, step: int) -> None:
    """Delete all but the newest `keep_checkpoints` of this config's checkpoints up to `step`, by step number
    (another config's are never touched; a stale later one of this run is replaced when its step comes)."""
    ours = sorted((p for p, h in _checkpoint_hashes(root.parent).items() if h == config.hash() and _step_of(p) <= step),
                  key=_step_of)
    for old in ours[:-config.keep_checkpoints]:
        shutil.rmtree(old)


def _load_training_state(checkpoint: Path, optimizer, scheduler, rank: int) -> None:
    shared = torch.load(checkpoint / TRAINING_STATE, weights_only=False)
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


def _on_main(state, fn):
    """Return fn() as run on the main process, on every process; an error it raised is raised on every one."""
    out = [None, None]
    if state.is_main_process:
        try:
            out[0] = fn()
        except Exception as e:  # handed to every process, so none waits on a collective forever
            out[1] = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(out, from_process=0)
    if out[1] is not None:
        raise out[1]
    return out[0]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    """`python -m rrt.train --model smollm2-135m --num-blocks 2 --kd fkl --steps 100 --out DIR`.

    Every TrainConfig field is a flag (--field-name); the data flags pack a vendored corpus (or,
    with --data-source hub, a streamed hub corpus; rrt.data.load_packed) into --seq-len blocks:
    training on --train-corpus/--train-split, per-loop perplexity on the first --eval-max-blocks
    blocks of --eval-corpus/--eval-split. Under a multi-process launcher each node's first process
    packs into the cache while the others wait, then read it.

    `--config RUN.json` alone instead runs a planned run file: `rrt.plans.execute_run(RUN.json)`
    (e.g. under `accelerate launch --num_processes N -m rrt.train --config RUN.json`).
    """
    from rrt.data import PACKED_CACHE, load_packed, train_seqs_to_pack
    from rrt.models import load_model

    run_file, rest = _config_flag().parse_known_args(argv)
    if run_file.config is not None:
        if rest:
            raise ValueError(f"--config {run_file.config} takes no other flags (the run file holds them all); "
                             f"got {[a for a in rest if a.startswith('-')] or rest}")
        from rrt.plans import execute_run
        return execute_run(run_file.config)
    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0], parents=[_config_flag()])
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
    config = config_from_args(args, seq_len=seq_len, data=data, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
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


def _config_flag() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None, metavar="RUN.json",
                        help="a run file (rrt.plans); no other flag may be given with it")
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --field-name flag per TrainConfig field, typed from its annotation."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type.replace(" | None", "")
        default = None if f.default is dataclasses.MISSING else f.default
        kwargs = {"dest": f.name, "required": f.default is dataclasses.MISSING}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif kind.startswith("tuple"):
            parser.add_argument(flag, type=float, nargs=2, default=default, **kwargs)
        else:
            convert_value = {"int": int, "float": float, "str": str}[kind]
            typ = (lambda v, c=convert_value: None if v.lower() == "none" else c(v)) if "None" in f.type else convert_value
            parser.add_argument(flag, type=typ, default=default, help=f"default: {default}", **kwargs)


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    """Return the TrainConfig of parsed flags (from `add_config_arguments`), with overrides."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values.update(overrides)
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


if __name__ == "__main__":
    main()
