"""Fault injection for training (train.py, checkpoint.py's manifest, rundir.py): SIGKILL inside checkpoint
writes and metric appends, a full disk, corrupted files, two writers in one run directory, NaN.

Each fault ends in a clear error naming the file or step, or in an exact recovery: the resumed run's
per-step losses and evaluations equal an uninterrupted run's, each step recorded once, and every record
and checkpoint written before the fault kept.
"""
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rrt
import rrt.checkpoint
import rrt.rundir
import rrt.train.loop as rtrain
from rrt.checkpoint import MANIFEST, TRAINING_STATE, WEIGHTS
from rrt.rundir import RunLock
from rrt.train import latest_checkpoint, train
from tests.test_train import EVAL, TRAIN, tiny_config, train_losses

ROOT = str(Path(__file__).parents[1])
STEPS = 8  # checkpoints every 2 steps (the last 2 kept), evaluations at 0, 4, 8
RECIPE = dict(steps=STEPS, save_every=2, keep_checkpoints=2, eval_every=4, batch_size=2, lora_rank=4)


@pytest.fixture(scope="module")
def llama():
    return rrt.load_model("tiny-llama")[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama):
    """The uninterrupted run every recovery must repeat."""
    return train(tiny_config(tmp_path_factory.mktemp("ref"), **RECIPE), train_seqs=TRAIN, eval_seqs=EVAL,
                 original=llama).metrics


def config_in(tmp_path, name, **overrides):
    return tiny_config(tmp_path, name, **{**RECIPE, **overrides})


def records(run_dir) -> list[dict]:
    """metrics.jsonl read strictly: every line must be JSON without NaN/Infinity literals."""
    def strict(token):
        raise AssertionError(f"non-strict JSON literal {token}")
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=strict) for line in lines]


def assert_repeats(result, reference):
    """Each step once, the reference's losses and evaluations, the last two checkpoints valid."""
    got = records(result.run_dir)
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in got if r["kind"] == "eval"] == [0, 4, STEPS]
    assert train_losses(got) == pytest.approx(train_losses(reference), abs=1e-6)
    evals = [r for r in got if r["kind"] == "eval"]
    want = [r for r in reference if r["kind"] == "eval"]
    assert [r["ppl/loop_1"] for r in evals] == pytest.approx([r["ppl/loop_1"] for r in want], rel=1e-6)
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]  # no temp dir left, pruned by step
    assert latest_checkpoint(result.run_dir) == result.checkpoint
    rrt.load(result.checkpoint)


def resume(config, llama):
    """Train again, returning (result, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    return result, [str(w.message) for w in caught]


# ---- SIGKILL at chosen points: inside checkpoint writes, metric appends, renames, steps ----------------

# One process imports torch once, then forks a child per scenario; the child arms its kill point (the n-th
# call of a function) and trains; SIGKILL there skips every `finally`, as a real kill does.
KILL_DRIVER = """
import json, os, signal, sys, traceback
sys.path.insert(0, {root!r})
import torch
import rrt, rrt.checkpoint, rrt.train
from tests.test_train import TRAIN, EVAL
from rrt.train import train
from rrt.trainconfig import TrainConfig

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point, nth):
    calls = [0]
    def due(hit=True):
        calls[0] += hit
        return hit and calls[0] == nth
    if point == "metrics":  # half a record appended, then killed: a torn last line
        real = os.write
        def write(fd, data):
            if due(os.readlink(f"/proc/self/fd/{{fd}}").endswith("metrics.jsonl")):
                real(fd, data[: len(data) // 2])
                die()
            return real(fd, data)
        os.write = write
    elif point == "weights":  # killed while model.safetensors is half written (in the temp dir)
        real = rrt.checkpoint.save_file
        def save_file(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            if due():
                os.truncate(path, os.path.getsize(path) // 2)
                die()
        rrt.checkpoint.save_file = save_file
    elif point == "rank_state":  # killed while rank0.pt is half written (torch.save gets a hashing file object)
        real = torch.save
        def save(obj, path, *a, **k):
            real(obj, path, *a, **k)
            name = str(getattr(path, "name", path))
            if due(name.endswith("rank0.pt")):
                path.flush()
                os.truncate(name, os.path.getsize(name) // 2)
                die()
        torch.save = save
    elif point == "manifest":  # the temp dir complete, killed before its rename
        real = rrt.train.resume.write_manifest
        def write_manifest(*a, **k):
            real(*a, **k)
            if due():
                die()
        rrt.train.resume.write_manifest = write_manifest
    elif point == "renamed":  # killed just after a checkpoint is renamed into place (before pruning, evaluating)
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if due(os.path.basename(src).startswith(".tmp-step")):
                die()
        os.replace = replace
    elif point == "step":  # killed as step `nth` starts
        real = rrt.train.loop._optimiser_step
        def step(*a, **k):
            if due():
                die()
            return real(*a, **k)
        rrt.train.loop._optimiser_step = step

original = rrt.load_model("tiny-llama")[0]
for name, point, nth, config in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        try:
            arm(point, nth)
            train(TrainConfig.from_dict(config), train_seqs=TRAIN, eval_seqs=EVAL, original=original)
        except BaseException:
            traceback.print_exc()
        os._exit(3)  # not killed: the point was never reached
    print(json.dumps([name, pid, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]), flush=True)
"""

KILLS = [  # (name, point, n-th call); metric records: eval 0, train 1-4, eval 4, train 5-8, eval 8
    ("torn train record", "metrics", 7),
    ("torn final eval record", "metrics", 11),
    ("inside the weights write", "weights", 2),
    ("inside the optimiser-state write", "rank_state", 3),
    ("manifest written, not renamed", "manifest", 2),
    ("renamed, not pruned", "renamed", 3),
    ("after the final rename, before the final eval", "renamed", 4),
    ("at a seeded random step", "step", __import__("random").Random(14).randint(1, STEPS)),
]


@pytest.mark.slow
def test_sigkill_at_each_point_then_resume_repeats_the_uninterrupted_run(tmp_path, llama, reference):
    configs = {name: config_in(tmp_path, f"kill{i}") for i, (name, _, _) in enumerate(KILLS)}
    scenarios = [(name, point, nth, configs[name].to_dict()) for name, point, nth in KILLS]
    log = tmp_path / "driver.log"
    done = subprocess.run([sys.executable, "-c", KILL_DRIVER.format(root=ROOT), json.dumps(scenarios)],
                          stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, log.read_text()[-3000:]
    outcomes = {name: (pid, code) for name, pid, code in map(json.loads, done.stdout.splitlines())}
    for name, config in configs.items():
        pid, code = outcomes[name]
        assert code == -signal.SIGKILL, f"{name}: not killed (exit {code}): {log.read_text()[-3000:]}"
        before = records_lenient(config.out)
        killed_at = latest_checkpoint(config.out)
        kept_step = 0 if killed_at is None else int(killed_at.name[5:])
        result, messages = resume(config, llama)
        assert any(f"reclaimed the lock of pid {pid} " in m for m in messages), (name, messages)
        if name.startswith("torn"):
            assert any("metrics.jsonl: dropped a torn last line" in m for m in messages), (name, messages)
        assert_repeats(result, reference)
        # nothing written before the kill is lost: every record up to the resumed checkpoint is kept as it was
        kept = [r for r in before if r["step"] <= kept_step]
        assert records(config.out)[:len(kept)] == kept


def records_lenient(run_dir) -> list[dict]:
    """metrics.jsonl as a killed run left it, a torn last line left out."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().split("\n")
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ---- a full disk (ENOSPC) during a checkpoint save and during a metrics append ------------------------

def enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("target", ["weights", "optimiser state"])
def test_full_disk_during_a_checkpoint_save_fails_naming_it_and_loses_nothing(tmp_path, llama, reference,
                                                                               monkeypatch, target):
    config = config_in(tmp_path, "run")
    real_save_file, real_save = rrt.checkpoint.save_file, torch.save

    def save_file(tensors, path, *a, **k):  # the 2nd save (step 4) runs out of space half-way
        if target == "weights" and "step-00000004" in str(path):
            Path(path).write_bytes(b"\0" * 100)
            raise enospc(path)
        return real_save_file(tensors, path, *a, **k)

    def save(obj, path, *a, **k):  # rank files are written through a hashing file object with the file's name
        name = str(getattr(path, "name", path))
        if target == "optimiser state" and "step-00000004" in name and name.endswith("rank0.pt"):
            path.write(b"\0" * 100)
            raise enospc(name)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(rrt.checkpoint, "save_file", save_file)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match=r"writing checkpoint .*step-00000004 failed at .*"
                                      r"(model.safetensors|rank0.pt).*last good checkpoint: .*step-00000002") as e:
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert e.value.errno == errno.ENOSPC
    run = Path(config.out)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # the partial copy removed
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == [1, 2, 3, 4]
    monkeypatch.undo()
    result, _ = resume(config, llama)
    assert_repeats(result, reference)


def test_full_disk_during_a_metrics_append_leaves_no_torn_line(tmp_path, llama, reference, monkeypatch):
    config = config_in(tmp_path, "run")
    real_write, metrics = os.write, str(Path(config.out) / "metrics.jsonl")
    appends = []

    def write(fd, data):  # the 7th record (train step 5) gets half its bytes onto the disk
        if os.readlink(f"/proc/self/fd/{fd}") == metrics:
            appends.append(1)
            if len(appends) == 7:
                real_write(fd, data[: len(data) // 2])
                raise enospc(metrics)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match=r"appending a record to .*metrics.jsonl failed") as e:
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    got = records(config.out)  # strict: no torn line left behind
    assert [(r["kind"], r["step"]) for r in got] == [("eval", 0)] + [("train", s) for s in (1, 2, 3, 4)] + [("eval", 4)]
    result, _ = resume(config, llama)
    assert_repeats(result, reference)
    assert records(config.out)[:6] == got  # everything written before the fault kept


# ---- corrupted files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped(tmp_path_factory, llama):
    """A run stopped during step 7 (checkpoints 4 and 6 on disk, 6 complete with optimiser state)."""
    config = config_in(tmp_path_factory.mktemp("stopped"), "run")
    real, calls = rtrain._optimiser_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    rtrain._optimiser_step = step
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    finally:
        rtrain._optimiser_step = real
    return Path(config.out)


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def garble(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def scale_a_weight(path):
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, path)


CORRUPTIONS = {  # what is done to checkpoint step-6's file → the name the warning must give
    "truncated weights": (WEIGHTS, truncate, WEIGHTS),
    "a scaled weight": (WEIGHTS, scale_a_weight, WEIGHTS),
    "truncated training_state.pt": (TRAINING_STATE, truncate, TRAINING_STATE),
    "garbage training_state.pt": (TRAINING_STATE, garble, TRAINING_STATE),
    "truncated rank0.pt": ("rank0.pt", truncate, "rank0.pt"),
    "garbage rank0.pt": ("rank0.pt", garble, "rank0.pt"),
    "garbage config.json": ("config.json", lambda p: p.write_text('{"model_type": "llama", "hidden'), "config.json"),
    "deleted rank0.pt": ("rank0.pt", Path.unlink, "rank0.pt is missing"),
    "no manifest (older checkpoint)": (MANIFEST, Path.unlink, "manifest.json is missing"),
    "garbage manifest": (MANIFEST, garble, "manifest.json is not valid JSON"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(tmp_path, llama, reference,
                                                                                   stopped, kind):
    name, corrupt, named = CORRUPTIONS[kind]
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    corrupt(run / "checkpoints" / "step-00000006" / name)
    result, messages = resume(config_in(tmp_path, "run"), llama)
    assert any("step-00000006 is not usable" in m and named in m for m in messages), messages
    assert_repeats(result, reference)


def test_a_torn_metrics_line_is_truncated_with_a_warning(tmp_path, llama, reference, stopped):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 7, "lo')
    result, messages = resume(config_in(tmp_path, "run"), llama)
    assert any(f"{run / 'metrics.jsonl'}: dropped a torn last line" in m for m in messages), messages
    assert_repeats(result, reference)


@pytest.mark.parametrize("kind", ["garbage metrics line", "garbage config.json"])
def test_a_garbled_run_file_is_refused_naming_it(tmp_path, llama, stopped, kind):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    if kind == "garbage metrics line":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        lines[2] = "#garbage"
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        match = r"metrics.jsonl line 3 is not JSON"
    else:
        (run / "config.json").write_text('{"out": ')
        match = r"config.json is not valid JSON"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=match):
        train(config_in(tmp_path, "run"), train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched


def test_a_missing_config_json_resumes_from_checkpoints_of_the_same_config(tmp_path, llama, reference, stopped):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / "config.json").unlink()
    result, messages = resume(config_in(tmp_path, "run"), llama)
    assert any("config.json is missing" in m for m in messages), messages
    assert_repeats(result, reference)
    assert json.loads((run / "config.json").read_text()) == config_in(tmp_path, "run").to_dict()


def test_checkpoints_of_another_config_are_refused_and_kept(tmp_path, llama, stopped):
    """config.json gone, the checkpoints are of lr 3e-3: a run of lr 1e-3 there must neither resume nor prune them."""
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / "config.json").unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"holds checkpoints of another config.*step-00000006"):
        train(config_in(tmp_path, "run", lr=1e-3), train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resuming_on_other_training_blocks_is_refused(tmp_path, llama, stopped):
    """The data label ("") cannot tell the blocks apart; their fingerprint does."""
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    other = TRAIN.clone()
    other[0, 0] += 1
    with pytest.raises(ValueError, match=r"train_seqs.json: this run trained on other sequences"):
        train(config_in(tmp_path, "run"), train_seqs=other, eval_seqs=EVAL, original=llama)


# ---- two writers in one run directory -------------------------------------------------------------

HOLDER = """
import sys
sys.path.insert(0, {root!r})
import rrt.train
from tests.test_train import TRAIN, EVAL
from rrt.train import train
from rrt.trainconfig import TrainConfig
real = rrt.train.loop._optimiser_step
def step(run, blocks, config, n, **kw):
    if n == 5:  # hold the run directory mid-run until told to go on
        print("holding", flush=True)
        sys.stdin.readline()
    return real(run, blocks, config, n, **kw)
rrt.train.loop._optimiser_step = step
train(TrainConfig.from_dict({config!r}), train_seqs=TRAIN, eval_seqs=EVAL)
"""


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_reclaimed(tmp_path, llama, reference):
    config = config_in(tmp_path, "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, config=config.to_dict())],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(tmp_path / "log").open("w"),
                              text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        assert holder.stdout.readline() == "holding\n", (tmp_path / "log").read_text()[-3000:]
        before = records(config.out)
        with pytest.raises(RuntimeError, match=rf"in use by another writer \(pid {holder.pid} on "):
            train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
        assert records(config.out) == before  # the refused writer wrote nothing
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, naming a dead pid
        holder.wait()
    result, messages = resume(config, llama)
    assert any(f"reclaimed the lock of pid {holder.pid} " in m for m in messages), messages
    assert_repeats(result, reference)
    assert not (Path(config.out) / "run.lock").exists()  # released at the end


def test_the_lock_is_per_directory_and_released_on_errors(tmp_path, llama):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        with pytest.raises(RuntimeError, match=rf"in use by another writer \(pid {os.getpid()} "):
            train(config_in(tmp_path, "run"), train_seqs=TRAIN, original=llama)
    finally:
        lock.release()
    with pytest.raises(ValueError, match="config.num_processes=2"):  # refused before the lock: none left behind
        train(config_in(tmp_path, "run", num_processes=2), train_seqs=TRAIN, original=llama)
    assert not (tmp_path / "run" / "run.lock").exists()


# ---- NaN: a non-finite gradient or weight is never applied or saved ---------------------------------

def test_a_nan_gradient_with_a_finite_loss_stops_before_the_optimiser(tmp_path, llama, monkeypatch):
    """With clipping off too: the total gradient norm is taken anyway."""
    real_loss, calls = rtrain._loss, []

    def poisoned(*args):
        loss, parts = real_loss(*args)
        calls.append(1)
        if len(calls) == 3:  # step 3: the loss stays finite, its gradient is NaN
            loss.register_hook(lambda g: g * float("nan"))
        return loss, parts

    monkeypatch.setattr(rtrain, "_loss", poisoned)
    config = config_in(tmp_path, "run", clip=0.0)
    with pytest.raises(FloatingPointError, match=r"non-finite \{'grad_norm': nan\} at step 3; stopped before the "
                                                 r"optimiser step.*last good checkpoint: .*step-00000002"):
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert [r["step"] for r in records(config.out) if r["kind"] == "train"] == [1, 2]
    assert all(math.isfinite(r["grad_norm"]) for r in records(config.out) if r["kind"] == "train")
    weights = load_file(Path(config.out) / "checkpoints" / "step-00000002" / WEIGHTS)
    assert all(t.isfinite().all() for t in weights.values())


def test_non_finite_weights_are_never_checkpointed(tmp_path, llama, reference, monkeypatch):
    """A weight overflows to inf in step 4 with a finite loss and gradient: checkpoint 4 is refused, none is
    written, and the run resumes exactly from checkpoint 2."""
    real_step = rtrain._optimiser_step

    def overflowing(run, blocks, config, step, **kw):
        parts = real_step(run, blocks, config, step, **kw)
        if step == 4:
            with torch.no_grad():
                run.student.get_input_embeddings().weight[5, 7] = float("inf")
        return parts

    monkeypatch.setattr(rtrain, "_optimiser_step", overflowing)
    config = config_in(tmp_path, "run")
    with pytest.raises(FloatingPointError, match=r"non-finite weights after step 4 \(1 tensors, e.g. "
                                                 r"\['model.embed_tokens.weight'\]\): .*step-00000004 not written; "
                                                 r"last good checkpoint: .*step-00000002"):
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert [p.name for p in (Path(config.out) / "checkpoints").iterdir()] == ["step-00000002"]
    monkeypatch.undo()
    result, _ = resume(config, llama)
    assert_repeats(result, reference)


def test_non_finite_metrics_are_written_as_null_with_a_flag(tmp_path):
    metrics = rrt.rundir.Metrics(tmp_path)
    metrics.write({"kind": "eval", "step": 3, "ppl/loop_0": float("inf"), "ppl/loop_1": 2.5})
    assert records(tmp_path) == [{"kind": "eval", "step": 3, "ppl/loop_0": None, "ppl/loop_1": 2.5,
                                  "nonfinite": ["ppl/loop_0"]}]


# ---- the run lock without flock: an O_EXCL file with a heartbeat --------------------------------------

def write_lock(run_dir: Path, holder: str, age_s: float) -> Path:
    """Leave a lock file naming `holder`, its heartbeat `age_s` seconds old."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    lock.write_text(holder)
    now = time.time()
    os.utime(lock, (now - age_s, now - age_s))
    return lock


def acquire_warnings(lock: RunLock) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock.acquire()
    return [str(w.message) for w in caught]


def test_a_live_holder_on_another_host_is_refused_and_a_silent_one_reclaimed(tmp_path):
    write_lock(tmp_path / "run", "pid 4242 on node-elsewhere", age_s=60)
    with pytest.raises(RuntimeError, match=r"in use by another writer \(pid 4242 on node-elsewhere, heartbeat 60 s "
                                           r"ago; lock file .*run.lock\)"):
        RunLock(tmp_path / "run", stale_after_s=600).acquire()
    assert (tmp_path / "run" / "run.lock").read_text() == "pid 4242 on node-elsewhere"  # left as it was

    write_lock(tmp_path / "run", "pid 4242 on node-elsewhere", age_s=700)
    lock = RunLock(tmp_path / "run", stale_after_s=600)
    messages = acquire_warnings(lock)
    try:
        assert any("reclaimed the lock of pid 4242 on node-elsewhere, whose heartbeat is 700 s old" in m
                   for m in messages), messages
        assert (tmp_path / "run" / "run.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    finally:
        lock.release()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_dead_holder_on_this_host_is_reclaimed_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    write_lock(tmp_path / "run", f"pid {gone.pid} on {socket.gethostname()}", age_s=0)
    lock = RunLock(tmp_path / "run")
    messages = acquire_warnings(lock)
    lock.release()
    assert any(f"reclaimed the lock of pid {gone.pid} on " in m and "no longer running" in m for m in messages), messages


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    lock = RunLock(tmp_path / "run", heartbeat_s=0.05, stale_after_s=600)
    lock.acquire()
    try:
        path = tmp_path / "run" / "run.lock"
        old = time.time() - 1000
        os.utime(path, (old, old))
        for _ in range(2000):  # the heartbeat thread moves the time forward within a few beats
            if path.stat().st_mtime > old + 500:
                break
            time.sleep(0.01)
        assert path.stat().st_mtime > old + 500
    finally:
        lock.release()


# ---- preemption: SIGTERM/SIGUSR1 checkpoint the step just done, stop with Interrupted (exit 75), resume exactly

def test_sigusr1_checkpoints_the_step_it_stopped_after_and_the_rerun_repeats_the_run(tmp_path, llama, reference,
                                                                                      monkeypatch):
    real_step, before = rtrain._optimiser_step, signal.getsignal(signal.SIGUSR1)

    def signalled(run, blocks, config, step, **kw):
        parts = real_step(run, blocks, config, step, **kw)
        if step == 3:  # between two checkpoints (save_every 2): one is written at 3 anyway
            os.kill(os.getpid(), signal.SIGUSR1)
        return parts

    monkeypatch.setattr(rtrain, "_optimiser_step", signalled)
    config = config_in(tmp_path, "run")
    with pytest.raises(rrt.train.Interrupted, match=r"stopped by a signal after step 3") as stopped:
        train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is train's only while it runs
    assert stopped.value.step == 3 and stopped.value.checkpoint == Path(config.out) / "checkpoints" / "step-00000003"
    assert latest_checkpoint(config.out) == stopped.value.checkpoint
    assert (stopped.value.checkpoint / "rank0.pt").exists()  # with optimizer state, to resume from
    assert [r["step"] for r in records(config.out) if r["kind"] == "train"] == [1, 2, 3]
    monkeypatch.undo()
    result, _ = resume(config, llama)
    assert_repeats(result, reference)


CLI_RUN = ["-m", "rrt.train", "--model", "tiny-llama", "--num-blocks", "2", "--lora-rank", "4", "--steps", "150",
           "--batch-size", "2", "--seq-len", "16", "--max-train-seqs", "64", "--max-eval-seqs", "2",
           "--save-every", "1000", "--precision", "fp32"]


@pytest.mark.slow
def test_sigterm_exits_75_with_a_checkpoint_at_its_step_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cache = ["--data-cache", str(tmp_path / "cache")]
    whole = subprocess.run([sys.executable, *CLI_RUN, *cache, "--out", str(tmp_path / "whole")], capture_output=True,
                           text=True, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out, log = tmp_path / "stopped", (tmp_path / "log").open("w")
    job = subprocess.Popen([sys.executable, *CLI_RUN, *cache, "--out", str(out)], stdout=log, stderr=log, env=env)
    try:
        for _ in range(60_000):  # until a few steps are recorded (the wait is bounded; no timing is asserted)
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3 or job.poll() is not None:
                break
            time.sleep(0.01)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=600) == 75, (tmp_path / "log").read_text()[-3000:]
    finally:
        job.kill()
    trained = [r["step"] for r in records(out) if r["kind"] == "train"]
    assert 3 <= trained[-1] < 150 and trained == list(range(1, trained[-1] + 1))
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{trained[-1]:08d}"  # the step it stopped after
    assert f"stopped by a signal after step {trained[-1]}" in (tmp_path / "log").read_text()

    again = subprocess.run([sys.executable, *CLI_RUN, *cache, "--out", str(out)], capture_output=True, text=True,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert train_losses(records(out)) == train_losses(records(tmp_path / "whole"))  # exactly
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == list(range(1, 151))
