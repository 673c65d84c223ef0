"""The training loop (§3.6–3.7): `train(config, train_seqs=…, eval_seqs=…)`.

One loop for every regime in `TrainConfig`: AdamW + cosine schedule with warmup, gradient
accumulation and clipping, bf16 autocast on GPU and on CPUs with bf16 matmuls (else fp32), an online
teacher (the original model, frozen), per-loop perplexity on held-out sequences, metrics in
`metrics.jsonl`, and atomic checkpoints that resume the same trajectory (resume.py). Data position = the
step: step s reads a fixed slice of a seeded per-epoch permutation.

It runs under `accelerate launch` or `torchrun` (params/accelerate/). `sharding="none"`: DDP, every process
holds the whole optimizer state. `sharding="fsdp"`: FSDP2 `fully_shard` applied here, once, at the root
(`_Exits`, the student's one forward), so parameters, gradients and AdamW state are split over the
processes; bf16 runs gather parameters in bf16 and reduce gradients in fp32 (MixedPrecisionPolicy). One
root unit, not accelerate's FSDP plugin: the plugin wraps every decoder layer as its own unit, but a shared
layer's nn.Parameters sit at several depths, and torch refuses a parameter seen by two FSDP units (and
per-layer units would gather one shared block B times a step); one unit keeps the tying as it is. (Not
DeepSpeed ZeRO-2 either: accelerate's DeepSpeed path needs a DataLoader to size its micro-batch, steps and
clips inside its own engine, after the point where this loop refuses a non-finite gradient.)

SIGTERM or SIGUSR1 (a cluster's notice before a time limit or preemption) stops the run after the current
optimiser step with a checkpoint of that step, raising `Interrupted`; the commands exit with
EXIT_INTERRUPTED (75, EX_TEMPFAIL), and the same command resumes.

Nothing written goes silently wrong: a non-finite loss or gradient stops the step before the
optimiser moves; one writer holds a run directory at a time (`RunLock`); a run resumes only on the
same training sequences (their fingerprint is kept in the run directory).
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from rrt.caches import digest_of, new_hash
from rrt.checkpoint import TRAINING_STATE, load, load_into
from rrt.devices import native_bf16
from rrt.evaluation import per_loop_perplexity
from rrt.losses import (chunked_early_exit_loss, chunked_uptrain_loss, early_exit_loss, shift_for_next_token,
                        uptrain_loss)
from rrt.models import load_model
from rrt.recursive import loop_heads, loop_hidden_states, loop_logits
from rrt.rundir import CONFIG, Metrics, RunLock, read_json, write_config, write_json, write_versions
from rrt.train.build import build_student, build_teacher, check_fits
from rrt.train.resume import (SEQS, check_layout, check_run_dir, checkpoint_group, load_training_state, prune,
                              save_checkpoint)
from rrt.trainconfig import TrainConfig


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path          # the last checkpoint (rrt.load reads it)
    metrics: list[dict]       # every record of metrics.jsonl
    model: nn.Module          # the trained model (unwrapped, on the training device; whole, also under fsdp)


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: the commands' status after `Interrupted` (a sweep's job requeues on it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
HASH_ROWS = 4096  # training sequences hashed at a time (`_Sequences.fingerprint`): bounded memory at any size


class Interrupted(RuntimeError):
    """A stop signal arrived: training stopped after `step`, whose checkpoint (with optimizer state) resumes it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped by a signal after step {step}; checkpoint {checkpoint}; run the same command "
                         f"again to resume")
        self.step, self.checkpoint = step, checkpoint


def train(config: TrainConfig, *, train_seqs, eval_seqs=None, original: nn.Module | None = None,
          progress=None) -> RunResult:
    """Train per `config`; return the run directory, its last checkpoint and the metrics records.

    train_seqs / eval_seqs: a Dataset with `input_ids` or a LongTensor [n_seqs, seq_len].
    original: the loaded `config.model` (conversion source and teacher; moved to the device, put
    in eval mode); loaded here when None. Restarting with the same config (and training sequences)
    resumes from the newest valid checkpoint in `config.out`; a different config there, or other
    sequences, fail before training, and so does a second writer while one holds the directory.
    progress: None draws train's own progress bar; a callable instead gets each step's record
    ({"step", "loss", "lr", "tokens_per_s", ...}) and no bar is drawn (a caller showing one bar for many runs).
    """
    seqs = _Sequences(train_seqs, "train_seqs")
    if config.seq_len is not None and seqs.shape[1] != config.seq_len:
        raise ValueError(f"train_seqs have length {seqs.shape[1]}, config.seq_len={config.seq_len}")
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != config.num_processes:  # before any model is built
        raise ValueError(f"config.num_processes={config.num_processes} but {state.num_processes} processes were "
                         f"launched: tokens per step (batch_size × grad_accum × num_processes × seq_len) would not "
                         f"be the planned ones; launch with --num_processes {config.num_processes} or re-plan")
    if config.sharding == "fsdp" and state.num_processes == 1:
        raise ValueError("sharding='fsdp' splits parameters and optimizer state over processes, and this is one "
                         "process: use sharding='none', or launch more processes")
    check_fits(config, original)  # a B not dividing the layers: before the run directory exists
    lock = RunLock(config.out)  # the processes of one launch are one writer: its main process holds the lock
    _on_main(state, lock.acquire)
    try:
        with _StopSignals() as stop:
            return _train(config, seqs, eval_seqs, original, state, progress, stop)
    finally:
        lock.release()  # a no-op off the main process


def _train(config: TrainConfig, seqs: _Sequences, eval_seqs, original, state, progress, stop) -> RunResult:
    """`train` once the run directory is held: resume or start, step, checkpoint, evaluate."""
    run_dir = Path(config.out)
    latest = _on_main(state, lambda: check_run_dir(run_dir, config, seqs))
    if latest is not None:
        _on_main(state, lambda: check_layout(latest, config, state.num_processes))
    run = _setup(config, original, latest)
    acc = run.acc
    metrics = Metrics(run_dir, writer=acc.is_main_process, keep_until=run.start)
    if acc.is_main_process:
        if latest is None or not (run_dir / CONFIG).exists():
            write_config(run_dir, config.to_dict())
        if read_json(run_dir / SEQS) != seqs.fingerprint():  # new, or kept by hashing sampled rows (check_run_dir)
            write_json(run_dir / SEQS, seqs.fingerprint())
        if latest is None:
            write_versions(run_dir)
        else:  # a kill between a checkpoint's rename and its pruning left one too many
            prune(run_dir / "checkpoints", config, run.start)

    evaluate = functools.partial(_evaluate, run, eval_seqs, config, metrics)  # evaluate(step)
    if run.start == 0:
        evaluate(0)
    checkpoint = latest
    tokens_per_step = config.batch_size * config.grad_accum * seqs.shape[1] * config.num_processes
    run.student.train()
    show_bar = acc.is_main_process and progress is None
    with tqdm(total=config.steps, initial=run.start, disable=not show_bar, desc="train") as bar:
        for step in range(run.start + 1, config.steps + 1):
            t0 = time.perf_counter()
            parts = _optimiser_step(run, seqs, config, step, last_good=checkpoint)
            record = {"kind": "train", "step": step, **parts, "tokens": step * tokens_per_step,
                      "tokens_per_s": tokens_per_step / (time.perf_counter() - t0)}
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{parts['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if progress is not None and acc.is_main_process:
                progress(record)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                evaluate(step)
            saved = step % config.save_every == 0 or step == config.steps
            if saved:
                checkpoint = save_checkpoint(run_dir, step, run, config, last_good=checkpoint)
            if step < config.steps and _any_process(acc, stop.requested):
                if not saved:
                    checkpoint = save_checkpoint(run_dir, step, run, config, last_good=checkpoint)
                raise Interrupted(step, checkpoint)
    # a run killed between its last checkpoint and this record (or on a resume) lacks it: write it now
    if not _on_main(acc, lambda: any(r["kind"] == "eval" and r["step"] == config.steps for r in metrics.read())):
        evaluate(config.steps)
    # under fsdp the student's parameters are shards: hand back the whole model, as its last checkpoint holds it
    model = load(checkpoint, device=acc.device) if config.sharding == "fsdp" else run.student
    return RunResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics.read(), model=model)


@dataclass
class _Run:
    """What `_setup` builds: the accelerator, models, optimiser, schedule, and the step to resume after."""
    acc: object               # accelerate.Accelerator
    student: nn.Module        # the model being trained (unwrapped)
    teacher: nn.Module | None
    exits: nn.Module          # _Exits(student): wrapped in DDP by accelerate, or itself the FSDP2 root unit
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    start: int                # the last step already done (0: a fresh run)
    group: object = None      # checkpoints' collectives (resume.checkpoint_group); None for one process
    sharded: bool = False     # sharding="fsdp": exits is an FSDPModule, parameters are DTensor shards


def _setup(config: TrainConfig, original: nn.Module | None, latest: Path | None) -> _Run:
    """Build the accelerator, student, teacher, AdamW and cosine schedule; resume from `latest` if set."""
    mixed = "bf16" if config.precision == "bf16" or (config.precision == "auto" and native_bf16()) else "no"
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mixed:
        # accelerate keeps one precision per process and refuses another; one kernel may train runs of both (an
        # fp32 run after an "auto" one): drop that state (the process group, PartialState, is kept)
        AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.grad_accum,
                      cpu=not torch.cuda.is_available())
    _seed_everything(config.seed)
    if original is None:
        original, _ = load_model(config.model)
    student = build_student(config, original)
    teacher = build_teacher(config, original, acc.device)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    start = 0
    if latest is not None:  # model first (before DDP broadcasts it or FSDP shards it), optimiser after prepare
        start = load_into(student, latest)
        if start is None:
            raise ValueError(f"checkpoint {latest} holds no {TRAINING_STATE}: not written by train()")
    exits = _Exits(student, every_loop=config.objective == "early_exit").to(acc.device)
    sharded = config.sharding == "fsdp"
    if sharded:  # every process built the same student (same seed, same source): each keeps its shard of it
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed == "bf16"
                  else MixedPrecisionPolicy())
        fully_shard(exits, mesh=init_device_mesh(acc.device.type, (acc.num_processes,)), mp_policy=policy)
    params = [p for p in student.parameters() if p.requires_grad]  # under fsdp: the DTensor shards
    # fused AdamW (one kernel over every parameter; CPU and CUDA): the same update rule as torch's default, which on
    # CPU is a Python loop over tensors, 6× slower here (0.06 vs 0.35 s a step for SmolLM2-135M's 135M parameters)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                  fused=fused or None)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    if sharded:  # accelerate would wrap an FSDP unit in DDP: it prepares the optimiser alone
        optimizer = acc.prepare(optimizer)
    else:
        exits, optimizer = acc.prepare(exits, optimizer)  # the scheduler is stepped by us, once per step
    run = _Run(acc, student, teacher, exits, params, optimizer, scheduler, start,
               group=checkpoint_group(acc.num_processes), sharded=sharded)
    if latest is not None and start < config.steps:  # a finished run has nothing left to resume
        load_training_state(latest, run, config)
    return run


def _optimiser_step(run: _Run, seqs: _Sequences, config: TrainConfig, step: int, last_good: Path | None) -> dict:
    """Run one optimiser step (grad_accum micro-batches); return its loss parts, lr and grad_norm.

    Every part is averaged over micro-batches and processes (equal tokens per process: the global
    token mean). A non-finite loss or total gradient norm (taken with clipping off too) stops
    before the optimiser step, naming the last checkpoint (every one written has finite tensors).
    """
    acc = run.acc
    sums: dict[str, float] = {}
    for micro in range(config.grad_accum):
        x = _micro_batch(seqs, config, step, micro, acc).to(acc.device)
        if run.sharded:  # reduce-scatter once, after the last micro-batch (accelerate's no_sync knows DDP only)
            run.exits.set_requires_gradient_sync(micro == config.grad_accum - 1)
        with acc.accumulate(run.exits):
            loss, parts = _loss(run.exits, run.teacher, x, config, acc)
            acc.backward(loss)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) / config.grad_accum
    sums = dict(zip(sums, acc.reduce(torch.tensor(list(sums.values()), device=acc.device), "mean").tolist()))
    # max_norm inf scales by exactly 1.0: the norm without clipping. Under fsdp the gradients are DTensor shards:
    # accelerate's clip (torch's clip_grad_norm_) sums their squares over processes, so the norm is the global one
    grad_norm = acc.clip_grad_norm_(run.params, config.clip if config.clip > 0 else math.inf)
    grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
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


def _evaluate(run: _Run, eval_seqs, config: TrainConfig, metrics: Metrics, step: int) -> None:
    """Write per-loop perplexity on eval_seqs at `step` (main process; the others wait).

    Under fsdp every process first gathers the parameters whole (`unshard`, in the training parameter dtype:
    bf16 runs evaluate bf16 weights), so the main process evaluates alone; they go back to shards after.
    """
    if eval_seqs is not None and run.sharded:
        run.exits.unshard()
    if eval_seqs is not None and run.acc.is_main_process:
        run.student.eval()
        with run.acc.autocast():
            df = per_loop_perplexity(run.student, eval_seqs, batch_size=config.eval_batch_size)
        run.student.train()
        metrics.write({"kind": "eval", "step": step,
                       **{f"ppl/loop_{r.loop_idx}": float(r.perplexity) for r in df.itertuples()}})
    run.acc.wait_for_everyone()
    if eval_seqs is not None and run.sharded:
        run.exits.reshard()


class _Exits(nn.Module):
    """The student's exits as one module, so DDP/DeepSpeed see the forward: every loop, or the last."""

    def __init__(self, model: nn.Module, every_loop: bool):
        super().__init__()
        self.model, self.every_loop = model, every_loop

    def forward(self, input_ids, hidden: bool = False):
        """Return each exit's logits [batch, seq, vocab]; with hidden, each exit's (hidden states [batch, seq,
        hidden], head) instead, for losses that apply the head a chunk of tokens at a time."""
        if hidden:
            exits = list(zip(loop_hidden_states(self.model, input_ids), loop_heads(self.model)))
            return exits if self.every_loop else exits[-1:]
        if self.every_loop:
            return loop_logits(self.model, input_ids)
        return [self.model(input_ids=input_ids, use_cache=False).logits]


def _loss(exits, teacher, x, config: TrainConfig, acc):
    """Return (loss, detached parts) for one micro-batch x [batch, seq] (uptrain_loss or early_exit_loss; with
    config.loss_chunk_tokens, their chunked forms: only hidden states and one chunk's logits per exit are held)."""
    if config.loss_chunk_tokens:
        labels = x[:, 1:]
        # autocast covers the heads too: they run inside the loss (and again in backward, per chunk)
        with acc.autocast():
            exit_pairs = exits(x, hidden=True)            # B × (hidden [batch, seq, hidden], head)
            hidden = [h[:, :-1] for h, _ in exit_pairs]   # B × [batch, seq-1, hidden]: t predicts x[t+1]
            heads = [head for _, head in exit_pairs]
            teacher_hidden = teacher_head = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_hidden = loop_hidden_states(teacher, x)[-1][:, :-1]
                teacher_head = loop_heads(teacher)[-1]  # its forward's head; the loss runs it under no_grad
            common = dict(teacher_hidden=teacher_hidden, teacher_head=teacher_head, kd_weight=config.kd_weight,
                          temperature=config.temperature, chunk_tokens=config.loss_chunk_tokens)
            if config.objective == "uptrain":
                return chunked_uptrain_loss(hidden[-1], heads[-1], labels, kind=config.kd or "fkl", **common)
            return chunked_early_exit_loss(hidden, heads, labels, scheme=config.exit_scheme,
                                           coefficient=config.exit_coefficient, self_distill=config.self_distill,
                                           self_distill_kind=config.self_distill_kind, kd_kind=config.kd or "fkl",
                                           **common)
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


def _micro_batch(seqs: _Sequences, config: TrainConfig, step: int, micro: int, acc) -> torch.Tensor:
    """Return the sequences [batch, seq] of (step, micro-batch, process): a function of the step alone.

    Sample i of the run reads epoch i // n's permutation (seeded by seed and epoch) at i mod n; the
    run's samples start at config.data_offset (post-training on "new" tokens skips the uptraining's).
    """
    n = seqs.shape[0]
    first = config.data_offset + (
        ((step - 1) * config.grad_accum + micro) * acc.num_processes + acc.process_index) * config.batch_size
    return seqs[[int(_epoch_order(n, config.seed, i // n)[i % n]) for i in range(first, first + config.batch_size)]]


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class _Sequences:
    """Training sequences read by row: a LongTensor, or a packed Dataset left where it is (memory-mapped
    Arrow from `load_packed(..., cache_dir=...)`), so cluster-scale token counts never sit in memory."""

    def __init__(self, seqs, name):
        if torch.is_tensor(seqs):
            self.data, shape = seqs.long(), tuple(seqs.shape)
        else:
            self.data = seqs.with_format("numpy", columns=["input_ids"])
            shape = (len(seqs), len(seqs[0]["input_ids"])) if len(seqs) else (0,)
        if len(shape) != 2 or shape[1] < 2 or shape[0] < 1:
            raise ValueError(f"{name} must be [n_seqs >= 1, seq_len >= 2] token ids; got shape {shape}")
        self.shape, self._fingerprint = shape, None

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        if torch.is_tensor(self.data):
            return self.data[rows]
        return torch.as_tensor(np.stack(self.data[rows]["input_ids"])).long()

    def fingerprint(self) -> dict:
        """Return the shape and a hash of every token the run can read, kept in train_seqs.json to refuse other
        sequences on resume: packed shards' own `content_hash` (their files, verified as they are opened), else
        every row streamed (int32, row after row). Computed once."""
        if self._fingerprint is None:
            content_hash = getattr(self.data, "content_hash", None)
            self._fingerprint = {"shape": list(self.shape),
                                 "hash": content_hash() if content_hash else self._rows_hash()}
        return self._fingerprint

    def sampled_fingerprint(self, rows: list[int]) -> dict:
        """Return the fingerprint run directories kept before every row was hashed: a sha256 of `rows` only."""
        digest = hashlib.sha256(self[rows].numpy().astype("<i8").tobytes()).hexdigest()
        return {"shape": list(self.shape), "rows": rows, "sha256": digest}

    def _rows_hash(self) -> str:
        """Hash every row, as int32 row after row; a Dataset is read as Arrow, its values as they lie (0.05 s/GB
        here, against 4 s/GB through numpy rows)."""
        hasher, n = new_hash(), self.shape[0]
        arrow = None if torch.is_tensor(self.data) else self.data.with_format("arrow")
        for start in range(0, n, HASH_ROWS):
            end = min(start + HASH_ROWS, n)
            blocks = [self.data[start:end].numpy()] if arrow is None else \
                [chunk.flatten().to_numpy() for chunk in arrow[start:end]["input_ids"].chunks]
            for block in blocks:
                hasher.update(np.ascontiguousarray(block, dtype="<i4"))
        return digest_of(hasher)


def _on_main(state, fn):
    """Return fn() as run on the main process, on every process; an error it raised is raised on every one."""
    out = [None, None]
    if state.is_main_process:
        try:
            out[0] = fn()
        except Exception as e:  # handed to every process, so none waits on a collective forever
            out[1] = e
    if state.num_processes > 1:
        broadcast_object_list(out, from_process=0)
    if out[1] is not None:
        raise out[1]
    return out[0]


def _any_process(acc, flag: bool) -> bool:
    """Return whether `flag` is set on any process (one tiny all-reduce; none for one process)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), "sum").item())


class _StopSignals:
    """While entered, SIGTERM and SIGUSR1 set `requested` instead of killing the process; the previous handlers
    come back on exit. Python installs handlers in the main thread only: elsewhere nothing is installed."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
