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
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from rrt.checkpoint import (TRAINING_STATE, CheckpointError, file_digest, fsync_path, read_manifest, save,
                            unique_state_dict, verify_manifest, write_manifest)
from rrt.rundir import CONFIG, METRICS, read_config, read_json
from rrt.trainconfig import TrainConfig

SEQS = "train_seqs.json"  # the training sequences' fingerprint (`loop._Sequences.fingerprint`)
LEGACY_SEQS = "train_blocks.json"  # its name in run directories written before 2026-12-04


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
    saved, given = read_json(run_dir / SEQS) or read_json(run_dir / LEGACY_SEQS), seqs.fingerprint()
    if saved is not None and saved != given:
        raise ValueError(f"{run_dir / SEQS}: this run trained on other sequences (saved {saved}, given {given}); "
                         f"the data label {config.data!r} does not tell them apart. Pass the same train_seqs, "
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


def save_checkpoint(run_dir: Path, step: int, run, config: TrainConfig, last_good: Path | None) -> Path:
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
        prune(root, config, step)
    acc.wait_for_everyone()
    return final


def prune(root: Path, config: TrainConfig, step: int) -> None:
    """Delete all but the newest `keep_checkpoints` of this config's checkpoints up to `step`, by step number
    (another config's are never touched; a stale later one of this run is replaced when its step comes)."""
    ours = sorted((p for p, h in _checkpoint_hashes(root.parent).items() if h == config.hash() and _step_of(p) <= step),
                  key=_step_of)
    for old in ours[:-config.keep_checkpoints]:
        shutil.rmtree(old)


def load_training_state(checkpoint: Path, optimizer, scheduler, rank: int) -> None:
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
