"""Issue 29, weights: nothing loaded unverified, a full disk named, save_pretrained refused.

Probe 3: every weight load (rrt.load, load_into, rrt.load_model, TrainConfig.init_from, the KD teacher, 05's
served models) verifies the checkpoint's manifest (each file's size and sha256) and refuses an altered file,
naming it and both hashes; a directory without a manifest (older code, plain HF) loads with a warning naming
the missing file and the fix. rrt.save writes the manifest.
Probe 9: a full disk while a checkpoint is written (safetensors' SafetensorError, a Python write's OSError,
a real full tmpfs where this process may mount one) raises OSError(ENOSPC) naming the path and the bytes
needed; the temp dir is removed, the previous checkpoint kept and the run resumes exactly.
And: `save_pretrained` of a converted model is refused naming rrt.save (HF checkpoints hold no ties).
"""
import builtins
import copy
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rrt
import rrt.checkpoint
import rrt.train.loop as rtrain
from rrt.checkpoint import MANIFEST, TRAINING_STATE, WEIGHTS, CheckpointError, load_into, verify_manifest
from rrt.serving.study import served_models
from rrt.train import train
from rrt.train.build import build_student, build_teacher
from tests.test_faults import (assert_repeats, config_in, enospc, llama, records, reference, resume,  # noqa: F401
                               scale_a_weight)
from tests.test_train import EVAL, TRAIN, tiny_config

SPEC = dict(num_blocks=2, lora_rank=4)  # tiny_config's


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama):
    """A four-step run's checkpoint at step 2 (with optimiser state; its manifest written by train)."""
    config = tiny_config(tmp_path_factory.mktemp("trained"), steps=4, save_every=2, keep_checkpoints=2)
    return train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama).run_dir / "checkpoints" / "step-00000002"


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- probe 3: every weight load verifies the manifest --------------------------------------------------

LOADERS = {  # how each caller loads weights from a checkpoint directory
    "rrt.load": lambda path, llama: rrt.load(path),
    "load_into (resume)": lambda path, llama: load_into(rrt.convert(llama, rrt.RecursiveSpec(**SPEC)), path),
    "rrt.load_model": lambda path, llama: rrt.load_model(str(path)),
    "init_from": lambda path, llama: build_student(tiny_config(path.parent, init_from=str(path)), llama),
    "KD teacher": lambda path, llama: build_teacher(tiny_config(path.parent, kd="fkl", teacher=str(path)), llama,
                                                    "cpu"),
    "05's served model": lambda path, llama: served_models(types.SimpleNamespace(checkpoint=str(path)), llama, None),
}


def with_tokenizer(trained, tmp_path) -> Path:
    """A copy of the trained checkpoint with the tokenizer beside it (as rrt.load_model needs), manifest rewritten."""
    path = tmp_path / "ckpt"
    shutil.copytree(trained, path)
    rrt.load_model("tiny-llama")[1].save_pretrained(path)
    manifest = json.loads((path / MANIFEST).read_text())
    rrt.checkpoint.write_manifest(path, step=manifest["step"], config_hash=manifest["config_hash"])
    return path


@pytest.mark.parametrize("loader", LOADERS)
def test_every_weight_load_refuses_altered_weights_naming_the_file_and_both_hashes(tmp_path, llama, trained,
                                                                                  loader):
    path = with_tokenizer(trained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the untouched checkpoint loads without a word
        LOADERS[loader](path, llama)
    want = json.loads((path / MANIFEST).read_text())["files"][WEIGHTS]["sha256"]
    scale_a_weight(path / WEIGHTS)  # same size, other values
    got = sha256(path / WEIGHTS)
    assert got != want and (path / WEIGHTS).stat().st_size == trained.joinpath(WEIGHTS).stat().st_size
    with pytest.raises(CheckpointError, match=rf"{path / WEIGHTS}: sha256 differs.*expected {want}, found {got}"):
        LOADERS[loader](path, llama)


def test_rrt_save_writes_a_manifest_of_what_it_wrote_and_load_refuses_an_edit(tmp_path, llama):
    rec = rrt.convert(llama, rrt.RecursiveSpec(**SPEC))
    (tmp_path / "notes.txt").write_text("a file the user keeps beside the model")
    rrt.save(rec, tmp_path, tokenizer=rrt.load_model("tiny-llama")[1])
    files = verify_manifest(tmp_path)["files"]
    assert {"config.json", WEIGHTS, "tokenizer_config.json"} <= set(files) and "notes.txt" not in files
    assert files[WEIGHTS] == {"bytes": (tmp_path / WEIGHTS).stat().st_size, "sha256": sha256(tmp_path / WEIGHTS)}
    x = torch.randint(3, 99, (2, 11))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(rrt.load(tmp_path)(x).logits, rec(x).logits)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"lora_rank": 4', '"lora_rank": 2'))
    with pytest.raises(CheckpointError, match=r"config.json: sha256 differs"):
        rrt.load(tmp_path)


def test_a_directory_without_a_manifest_loads_with_a_warning_naming_it_and_the_fix(tmp_path, llama):
    rec = rrt.convert(llama, rrt.RecursiveSpec(**SPEC))
    rrt.save(rec, tmp_path)
    (tmp_path / MANIFEST).unlink()  # as rrt.save wrote before manifests, or another tool
    x = torch.randint(3, 99, (2, 11))
    with pytest.warns(rrt.checkpoint.UnverifiedCheckpointWarning,
                      match=rf"{tmp_path / MANIFEST} is missing: {tmp_path / WEIGHTS} is loaded unverified.*"
                            rf"rrt.checkpoint.write_manifest"):
        loaded = rrt.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, rec(x).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rrt.checkpoint.UnverifiedCheckpointWarning)  # a strict caller: refused
        with pytest.raises(rrt.checkpoint.UnverifiedCheckpointWarning):
            rrt.load(tmp_path)
    rrt.checkpoint.write_manifest(tmp_path)  # the fix the warning names: the files vouched for as they are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rrt.load(tmp_path)


def test_a_manifest_that_does_not_list_the_weights_is_refused(tmp_path, llama):
    rrt.save(rrt.convert(llama, rrt.RecursiveSpec(**SPEC)), tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["files"][WEIGHTS]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / MANIFEST} does not list {WEIGHTS}"):
        rrt.load(tmp_path)


def test_loading_skips_only_the_optimiser_state_which_resume_verifies(tmp_path, trained):
    """A load reads the weights, config and tokenizer, never rank*.pt: an altered one does not stop it (resume's
    latest_checkpoint verifies every file before it reads them)."""
    path = tmp_path / "ckpt"
    shutil.copytree(trained, path)
    with open(path / "rank0.pt", "r+b") as f:
        f.write(b"\0")
    rrt.load(path)
    with pytest.raises(CheckpointError, match="rank0.pt: sha256 differs"):
        verify_manifest(path)


# ---- probe 9: a full disk while a checkpoint is written -------------------------------------------------

def checkpoint_bytes(checkpoint: Path) -> int:
    """What a checkpoint of the RECIPE holds: the unique weights and the optimiser's tensors."""
    weights = sum(t.nbytes for t in load_file(checkpoint / WEIGHTS).values())
    state = torch.load(checkpoint / "rank0.pt", weights_only=False)["optimizer"]["state"]
    return weights + sum(v.nbytes for per_param in state.values() for v in per_param.values() if torch.is_tensor(v))


def assert_failed_cleanly(error, run: Path, failed_at: str):
    """The error names the file and the bytes needed, step 4's temp dir is gone, step 2 is intact and resumes."""
    assert error.errno == errno.ENOSPC
    needed = checkpoint_bytes(run / "checkpoints" / "step-00000002")
    assert f"writing checkpoint {run / 'checkpoints' / 'step-00000004'} failed at " in str(error)
    assert failed_at in str(error) and f"needs about {needed} bytes" in str(error), str(error)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # the partial copy removed
    verify_manifest(run / "checkpoints" / "step-00000002")
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_full_disk_inside_safetensors_is_an_oserror_naming_the_file(tmp_path, llama, reference, monkeypatch):
    config = config_in(tmp_path, "run")
    real = rrt.checkpoint.save_file

    def save_file(tensors, path, *a, **k):  # what safetensors (Rust) raises when the disk fills
        if "step-00000004" in str(path):
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(rrt.checkpoint, "save_file", save_file)
    with pytest.raises(OSError) as e:
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    monkeypatch.undo()
    assert_failed_cleanly(e.value, Path(config.out), WEIGHTS)
    result, _ = resume(config, llama)
    assert_repeats(result, reference)


class FullFile:
    """A file opened for writing on a disk with `room` bytes left: writes what fits, then ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        data = data if isinstance(data, str) else memoryview(data).cast("B")  # text (JSON) or bytes
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise enospc(self.file.name)
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("target", [TRAINING_STATE, "rank0.pt", MANIFEST])
def test_a_full_disk_in_a_python_write_is_an_oserror_naming_the_file(tmp_path, llama, reference, monkeypatch,
                                                                     target):
    """Every checkpoint file but the weights is written by Python (no writer in C++ whose full disk reads as a
    RuntimeError without an errno): the disk fills 100 bytes into `target`."""
    config = config_in(tmp_path, "run")
    real = io.open

    def full_open(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        path = "" if isinstance(file, int) else os.fspath(file)
        if ".tmp-step-00000004" in path and "w" in mode and Path(target).stem in Path(path).name:
            return FullFile(f, room=100)
        return f

    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OSError) as e:
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    monkeypatch.undo()
    assert_failed_cleanly(e.value, Path(config.out), target)
    result, _ = resume(config, llama)
    assert_repeats(result, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk (skipped where this process may not mount one); remount(bytes) resizes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")

    def remount(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True, capture_output=True)

    try:
        yield disk, remount
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


PAGE = 4096  # tmpfs counts whole pages


@pytest.mark.parametrize("fills_at", [WEIGHTS, "rank0.pt"])
def test_a_real_full_disk_during_a_checkpoint_fails_naming_it_and_loses_nothing(tmp_path, llama, reference,
                                                                              small_disk, monkeypatch, fills_at):
    """A tmpfs shrunk after step 2's checkpoint to what is used plus two pages (room for step 3-4's metrics)
    and, to fill at rank0.pt, the pages of the files written before it: config, weights, save's manifest,
    training state. safetensors (Rust) and torch's writes through Python each end in an OSError."""
    disk, remount = small_disk
    config = config_in(disk, "run")
    real = rtrain.save_checkpoint

    def save_checkpoint(run_dir, step, *args, **kwargs):
        path = real(run_dir, step, *args, **kwargs)
        if step == 2:
            before = 0 if fills_at == WEIGHTS else 3 + -(-(path / WEIGHTS).stat().st_size // PAGE)
            remount(shutil.disk_usage(disk).used + (2 + before) * PAGE)
        return path

    monkeypatch.setattr(rtrain, "save_checkpoint", save_checkpoint)
    with pytest.raises(OSError) as e:
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    monkeypatch.undo()
    assert_failed_cleanly(e.value, Path(config.out), f".tmp-step-00000004/{fills_at}")
    remount(64 << 20)
    result, _ = resume(config, llama)
    assert_repeats(result, reference)


# ---- save_pretrained of a recursive model ---------------------------------------------------------------

@pytest.mark.parametrize("spec", [dict(num_blocks=2), dict(num_blocks=3, lora_rank=2), dict(num_blocks=1)])
def test_save_pretrained_of_a_recursive_model_is_refused_naming_rrt_save(tmp_path, llama, spec):
    rec = rrt.convert(llama, rrt.RecursiveSpec(**spec))
    with pytest.raises(ValueError, match=r"save_pretrained cannot store a recursive model.*rrt.save\(model, "):
        rec.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    rrt.save(rec, tmp_path / "rrt")  # the way the error names
    loaded = rrt.load(tmp_path / "rrt")
    x = torch.randint(3, 99, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, rec(x).logits)
    with pytest.raises(ValueError, match="save_pretrained cannot store a recursive model"):
        loaded.save_pretrained(tmp_path / "hf")
    for twin in (copy.deepcopy(rec), pickle.loads(pickle.dumps(rec))):  # copies keep the refusal
        with pytest.raises(ValueError, match="save_pretrained cannot store a recursive model"):
            twin.save_pretrained(tmp_path / "hf")
    merged = rrt.merge(rec)  # a plain HF model again: save_pretrained works and reloads equal
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(x).logits, merged(x).logits)
