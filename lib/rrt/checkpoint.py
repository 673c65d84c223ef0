"""Compact save/load of (relaxed) recursive models: unique tensors once, ties rebuilt on load."""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rrt.families import FAMILIES
from rrt.recursive import tie_layers
from rrt.relax import add_head_lora, add_lora_modules
from rrt.rundir import write_json
from rrt.spec import spec_of

WEIGHTS = "model.safetensors"
TRAINING_STATE = "training_state.pt"  # beside the weights in rrt.train's checkpoints: step, scheduler
MANIFEST = "manifest.json"  # written last by save and train: each file's size and sha256 (train: step, config hash)
PROCESS_STATE = "rank{rank}.pt"  # beside them in rrt.train's checkpoints: one process's RNG and optimiser state
_PROCESS_STATE_NAME = re.compile(r"rank\d+\.pt")  # PROCESS_STATE for any rank


class CheckpointError(ValueError):
    """A checkpoint directory that fails its manifest (missing, torn, truncated or altered files)."""


class UnverifiedCheckpointWarning(UserWarning):
    """Weights loaded from a directory without a manifest (older code, another tool): nothing checked them."""


def save(model: nn.Module, path: str | Path, tokenizer=None, *, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config (with the recursion spec) + each unique tensor once to `path`, then a manifest of the files
    written (size, sha256; what `load` verifies); return `path`. A full disk raises OSError naming the file.

    tensors: the unique tensors to write instead of the model's own (a sharded model's, gathered whole).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _naming(path / "config.json"):
        model.config.save_pretrained(path)
    _save_file(unique_state_dict(model) if tensors is None else tensors, path / WEIGHTS)
    written = ["config.json", WEIGHTS]
    if tokenizer is not None:
        with _naming(path):  # which of the tokenizer's files: transformers does not say
            written += [Path(f).name for f in tokenizer.save_pretrained(path) if Path(f).parent == path]
    write_manifest(path, files=[name for name in written if (path / name).is_file()])
    return path


def _save_file(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """safetensors' save_file, an I/O failure raised as the OSError it is (safetensors writes in Rust and raises
    SafetensorError("... (os error 28)") on a full disk, with no errno and no file name)."""
    try:
        save_file(tensors, file)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from e


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the state dict with every shared tensor once, under its first (shallowest) key."""
    seen: set[int] = set()
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor.detach().contiguous()
    return out


def write_manifest(path: str | Path, digests: dict | None = None, *, files: list[str] | None = None,
                   **fields) -> dict:
    """Write path/MANIFEST: `fields` (e.g. step, config_hash) and each file's `file_digest`; return it.

    digests: {file name: file_digest} already taken (each process of a launch hashes its own optimiser
    state). files: the names to list (default: every file in `path` but the manifest). Every file is fsynced
    first and the manifest last, so a directory whose manifest verifies is complete on disk (a crash before
    this leaves no manifest, and `verify_manifest` refuses it).
    """
    path, digests = Path(path), digests or {}
    if files is None:
        files = [p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST]
    files = {name: digests.get(name) or file_digest(path / name) for name in sorted(files)}
    manifest = {**fields, "files": files}
    with _naming(path / MANIFEST):
        write_json(path / MANIFEST, manifest)  # fsynced, then renamed into place
    fsync_path(path)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Return path/MANIFEST's contents (no checksum read); raise CheckpointError naming it if absent or torn."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint was not completed by train() "
                              f"(or predates manifests)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file} has no 'files' table")
    return manifest


def verify_manifest(path: str | Path, *, process_state: bool = True) -> dict:
    """Return path's manifest after checking every file it lists (size, then sha256, read in chunks); raise
    CheckpointError naming the first file that is missing, truncated or altered, with both hashes.

    process_state: also check each process's RNG and optimiser state (PROCESS_STATE: twice the weights' size,
    read only by a resume, which verifies them; a load reads the rest).
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, want in manifest["files"].items():
        if not process_state and _PROCESS_STATE_NAME.fullmatch(name):
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {path / MANIFEST})")
        if file.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, the manifest says {want['bytes']} "
                                  f"(truncated or rewritten?)")
        found = _sha256(file)
        if found != want["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from {path / MANIFEST}'s (expected {want['sha256']}, "
                                  f"found {found}): the file was altered or corrupted")
    return manifest


def save_hashed(obj, file: str | Path) -> dict:
    """torch.save `obj` to `file`, hashing the bytes as they are written; return its `file_digest` (no read-back:
    a rank's optimizer state can be tens of GB on a shared filesystem). A failed write (a full disk) raises
    its OSError naming `file`."""
    with _naming(file), open(file, "wb") as f:
        writer = _HashingWriter(f, str(file))
        try:
            torch.save(obj, writer)
        except RuntimeError:  # torch reports a write that raised as RuntimeError("... unexpected pos ..."), no errno
            if writer.error is None:
                raise
            raise writer.error from None
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": writer.size, "sha256": writer.sha256.hexdigest()}


class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save needs only write and flush),
    keeping the OSError of a failed write (torch replaces it with a RuntimeError)."""

    def __init__(self, file, name: str):
        self.file, self.name, self.sha256, self.size, self.error = file, name, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


@contextmanager
def _naming(file: str | Path):
    """Raise an OSError that names no file (a buffered write's, an fsync's) as one naming `file`, errno kept."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(file)) from e


def file_digest(file: str | Path) -> dict:
    """Return {"bytes", "sha256"} of a file, after flushing it to disk."""
    fsync_path(file)
    return {"bytes": Path(file).stat().st_size, "sha256": _sha256(Path(file))}


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:  # streamed: file_digest reads 256 KiB at a time into one buffer
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Return the model saved by `save`, ties and LoRAs rebuilt from its spec; needs no original model.

    Also reads a plain HF single-file checkpoint (GPT-NeoX's head under either name). The files are first
    verified against the directory's manifest (CheckpointError naming an altered one; a directory without a
    manifest loads with an UnverifiedCheckpointWarning). A spec that does not match the stored tensors (a
    hand-edited config.rrt, its manifest rewritten) is refused naming the tensors, never loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _checked(path)
    config = AutoConfig.from_pretrained(path)
    state = load_file(path / WEIGHTS)
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    spec = spec_of(model)  # refuses a spec that does not fit the model's layer count
    tie_layers(model, spec)
    if any(spec.ranks.values()):
        add_lora_modules(model, spec)
    if spec.head_lora_rank:
        add_head_lora(model, spec.head_lora_rank)
    # a plain HF checkpoint (no config.rrt) may store a tied head beside its embedding; rrt.save never does
    _load_unique(model, state, equal_copies=not getattr(config, "rrt", None))
    return model.to(device=device, dtype=dtype or model.dtype).eval()


def load_into(model: nn.Module, path: str | Path) -> int | None:
    """Copy a `save` directory's unique tensors into `model` in place (ties survive); return the training
    step stored beside them (an rrt.train checkpoint), or None. The model must have exactly those tensors;
    the files are verified against the manifest as `load` does."""
    path = _checked(path)
    state, own = load_file(path / WEIGHTS), unique_state_dict(model)
    if set(state) != set(own):
        raise ValueError(f"{path} does not match the model: tensors in one but not the other: "
                         f"{sorted(set(state) ^ set(own))[:5]}")
    _load_unique(model, state)
    if not (path / TRAINING_STATE).exists():
        return None
    return torch.load(path / TRAINING_STATE, weights_only=False)["step"]


def _checked(path: str | Path) -> Path:
    """Return `path` once its weights (and config, tokenizer, training state) match its manifest; without one,
    warn (UnverifiedCheckpointWarning) and go on: older rrt.save wrote none, nor does transformers, and
    refusing would strand those directories (a strict caller turns the warning into an error)."""
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise ValueError(f"{path} holds no {WEIGHTS}: not a directory written by rrt.save")
    if not (path / MANIFEST).exists():
        warnings.warn(f"{path / MANIFEST} is missing: {path / WEIGHTS} is loaded unverified (written by older "
                      f"code or another tool). To vouch for the files as they are now, run "
                      f"rrt.checkpoint.write_manifest({str(path)!r})", UnverifiedCheckpointWarning, stacklevel=3)
        return path
    try:
        manifest = verify_manifest(path, process_state=False)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; refusing to load {path}: restore the file, or save the model again "
                              f"(rrt.save)") from None
    if WEIGHTS not in manifest["files"]:
        raise CheckpointError(f"{path / MANIFEST} does not list {WEIGHTS}: it vouches for other files; refusing "
                              f"to load unverified weights (rrt.checkpoint.write_manifest({str(path)!r}) lists them)")
    return path


def _load_unique(model: nn.Module, state: dict[str, torch.Tensor], *, equal_copies: bool = False) -> None:
    """Copy the unique tensors in; every key left out must alias one that was loaded.

    Keys match under the family's aliases (models.Family.aliases: GPT-NeoX's embed_out / lm_head). Two
    stored tensors that land on one tied tensor of the model mean the checkpoint was saved under another
    spec: refused, unless `equal_copies` and they are equal (a tied head stored beside its embedding).
    """
    full = model.state_dict(keep_vars=True)
    family = FAMILIES.get(model.config.model_type)
    alias = {a: b for pair in (family.aliases if family else ()) for a, b in (pair, pair[::-1])}
    state = {alias[k] if k not in full and k in alias and alias[k] not in state else k: v
             for k, v in state.items()}
    unknown = set(state) - set(full)
    if unknown:
        raise ValueError(f"checkpoint has tensors the model lacks: {sorted(unknown)[:5]}")
    shapes = [f"{k} {tuple(v.shape)} != {tuple(full[k].shape)}" for k, v in state.items() if v.shape != full[k].shape]
    if shapes:  # copy_ would broadcast a rank-1 LoRA into any rank without a word
        raise ValueError(f"checkpoint tensor shapes differ from the model's (stored != model; saved under "
                         f"another spec?): {shapes[:5]}")
    first: dict[int, str] = {}
    for key, value in state.items():
        other = first.setdefault(id(full[key]), key)
        if other != key and not (equal_copies and torch.equal(state[other], value)):
            raise ValueError(f"checkpoint stores {other!r} and {key!r} as two tensors but this model "
                             f"ties them (config.rrt or tied embeddings): it was saved under another spec")
    loaded = {id(full[k]) for k in state}
    missing = [k for k, t in full.items() if k not in state and id(t) not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {missing[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            full[key].copy_(value)
