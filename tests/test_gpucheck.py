"""`python -m rrt gpu-check` (rrt.gpucheck): its training run is 04's paper-gemma-2b plan with KD; the dry run writes
every table; without CUDA the real check stops before writing anything, saying what it needs."""
import dataclasses
import math

import pandas as pd
import pytest
import torch

from rrt.cli import gpu_check_main
from rrt.gpucheck import DRY_RUN, GPU, TRAIN_STEPS, check_config
from rrt.notebook import load_params
from rrt.runs.cost import train_flops
from rrt.runs.memory import estimate_memory

TRAIN_COLUMNS = ["device", "model", "num_blocks", "batch_size", "seq_len", "gradient_checkpointing",
                 "loss_chunk_tokens", "teacher_dtype", "peak_memory_bytes", "estimate_total_bytes", "peak_over_estimate",
                 "tokens_per_s", "flops_per_step", "peak_bf16_flops", "mfu"]


def test_the_trained_config_is_04s_paper_plan_with_kd(tmp_path):
    planned = next(r.config for r in load_params("04_early_exit", "paper-gemma-2b").runs()
                   if r.config.objective == "early_exit" and r.config.self_distill
                   and r.config.exit_scheme == "aggressive")
    config = check_config(GPU, tmp_path)
    assert (config.model, config.num_blocks, config.exit_coefficient) == ("google/gemma-2b", 2, 0.1)
    assert (config.kd, config.teacher, config.init_from) == ("fkl", None, None)  # KD from the model itself
    assert (config.steps, config.grad_accum, config.num_processes) == (TRAIN_STEPS, 1, 1)
    for name in ("batch_size", "seq_len", "gradient_checkpointing", "loss_chunk_tokens", "teacher_dtype", "lora_rank"):
        assert getattr(config, name) == getattr(planned, name), name  # the plan's per-GPU execution choices
    tiny = check_config(DRY_RUN, tmp_path)
    assert dataclasses.replace(tiny, model=config.model, seq_len=config.seq_len, batch_size=config.batch_size) == config


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_without_a_gpu_it_exits_non_zero_saying_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check_main(["--out", str(tmp_path / "check")])
    assert stop.value.code == 1
    assert "python -m rrt gpu-check: needs a GPU (or --dry-run): device='cuda' but torch" in capsys.readouterr().err
    assert not (tmp_path / "check").exists()


@pytest.mark.slow
def test_dry_run_writes_every_table(tmp_path):
    gpu_check_main(["--dry-run", "--out", str(tmp_path)])
    for name in ("config.json", "versions.json", "train.csv", "bench.csv", "step_costs.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "train-run" / "checkpoints").exists()  # the random weights are not kept
    train = pd.read_csv(tmp_path / "train.csv")
    assert len(train) == 1 and set(TRAIN_COLUMNS) <= set(train.columns)
    row = train.iloc[0]
    assert (row.model, row.objective, row.kd, row.timed_steps) == ("tiny-gemma", "early_exit", "fkl", TRAIN_STEPS - 1)
    config = check_config(DRY_RUN, tmp_path / "train-run")
    estimate = estimate_memory(config, device_kind="cpu")
    assert row.estimate_total_bytes == estimate.total
    assert {f"estimate_{k}_bytes": v for k, v in estimate.to_dict().items()} == {
        f"estimate_{k}_bytes": row[f"estimate_{k}_bytes"] for k in estimate.to_dict()}
    assert row.flops_per_step == train_flops(config)[0] / TRAIN_STEPS
    assert row.tokens_per_s > 0
    assert math.isnan(row.peak_memory_bytes) and math.isnan(row.mfu)  # the CPU: no allocator peak, no known peak FLOP/s
    bench = pd.read_csv(tmp_path / "bench.csv")
    assert bench["system"].tolist() == ["hf_generate_static", "vanilla_static", "vanilla_continuous",
                                        "recursive_no_exit", "cdb_oracle", "cdb_oracle", "cdb_oracle_no_lora",
                                        "cdb_oracle_no_lora"]
    assert set(bench[["shape", "num_blocks", "lora_rank"]].itertuples(index=False, name=None)) == {("tiny-gemma", 2, 4)}
    assert (bench["tokens_per_s"] > 0).all() and (bench["peak_memory_bytes"] >= bench["weight_bytes"]).all()
    costs = pd.read_csv(tmp_path / "step_costs.csv")
    assert {"rows", "block_s", "head_s", "shape", "num_blocks", "lora_rank"} <= set(costs.columns)
