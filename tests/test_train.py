"""Training loop (train.py, trainconfig.py): learning, ties, resume after SIGKILL, bad configs, regimes."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rrt
import rrt.train.loop as rtrain
from rrt.families import decoder_layers
from rrt.train import latest_checkpoint, train
from rrt.trainconfig import TrainConfig
from tests.test_recursive import assert_tied


def synthetic_blocks(n, length, seed=0):
    """[n, length] arithmetic sequences mod 96 (token ids 3..98): learnable within a few steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 96, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return 3 + (start + step * torch.arange(length)) % 96


TRAIN, EVAL = synthetic_blocks(48, 17), synthetic_blocks(4, 17, seed=1)


@pytest.fixture(scope="module")
def llama():
    return rrt.load_model("tiny-llama")[0]


def tiny_config(tmp_path, name="run", **overrides):
    values = dict(out=str(tmp_path / name), model="tiny-llama", num_blocks=2, lora_rank=4, steps=20,
                  batch_size=4, lr=3e-3, warmup_steps=2, save_every=10)
    values.update(overrides)
    return TrainConfig(**values)


def train_losses(metrics):
    return [r["loss"] for r in metrics if r["kind"] == "train"]


# ---- learning, ties, evaluation ---------------------------------------------------------------

def test_twenty_steps_lower_the_loss_and_keep_ties(tmp_path, llama):
    config = tiny_config(tmp_path, objective="early_exit", kd="fkl", self_distill=True, eval_every=10)
    result = train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    losses = train_losses(result.metrics)
    assert len(losses) == 20 and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    assert_tied(result.model, 2)  # invariant 2 after optimiser steps
    evals = [r for r in result.metrics if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["ppl/loop_1"] < evals[0]["ppl/loop_1"]
    assert set(evals[0]) == {"kind", "step", "ppl/loop_0", "ppl/loop_1"}
    # the checkpoint is the compact format and holds the trained weights
    loaded = rrt.load(result.checkpoint)
    assert_tied(loaded, 2)
    x = EVAL[:2]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, result.model.eval()(x).logits)
    run = Path(config.out)
    assert json.loads((run / "config.json").read_text()) == config.to_dict()
    assert "torch" in json.loads((run / "versions.json").read_text())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    # only an unfinished run's checkpoint carries what resuming needs: optimiser moments and RNG states
    assert (run / "checkpoints" / "step-00000010" / "rank0.pt").exists()
    assert not list((run / "checkpoints" / "step-00000020").glob("rank*.pt"))


def test_a_packed_dataset_on_disk_trains_exactly_like_the_same_blocks_in_memory(tmp_path, llama):
    import datasets

    from rrt.data import PACKED
    on_disk = datasets.Dataset.from_dict({"input_ids": TRAIN.tolist()}, features=PACKED)
    on_disk.save_to_disk(str(tmp_path / "packed"))
    on_disk = datasets.load_from_disk(str(tmp_path / "packed"))  # memory-mapped Arrow
    assert on_disk.cache_files
    config = dict(steps=12, save_every=12, batch_size=5)  # 60 samples of 48 blocks: epoch 2 starts mid-batch
    a = train(tiny_config(tmp_path, "tensor", **config), train_seqs=TRAIN, original=llama)
    b = train(tiny_config(tmp_path, "dataset", **config), train_seqs=on_disk, original=llama)
    assert train_losses(a.metrics) == train_losses(b.metrics)


def test_teacher_stays_frozen_and_original_untouched(tmp_path, llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    train(tiny_config(tmp_path, kd="jsd", steps=2), train_seqs=TRAIN, original=llama)
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in before.items())


# ---- resume -----------------------------------------------------------------------------------

RUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.test_train import TRAIN, EVAL
from rrt.train import train
from rrt.trainconfig import TrainConfig
train(TrainConfig.from_dict({config!r}), train_seqs=TRAIN, eval_seqs=EVAL)
"""


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_uninterrupted_losses(tmp_path):
    steps, save_every = 16, 4
    config = tiny_config(tmp_path, "killed", steps=steps, save_every=save_every, kd="fkl", eval_every=8,
                         objective="early_exit", grad_accum=2, batch_size=2)
    script = RUN_SCRIPT.format(root=str(Path(__file__).parents[1]), config=config.to_dict())
    log = tmp_path / "killed.log"  # a file, not a pipe: tqdm would fill an unread pipe and block the run
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
    first = Path(config.out) / "checkpoints" / f"step-{save_every:08d}"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {log.read_text()[-2000:]}"
    killed_at = latest_checkpoint(config.out)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < steps

    resumed = train(config, train_seqs=TRAIN, eval_seqs=EVAL)
    reference = train(tiny_config(tmp_path, "reference", steps=steps, save_every=save_every, kd="fkl",
                                  eval_every=8, objective="early_exit", grad_accum=2, batch_size=2),
                      train_seqs=TRAIN, eval_seqs=EVAL)
    got, want = train_losses(resumed.metrics), train_losses(reference.metrics)
    assert [r["step"] for r in resumed.metrics if r["kind"] == "train"] == list(range(1, steps + 1))
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6 and len(got) == len(want)


def test_restarting_a_finished_run_does_no_more_steps(tmp_path, llama):
    config = tiny_config(tmp_path, steps=3, save_every=2)
    first = train(config, train_seqs=TRAIN, original=llama)
    again = train(config, train_seqs=TRAIN, original=llama)
    assert again.checkpoint == first.checkpoint and again.metrics == first.metrics


def test_restart_before_the_first_checkpoint_starts_a_clean_metrics_file(tmp_path, llama):
    config = tiny_config(tmp_path, steps=3, save_every=3)
    stale = train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    for ckpt in (Path(config.out) / "checkpoints").iterdir():  # as if killed before any checkpoint
        ckpt.rename(ckpt.with_name(".killed-" + ckpt.name))
    fresh = train(config, train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert [(r["kind"], r["step"]) for r in fresh.metrics] == [(r["kind"], r["step"]) for r in stale.metrics]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, llama, monkeypatch):
    real_loss, calls = rtrain._loss, []

    def poisoned(*args):
        loss, parts = real_loss(*args)
        calls.append(1)
        if len(calls) == 4:  # step 4 (grad_accum=1)
            loss, parts = loss * float("nan"), {**parts, "loss": torch.tensor(float("nan"))}
        return loss, parts

    monkeypatch.setattr(rtrain, "_loss", poisoned)
    config = tiny_config(tmp_path, steps=6, save_every=2)
    with pytest.raises(FloatingPointError, match="at step 4.*step-00000002"):
        train(config, train_seqs=TRAIN, original=llama)
    assert latest_checkpoint(config.out).name == "step-00000002"
    assert_tied(rrt.load(latest_checkpoint(config.out)), 2)


def test_checkpoints_carry_a_manifest_and_the_grad_norm_is_taken_without_clipping(tmp_path, llama):
    """Each checkpoint lists its files' sha256 with the step and config hash (resume verifies them); the run
    directory keeps the training blocks' fingerprint; the lock is gone once the run ends."""
    from rrt.checkpoint import verify_manifest
    config = tiny_config(tmp_path, steps=3, save_every=1, clip=0.0)
    result = train(config, train_seqs=TRAIN, original=llama)
    assert all(r["grad_norm"] > 0 for r in result.metrics if r["kind"] == "train")
    run = Path(config.out)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    model_files = {"config.json", "model.safetensors", "training_state.pt"}
    for step, files in ((2, model_files | {"rank0.pt"}), (3, model_files)):
        manifest = verify_manifest(run / "checkpoints" / f"step-{step:08d}")
        assert manifest["step"] == step and manifest["config_hash"] == config.hash() and set(manifest["files"]) == files
    assert json.loads((run / "train_seqs.json").read_text())["shape"] == [48, 17]
    assert not (run / "run.lock").exists()


# ---- regimes: post-training with a head LoRA (Table 13), baselines ------------------------------

def test_post_training_head_lora_changes_intermediate_exits_only(tmp_path, llama):
    """Table 13's frozen rows: only the head LoRA trains, and it leaves the last loop exactly as it was."""
    uptrained = train(tiny_config(tmp_path, "up", steps=2), train_seqs=TRAIN, original=llama)
    config = tiny_config(tmp_path, "post", steps=3, init_from=str(uptrained.checkpoint), objective="early_exit",
                         trainable="head_lora", head_lora_rank=3, exit_coefficient=0.1, lr=3e-2)
    result = train(config, train_seqs=TRAIN, original=llama)
    start = rrt.load(uptrained.checkpoint)
    trained = dict(result.model.named_parameters())
    assert set(trained) - dict(start.named_parameters()).keys() == {"head_lora.lora_A", "head_lora.lora_B"}
    changed = {n for n, p in start.named_parameters() if not torch.equal(p, trained[n])}
    assert changed == set()  # every uptrained weight frozen
    assert result.model.head_lora.lora_B.abs().sum() > 0  # the adapter moved off its zero init
    head = result.model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and head.weight is result.model.get_input_embeddings().weight
    assert_tied(result.model, 2)
    x = EVAL
    with torch.no_grad():
        before, after = rrt.loop_logits(start, x), rrt.loop_logits(result.model.eval(), x)
        assert torch.equal(after[-1], before[-1])  # the last loop: bit-identical
        assert torch.equal(result.model(x).logits, start(x).logits)  # the model's own forward too
        assert not torch.allclose(after[0], before[0])  # the intermediate exit moved
        loaded = rrt.load(result.checkpoint)  # save/load rebuilds the head LoRA from the spec
        assert loaded.config.rrt["head_lora_rank"] == 3
        assert all(torch.equal(a, b) for a, b in zip(rrt.loop_logits(loaded, x), after))


def test_head_lora_needs_an_intermediate_exit(tmp_path):
    with pytest.raises(ValueError, match="head_lora_rank > 0 needs objective='early_exit'"):
        tiny_config(tmp_path, trainable="head_lora", head_lora_rank=2)
    with pytest.raises(ValueError, match="head_lora_rank=2 needs num_blocks >= 2"):
        tiny_config(tmp_path, num_blocks=1, lora_rank=0, objective="early_exit", head_lora_rank=2)


def test_baselines(tmp_path, llama):
    full = train(tiny_config(tmp_path, "full", baseline="full", num_blocks=1, lora_rank=0, steps=2),
                 train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert len(decoder_layers(full.model)) == 6 and "ppl/loop_0" in full.metrics[0]
    reduced = train(tiny_config(tmp_path, "reduced", baseline="reduced", num_blocks=3, lora_rank=0, steps=2),
                    train_seqs=TRAIN, original=llama)
    layers = decoder_layers(reduced.model)
    assert len(layers) == 2 and layers[0].mlp.up_proj.weight.shape == (37, 32)
    assert not torch.equal(layers[0].mlp.up_proj.weight, decoder_layers(llama)[0].mlp.up_proj.weight)


# ---- bad configs fail before training -----------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"kd": "kl"}, "unknown kd 'kl'; valid: fkl, rkl, jsd, tvd"),
    ({"objective": "exit"}, "unknown objective"),
    ({"exit_coefficient": 1.5}, r"coefficient must be in \[0, 1\]; got 1.5"),
    ({"exit_scheme": "weighted"}, "applies only to scheme='aggressive'"),
    ({"self_distill": True}, "needs objective='early_exit'"),
    ({"baseline": "full", "lora_rank": 0}, "set num_blocks=1"),
    ({"baseline": "reduced", "lora_rank": 4}, "lora_rank 0"),
    ({"trainable": "head_lora"}, "needs head_lora_rank > 0"),
    ({"init": "middle"}, "unknown init 'middle'"),
    ({"warmup_steps": 50}, "exceeds steps"),
])
def test_bad_config_fails(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides)


def test_resume_dir_of_another_config_fails_before_training(tmp_path, llama):
    train(tiny_config(tmp_path, steps=1, warmup_steps=0), train_seqs=TRAIN, original=llama)
    with pytest.raises(ValueError, match=r"different config.*'lr': \(0.003, 0.001\)"):
        train(tiny_config(tmp_path, steps=1, warmup_steps=0, lr=1e-3), train_seqs=TRAIN, original=llama)


def test_cli_flags_build_the_config(tmp_path):
    import argparse

    from rrt.cliargs import add_dataclass_arguments, dataclass_from_args
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    args = parser.parse_args(["--out", "x", "--kd", "fkl", "--exit-coefficient", "none", "--exit-scheme",
                              "weighted", "--self-distill", "--objective", "early_exit", "--betas", "0.9", "0.99", "--lora-rank", "8"])
    config = dataclass_from_args(TrainConfig, args)
    assert config == TrainConfig(out="x", kd="fkl", exit_coefficient=None, exit_scheme="weighted",
                                 self_distill=True, objective="early_exit", betas=(0.9, 0.99), lora_rank=8)
    with pytest.raises(ValueError, match="unknown kd"):
        dataclass_from_args(TrainConfig, parser.parse_args(["--out", "x", "--kd", "kl2"]))


def test_cli_never_packs_a_hub_corpus_it_names_make_pack(tmp_path, monkeypatch):
    """--data-source hub reads only what `make pack` wrote: with no shards it stops naming it, and trains nothing."""
    import rrt.cli
    from rrt.models import tiny_tokenizer
    monkeypatch.setattr(rrt.cli, "load_model", lambda source: (None, tiny_tokenizer()))
    monkeypatch.setattr(rrt.cli, "train", lambda config, **kw: pytest.fail("trained without data"))
    with pytest.raises((FileNotFoundError, ValueError, RuntimeError), match="make pack"):
        rrt.cli.train_main(["--out", str(tmp_path / "run"), "--model", "tiny-llama", "--steps", "10",
                            "--batch-size", "8", "--grad-accum", "2", "--seq-len", "17", "--data-source", "hub",
                            "--train-corpus", "slimpajama", "--eval-corpora", "slimpajama/test",
                            "--packed-dir", str(tmp_path / "packed")])


def test_cli_refuses_a_bad_data_source_and_several_eval_sets_before_loading(monkeypatch):
    import rrt.cli
    monkeypatch.setattr(rrt.cli, "load_model", lambda source: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="unknown data_source 'web'; valid: embedded, hub"):
        rrt.cli.train_main(["--out", "x", "--data-source", "web"])
    with pytest.raises(SystemExit):
        rrt.cli.train_main(["--out", "x", "--eval-corpora", "wikitext2/test", "tinystories/test"])


# ---- multi-process (DDP over gloo on CPU) --------------------------------------------------------

@pytest.mark.slow
def test_two_processes_follow_the_single_process_trajectory(tmp_path, llama):
    """2 processes × batch 2 read the same samples per step as 1 process × batch 4 (see _micro_batch)."""
    # fp32: bf16 autocast (precision="auto" on a CPU with bf16 matmuls) sums in another order per process count
    two = tiny_config(tmp_path, "two", steps=4, batch_size=2, kd="fkl", objective="early_exit", save_every=2,
                      num_processes=2, precision="fp32")
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(root=str(Path(__file__).parents[1]), config=two.to_dict()))
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script)], check=True, capture_output=True,
                   env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    got = train_losses([json.loads(line) for line in (Path(two.out) / "metrics.jsonl").read_text().splitlines()])
    one = train(tiny_config(tmp_path, "one", steps=4, batch_size=4, kd="fkl", objective="early_exit", precision="fp32"),
                train_seqs=TRAIN, eval_seqs=EVAL, original=llama)
    assert got == pytest.approx(train_losses(one.metrics), abs=1e-5)
    assert sorted(p.name for p in (Path(two.out) / "checkpoints" / "step-00000002").iterdir()
                  if p.name.startswith("rank")) == ["rank0.pt", "rank1.pt"]


@pytest.mark.slow
def test_cli_under_torchrun_packs_once_per_node_then_trains(tmp_path):
    """The first process packs into the cache while the other waits (local_main_process_first), then reads it."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "rrt.train", "--out", str(out),
                           "--model", "tiny-llama", "--num-blocks", "2", "--steps", "2", "--batch-size", "2",
                           "--seq-len", "32", "--max-train-seqs", "16", "--max-eval-seqs", "2",
                           "--data-cache", str(cache), "--save-every", "2"],
                          capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("packed wikitext2/validation into") == 1  # by one process, read by both
    assert done.stdout.count("packed wikitext2/test into") == 1
    assert len(list(cache.glob("wikitext2-validation-32-*.arrow"))) == 1 and not list(cache.glob("*.partial"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [1, 2]


def test_a_config_launched_with_another_process_count_is_refused(tmp_path, llama):
    """Tokens per step are planned for num_processes: a mismatched launch would train other token counts."""
    with pytest.raises(ValueError, match=r"config.num_processes=2 but 1 processes were launched"):
        train(tiny_config(tmp_path, steps=2, num_processes=2), train_seqs=TRAIN, original=llama)


def test_data_offset_starts_the_sample_stream_later(tmp_path, llama):
    """Post-training on new tokens: offset k reads exactly the samples a run without offset reads from sample k."""
    seen = {}
    for name, offset in (("a", 0), ("b", 8)):
        rows = []
        # the teacher is `llama` itself (kd, no cast); the student, a deep copy, inherits the hook: skip it
        hook = llama.register_forward_pre_hook(
            lambda m, a, kw: rows.append(kw["input_ids"][:, 0].tolist()) if m is llama else None, with_kwargs=True)
        try:
            train(tiny_config(tmp_path, name, steps=4, batch_size=4, kd="fkl", data_offset=offset, lora_rank=0),
                  train_seqs=TRAIN, original=llama)
        finally:
            hook.remove()
        seen[name] = [t for r in rows for t in r]
    assert seen["b"][:8] == seen["a"][8:16]
