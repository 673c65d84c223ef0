"""Serving benchmark, baselines and the paper's simulator (rrt.serving.bench/baselines/simulate)."""
import pandas as pd
import pytest
import torch

import rrt
from rrt.serving import Engine, Request
from rrt.serving.baselines import StaticBatchEngine, profile
from rrt.serving.bench import PAPER_CONFIGS, load_bench_model, main, output_lengths, run_benchmark
from rrt.serving.simulate import kv_bytes_per_token, measure_block_times, simulate, weight_bytes


pytestmark = pytest.mark.usefixtures("one_thread")


def _table(cost):
    """A block-time table with T(n) = cost(n) at n = 1..64."""
    return pd.DataFrame({"batch_size": range(1, 65), "block_s_per_token": [cost(n) for n in range(1, 65)]})


def test_simulate_rules_are_exact():
    # T(n) = n: a recursive loop step over r rows costs r / B; vanilla steps cost the live rows.
    times = _table(float)
    traj = [[0, 1, 0], [1, 1, 1], [0, 0]]  # B = 2; request 1 never exits early
    df = simulate(traj, vanilla_times=times, recursive_times=times, num_blocks=2, max_active=2).set_index("system")
    # static: batch {0,1} 3 steps × T(2) + batch {2} 2 steps × T(1)
    assert df.loc["vanilla_static", "sim_seconds"] == 3 * 2 + 2 * 1
    # continuous: steps 1-3 run {0,1}; request 2 joins at step 4, alone for 2 steps
    assert df.loc["vanilla_continuous", "sim_seconds"] == 3 * 2 + 2 * 1
    # no exit: 2 loops per token, same schedule as continuous at half cost per loop step
    assert df.loc["recursive_no_exit", "sim_seconds"] == (6 * 2 + 4 * 1) / 2
    # oracle: request 0 needs 1+2+1 = 4 loop steps, request 1 six; request 2 joins after
    # request 0 (step 5) and needs 2: steps 1-4 two rows, 5-6 two rows → 6 steps × 2 rows / 2
    assert df.loc["recursive_oracle_exit", "sim_seconds"] == 6 * 2 / 2
    assert df.loc["recursive_oracle_exit", "sim_steps"] == 6
    prop = simulate(traj, vanilla_times=times, recursive_times=times, num_blocks=2, max_active=2,
                    propagate=True).set_index("system")
    # propagation adds a row the step after an early exit (request 0 token 0, request 2 token 0);
    # a request's last token is not propagated (it has no successor), as in the engine
    assert prop.loc["recursive_oracle_exit", "sim_seconds"] == (6 * 2 + 2) / 2


def test_simulate_interpolates_between_measured_sizes():
    times = pd.DataFrame({"batch_size": [1, 4], "block_s_per_token": [1.0, 2.5]})  # T(n) = 0.5 + 0.5 n
    for n in (2, 8):  # between, and beyond (extrapolated)
        df = simulate([[0]] * n, vanilla_times=times, recursive_times=times, num_blocks=1, max_active=n)
        assert df["sim_seconds"].tolist() == [0.5 + 0.5 * n] * 4


def test_static_batch_engine_admits_whole_batches():
    model, tok = rrt.load_model("tiny-llama")
    prompts = [tok(t).input_ids for t in ["Hello world", "Ab", "The fox"]]
    requests = lambda: [Request(list(p), 3) for p in prompts]  # noqa: E731
    cont = Engine(model, max_active=2)
    static = StaticBatchEngine(model, max_active=2)
    prof = profile(static)
    assert static.run(requests()) == cont.run(requests())
    # request 2 waits for the whole first batch: it is admitted only after both finished
    assert static.latency()[2] > max(static.latency()[0], static.latency()[1]) - 1e-9
    assert sorted(static.latency()) == [0, 1, 2]
    assert prof.attn_ideal <= prof.attn_rows_keys and len(prof.step_rows) == static.stats["steps"]


def test_run_benchmark_rows_and_ratios():
    model, tok = rrt.load_model("tiny-llama")
    df = run_benchmark(model, tok, num_blocks=3, lora_rank=2, num_requests=3, prompt_len=5,
                       new_tokens=3, length_spread=0.0, max_active=2, token_budget=8)
    assert df["system"].tolist() == ["vanilla_static", "vanilla_hf_generate_static", "vanilla_continuous",
                                     "recursive_no_exit", "recursive_oracle_exit",
                                     "recursive_oracle_exit_no_lora"]
    assert (df["tokens"] == 9).all()
    assert df.loc[0, "tokens_per_s_ratio"] == 1.0
    rec = df.set_index("system")
    assert rec.loc["recursive_no_exit", "exits_per_loop"] == "0 0 9"
    assert rec.loc["recursive_oracle_exit", "exits_per_loop"] == rec.loc["recursive_oracle_exit_no_lora", "exits_per_loop"]
    assert rec.loc["recursive_no_exit", "weight_bytes"] < rec.loc["vanilla_static", "weight_bytes"]
    assert [len(t) for t in df.attrs["trajectories"]] == [3, 3, 3]


def test_cli_writes_tables(tmp_path):
    bench = main(["--model", "tiny-llama", "--num-requests", "2", "--new-tokens", "3", "--prompt-len", "5",
                  "--max-active", "2", "--no-hf-generate", "--out", str(tmp_path)])
    assert len(bench) == 4
    for name in ["bench.csv", "simulate.csv", "block_times.csv", "report.md", "config.json"]:
        assert (tmp_path / name).exists()
    assert "real_over_sim_paper" in (tmp_path / "report.md").read_text()
    assert bench["tokens"].nunique() == 1 and bench.loc[0, "tokens"] == sum(output_lengths(2, 3, 0.5))


def test_output_lengths_are_shared_and_bounded():
    lengths = output_lengths(50, 24, 0.5, seed=1)
    assert lengths == output_lengths(50, 24, 0.5, seed=1) and min(lengths) >= 12 and max(lengths) <= 36
    assert output_lengths(3, 5, 0.0) == [5, 5, 5]
    with pytest.raises(ValueError, match="length_spread"):
        output_lengths(3, 5, 1.0)


def test_memory_accounting_and_cap():
    model, _ = rrt.load_model("tiny-llama")
    cfg = model.config
    assert kv_bytes_per_token(model) == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4
    cap = weight_bytes(model) + 2 * (4 + 2) * kv_bytes_per_token(model)
    times = measure_block_times(model, batch_sizes=[1, 2, 3], prefix_len=4, decode_len=2, memory_cap_bytes=cap)
    assert times["batch_size"].tolist() == [1, 2]
    assert (times["block_s_per_token"] > 0).all()


@pytest.mark.parametrize("name,non_embedding", [("paper-gemma-2b", 1_981_884_416),
                                                ("paper-tinyllama-1.1b", 968_976_384),
                                                ("paper-pythia-1b", 805_736_448)])
def test_paper_configs_match_table_16(name, non_embedding):
    assert name in PAPER_CONFIGS
    model, tok = load_bench_model(name, device="meta")  # shapes only: no memory, no time
    assert tok is None and rrt.count_parameters(model)["non_embedding"] == non_embedding


def test_given_trajectories_replace_the_oracle():
    model, tok = rrt.load_model("tiny-llama")
    kw = dict(num_blocks=2, num_requests=2, prompt_len=4, new_tokens=3, length_spread=0.0, max_active=2,
              hf_generate=False)
    df = run_benchmark(model, tok, trajectories=[[0, 0, 0], [0, 1, 0]], **kw).set_index("system")
    assert df.loc["recursive_oracle_exit", "exits_per_loop"] == "5 1"
    with pytest.raises(ValueError, match="one exit loop per generated token"):
        run_benchmark(model, tok, trajectories=[[0], [0]], **kw)
