"""Checkpoints and resume of a training run: atomic writes with a manifest, the newest valid one found,
a run directory refused when it holds another config's run or other training sequences.

A checkpoint is written only with finite weights and carries a manifest (each file's sha256, the step,
the config hash) that resume verifies, falling back to the newest valid one.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rrt.checkpoint import (PROCESS_STATE, TRAINING_STATE, CheckpointError, fsync_path, read_manifest, save,
                            save_hashed, unique_state_dict, verify_manifest, write_manifest)
from rrt.rundir import CONFIG, METRICS, read_config, read_json
from rrt.trainconfig import TrainConfig

SEQS = "train_seqs.json"  # the training sequences' fingerprint (`loop._Sequences.fingerprint`)
LEGACY_SEQS = "train_blocks.json"  # its name in run directories written before 2026-12-04
CHECKPOINT_TIMEOUT = timedelta(hours=2)  # a checkpoint's collectives (checkpoint_group): the slowest writer's time


def check_run_dir(run_dir: Path, config: TrainConfig, seqs) -> Path | None:
    """Return the newest valid checkpoint of this config in run_dir (None: start fresh); raise if the
    directory holds another config's run (its config.json or its checkpoints) or other training sequences."""
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
    saved = read_json(run_dir / SEQS) or read_json(run_dir / LEGACY_SEQS)
    sampled = saved is not None and "rows" in saved and saved.get("shape") == list(seqs.shape)
    given = seqs.sampled_fingerprint(saved["rows"]) if sampled else seqs.fingerprint()
    if saved is not None and saved != given:
        raise ValueError(f"{run_dir / SEQS}: this run trained on other sequences (saved {saved}, given {given}); "
                         f"the data label {config.data!r} does not tell them apart. Pass the same train_seqs, "
                         f"or use another `out` directory")
    if sampled:  # written before every row was hashed (train then rewrites it whole)
        warnings.warn(f"{run_dir / SEQS} hashed only {len(saved['rows'])} of its {saved['shape'][0]} training "
                      f"sequences (written before every row was hashed); they match these: resuming, and recording "
                      f"a hash of every row")
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


def save_checkpoint(run_dir: Path, step: int, run, config: TrainConfig, last_good: Path | None) -> Path:
    """Write checkpoints/step-N atomically: into a temp dir, its manifest last, then one rename (a crash
    or a full disk leaves the last one); refuse non-finite weights before writing anything.

    The model is written once, by the main process (gathered whole from its shards under fsdp; each shared
    tensor once). `rank{r}.pt` (PROCESS_STATE) holds process r's RNG states and, under fsdp, its own shard of
    the optimizer state; under DDP the state is the same on every process and only rank0.pt holds it. Each
    process hashes its file as it writes it (a full disk: an OSError naming the file and the bytes needed, the
    temp dir removed), and every collective here runs on `run.group` (a long timeout), so no
    process waits on checkpoint I/O inside the training collectives' (NCCL's) 10-minute timeout.
    The last checkpoint of a run holds the model and step only: optimiser moments (twice the model's size) and
    RNG states could only serve more steps, and a longer run is another config, refused here.
    """
    acc, root = run.acc, run_dir / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    weights, bad = _full_weights(run.student, keep=acc.is_main_process)
    if bad:  # the same full weights on every process: all raise
        raise FloatingPointError(f"non-finite weights after step {step} ({len(bad)} tensors, e.g. {bad[:3]}): "
                                 f"{final} not written; last good checkpoint: {last_good}")
    last = step == config.steps

    def fail(e: OSError):
        return OSError(e.errno, f"writing checkpoint {final} failed at {e.filename or tmp}: {e.strerror or e}; "
                                f"it needs about {_checkpoint_bytes(run, last)} bytes, {_free_bytes(root)} free "
                                f"there; removed the partial copy; last good checkpoint: {last_good}")

    written = {}
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _all_gather(None, run.group)  # the temp dir exists before any process writes into it
        if acc.is_main_process:
            save(run.student, tmp, tensors=weights)  # compact: each shared tensor once, the spec in config.json
            written.update(read_manifest(tmp)["files"])  # save hashed its files: the final manifest reuses them
            # through Python (save_hashed): a full disk is an OSError; torch's own file writer raises RuntimeError
            written[TRAINING_STATE] = save_hashed({"step": step, "scheduler": run.scheduler.state_dict(),
                                                   "world_size": acc.num_processes, "sharding": config.sharding},
                                                  tmp / TRAINING_STATE)
        if not last:
            state = {"rng": _rng_state()}
            if config.sharding == "fsdp" or acc.is_main_process:
                state["optimizer"] = _local_optimizer_state(run.optimizer)
            mine = tmp / PROCESS_STATE.format(rank=acc.process_index)
            written[mine.name] = save_hashed(state, mine)
    except OSError as e:
        written = fail(e)
    except BaseException:  # not an I/O failure (a bug, an interrupt): no partial copy left behind either
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    outcomes = _all_gather(written, run.group)  # a failed write on any process reaches every process
    error = next((o for o in outcomes if isinstance(o, OSError)), None)
    if error is None and acc.is_main_process:
        try:
            write_manifest(tmp, {k: v for o in outcomes for k, v in o.items()}, step=step, config_hash=config.hash())
            if final.exists():  # a stale one of this config (resume fell back past it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(root)
        except OSError as e:
            error = fail(e)
    if acc.is_main_process:
        if error is None:
            prune(root, config, step)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    error = _all_gather(error, run.group)[0]  # the main process's view holds every failure: all raise it
    if error is not None:
        raise error
    return final


def _checkpoint_bytes(run, last: bool) -> int:
    """Return about how many bytes a checkpoint takes over every process: the unique weights whole and, but in
    the last, the optimiser's tensors (whole: under fsdp each process writes its shard of them)."""
    tensors = {id(t): t for t in run.student.state_dict(keep_vars=True).values()}
    if not last:
        tensors.update({id(v): v for per_param in run.optimizer.state.values() for v in per_param.values()
                        if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _free_bytes(root: Path) -> int | str:
    """Return the free bytes on root's filesystem ("unknown" when even that fails)."""
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return "unknown"


def checkpoint_group(num_processes: int):
    """Return a gloo group over every process whose collectives wait up to CHECKPOINT_TIMEOUT (None for one process).

    A checkpoint's processes wait for the slowest writer (the main process writes the model too); on a busy
    shared filesystem that can pass the 10 minutes NCCL allows a collective, which would kill the run.
    """
    return dist.new_group(backend="gloo", timeout=CHECKPOINT_TIMEOUT) if num_processes > 1 else None


def _all_gather(obj, group) -> list:
    """Return every process's `obj` (just [obj] for one process)."""
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _full_weights(model: nn.Module, keep: bool) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """Return (the unique tensors whole, on the CPU where sharded; None unless `keep`) and the names of the
    non-finite ones. A sharded tensor is gathered by every process in the same order (DTensor.full_tensor)."""
    out, bad = {}, []
    for key, tensor in unique_state_dict(model).items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
            tensor = tensor.cpu() if keep else tensor
        if not torch.isfinite(tensor).all():
            bad.append(key)
        if keep:
            out[key] = tensor
    return (out if keep else None), bad


def _local_optimizer_state(optimizer) -> dict:
    """Return the optimizer's state dict with each sharded tensor (DTensor) as this process's own shard."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in per_param.items()}
                      for i, per_param in state["state"].items()}
    return state


def prune(root: Path, config: TrainConfig, step: int) -> None:
    """Delete all but the newest `keep_checkpoints` of this config's checkpoints up to `step`, by step number
    (another config's are never touched; a stale later one of this run is replaced when its step comes)."""
    ours = sorted((p for p, h in _checkpoint_hashes(root.parent).items() if h == config.hash() and _step_of(p) <= step),
                  key=_step_of)
    for old in ours[:-config.keep_checkpoints]:
        shutil.rmtree(old)


def check_layout(checkpoint: Path, config: TrainConfig, num_processes: int) -> None:
    """Refuse a checkpoint whose optimizer state is laid out for another sharding or (under fsdp) another number
    of processes: each rank's file holds its own shard."""
    written = torch.load(checkpoint / TRAINING_STATE, weights_only=False)
    sharding, world = written.get("sharding", "none"), written.get("world_size")
    if sharding != config.sharding:
        raise ValueError(f"{checkpoint} was written with sharding={sharding!r}, this run has "
                         f"sharding={config.sharding!r}: its optimizer state is laid out per process; resume "
                         f"with sharding={sharding!r}")
    if sharding == "fsdp" and world != num_processes:
        raise ValueError(f"{checkpoint} holds optimizer state sharded over {world} processes; this launch has "
                         f"{num_processes}: resume with {world} processes")


def load_training_state(checkpoint: Path, run, config: TrainConfig) -> None:
    """Load the scheduler, this process's RNG states and its optimizer state (its shard under fsdp)."""
    rank = run.acc.process_index
    shared = torch.load(checkpoint / TRAINING_STATE, weights_only=False)
    mine = torch.load(checkpoint / PROCESS_STATE.format(rank=rank), weights_only=False)
    owner = mine if config.sharding == "fsdp" or rank == 0 else torch.load(checkpoint / PROCESS_STATE.format(rank=0),
                                                                           weights_only=False)
    run.scheduler.load_state_dict(shared["scheduler"])
    run.optimizer.load_state_dict(_sharded_like(owner["optimizer"], run.optimizer))
    _set_rng_state(mine["rng"])


def _sharded_like(state: dict, optimizer) -> dict:
    """Return `state` with each shard (as `_local_optimizer_state` wrote it) made a DTensor laid out as its
    parameter is; unchanged where parameters are whole."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, per_param in state["state"].items():
        p = params[i]
        out[i] = {k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v
                  for k, v in per_param.items()}
    return {**state, "state": out}


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
