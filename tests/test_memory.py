"""The memory model (rrt.runs.memory): exact where it is arithmetic, within 15% of peaks measured on this CPU."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rrt.devices import native_bf16
from rrt.runs.memory import (GB, HEADROOM, PLAN_CHUNK_TOKENS, check_fits, estimate_memory, extra_time,
                             fit_memory)
from rrt.trainconfig import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GEMMA = "google/gemma-2b"
# Big enough that the run's tensors (0.4-1 GB) dwarf the process's noise; odd-ish sizes, three families.
LLAMA = dict(model_type="llama", vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512)
SHAPES = {
    "llama": LLAMA,
    "gemma": dict(model_type="gemma", vocab_size=24000, hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=1, head_dim=64, max_position_embeddings=512),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=12000, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=4, num_attention_heads=8, rotary_pct=0.25, use_parallel_residual=True,
                     tie_word_embeddings=False, max_position_embeddings=512),
}
CASES = {  # (shape, TrainConfig fields)
    "plain (full-size)": ("llama", dict(num_blocks=1, baseline="full")),
    "recursive B=2": ("llama", dict(num_blocks=2)),
    "relaxed B=2 r=64": ("llama", dict(num_blocks=2, lora_rank=64)),
    "KD, bf16 teacher": ("llama", dict(num_blocks=2, kd="fkl", teacher_dtype="bfloat16")),
    "early exit B=2": ("llama", dict(num_blocks=2, objective="early_exit")),
    "checkpointing, r=64": ("llama", dict(num_blocks=2, lora_rank=64, gradient_checkpointing=True)),
    "chunked losses, early exit + KD": ("llama", dict(num_blocks=2, objective="early_exit", kd="fkl",
                                                      teacher_dtype="bfloat16", loss_chunk_tokens=128)),
    "gemma B=2 r=32": ("gemma", dict(num_blocks=2, lora_rank=32)),
    "gpt-neox B=2 r=32": ("gpt_neox", dict(num_blocks=2, lora_rank=32)),
}


def config(**fields) -> TrainConfig:
    return TrainConfig(**{"out": "", "model": GEMMA, "seq_len": 2048, "batch_size": 8, "num_processes": 8,
                          **fields})


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_estimate_is_within_15_percent_of_the_measured_peak(case, tmp_path):
    """2 steps of rrt.train.train in a fresh process (tests/memory_probe.py says how the peak is measured); the
    estimate is for this CPU (bf16 autocast where it has bf16 matmuls, as the run)."""
    shape, fields = CASES[case]
    fields = dict(out=str(tmp_path / "run"), model=str(tmp_path / "shape"), seq_len=256, batch_size=2, steps=2,
                  save_every=2, **fields)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"),
                           json.dumps({**fields, "shape": dict(SHAPES[shape])})],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    used = measured["peak"] - measured["before"]
    estimate = estimate_memory(TrainConfig(**fields), device_kind="cpu")
    assert used > 300e6  # the run's tensors, not the process's noise, are measured
    assert abs(estimate.total - used) <= 0.15 * used, (case, used / 1e6, measured, estimate.to_dict())


def test_shared_layers_count_once_and_fsdp_splits_the_state_exactly():
    one, shared = estimate_memory(config(num_blocks=1, baseline="full")), estimate_memory(config(num_blocks=2))
    assert shared.parameters < one.parameters and shared.activations == one.activations  # every depth still runs
    plain = estimate_memory(config(num_blocks=2, num_processes=8, sharding="none"))
    fsdp = estimate_memory(config(num_blocks=2, num_processes=8, sharding="fsdp"))
    assert fsdp.parameters == plain.parameters // 8 and fsdp.optimizer == plain.optimizer // 8
    assert plain.gradients == plain.optimizer  # param.grad + DDP's bucket copy: 4 + 4 bytes, as AdamW's 2 moments
    assert fsdp.gradients == plain.optimizer // 2 // 8
    assert fsdp.checkpoint == plain.checkpoint  # a checkpoint holds every shard


def test_lora_adds_parameters_and_trainable_choices_size_the_optimizer():
    plain, relaxed = estimate_memory(config(num_blocks=2)), estimate_memory(config(num_blocks=2, lora_rank=64))
    assert relaxed.parameters > plain.parameters and relaxed.activations > plain.activations
    lora_only = estimate_memory(config(num_blocks=2, lora_rank=64, trainable="lora"))
    assert lora_only.parameters == relaxed.parameters and lora_only.optimizer < relaxed.optimizer / 10


def test_module_ranks_size_the_parameters_as_the_converted_model_counts():
    """Table 8's per-module ranks: the estimate's fp32 parameters are the converted model's, counted once."""
    import torch
    import transformers

    import rrt
    from rrt.models import model_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(model_config(GEMMA))
    for ranks in [(128, 64, 128, 128), (0, 0, 0, 256)]:
        rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2, lora_rank=max(ranks), module_ranks=ranks,
                                                   lora_init="zero"))
        estimate = estimate_memory(config(num_blocks=2, lora_rank=max(ranks), module_ranks=ranks, trainable="lora"))
        assert estimate.parameters == 4 * rrt.count_parameters(rec)["total"]
        assert estimate.optimizer == 8 * rrt.count_parameters(rec)["lora"]


def test_savers_shrink_their_component_exactly():
    base = config(num_blocks=2, kd="fkl")
    full = estimate_memory(base)
    chunked = estimate_memory(dataclasses.replace(base, loss_chunk_tokens=512))
    assert chunked.logits * 8 * 2048 == full.logits * 512  # one chunk's rows of every logit tensor
    half = estimate_memory(dataclasses.replace(base, teacher_dtype="bfloat16"))
    assert half.teacher * 2 == full.teacher
    checkpointed = estimate_memory(dataclasses.replace(base, gradient_checkpointing=True))
    assert checkpointed.activations < full.activations / 4 and checkpointed.parameters == full.parameters
    assert extra_time(dataclasses.replace(base, gradient_checkpointing=True)) > 0.2 and extra_time(base) == 0


def test_a_cpu_estimate_uses_the_precision_the_run_uses():
    gpu, cpu = estimate_memory(config()), estimate_memory(config(), device_kind="cpu")
    assert gpu.workspace > 1 * GB and cpu.workspace == 0
    assert (cpu.working_copy > 0) == native_bf16("cpu")
    fp32 = estimate_memory(config(precision="fp32"))
    assert fp32.working_copy == 0 and fp32.activations > gpu.activations
    with pytest.raises(ValueError, match="device_kind='tpu': valid values are 'cuda', 'cpu'"):
        estimate_memory(config(), device_kind="tpu")


def test_fit_memory_keeps_what_fits_and_sizes_what_does_not():
    small = config(model="smollm2-135m", batch_size=4, grad_accum=2)
    assert fit_memory(small, gpu_memory_gb=80) == dict(batch_size=4, grad_accum=2, gradient_checkpointing=False,
                                                       loss_chunk_tokens=0, teacher_dtype="float32", sharding="none")
    big = config(num_blocks=2, kd="fkl", grad_accum=16)
    assert estimate_memory(big).total > HEADROOM * 80 * GB
    chosen = fit_memory(big, gpu_memory_gb=80)
    fitted = dataclasses.replace(big, **chosen)
    assert estimate_memory(fitted).total <= HEADROOM * 80 * GB
    assert fitted.batch_size * fitted.grad_accum == big.batch_size * big.grad_accum  # the global batch is kept
    assert chosen["loss_chunk_tokens"] in (0, PLAN_CHUNK_TOKENS)
    with pytest.raises(ValueError, match=r"run 'huge' does not fit 90% of gpu_memory_gb=8: .* GB per GPU at best"):
        fit_memory(config(num_processes=1, batch_size=1), gpu_memory_gb=8, name="huge")


def test_a_run_over_the_limit_is_refused_naming_it_and_its_components():
    with pytest.raises(RuntimeError, match=r"run 'stepwise B=2' needs ~.* GB per GPU but cuda:0 \(H100\) has "
                                           r"80.0 GB; refused before loading weights(.|\n)*activations"):
        check_fits(config(), name="stepwise B=2", limit_bytes=80 * 10**9, where="cuda:0 (H100)")
    assert check_fits(config(batch_size=1), name="ok", limit_bytes=80 * 10**9, where="x").total < 80 * GB
