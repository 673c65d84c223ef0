"""Serving benchmark, baselines and the paper's simulator (rrt.serving.bench/baselines/simulate)."""
import pandas as pd
import pytest
import torch

import rrt
from rrt.serving import Engine, Request
from rrt.exits import OracleExit
from rrt.rundir import read_json
from rrt.serving.baselines import StaticBatchEngine
from rrt.devices import native_bf16
from rrt.families import decoder_layers
from rrt.cli import bench_main as main
from rrt.cli import targets_main
from rrt.recipes import PAPER_MODELS
from rrt.serving.bench import load_bench_model, run_benchmark, serving_dtype, Workload
from rrt.serving.bounds import bound_seconds, DryRunEngine, interpolate, measure_step_costs, median_costs
from rrt.serving.simulate import kv_bytes_per_token, simulate, weight_bytes
from rrt.serving.targets import TARGETS, model_loops_and_rank, targets_table
from rrt.serving.workload import requests_from


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
    static = StaticBatchEngine(model, max_active=2, profile=True)
    assert static.run(requests()) == cont.run(requests())
    # request 2 waits for the whole first batch: it is admitted only after both finished
    assert static.latency()[2] > max(static.latency()[0], static.latency()[1]) - 1e-9
    assert sorted(static.latency()) == [0, 1, 2]
    assert len(static.profile.step_rows) == static.stats["steps"]


@pytest.fixture(scope="module")
def tiny_served():
    model, tok = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=3, lora_rank=2))
    samples = Workload(num_requests=5, prefix_len=6, decode_len=9).samples(tok, model.config.vocab_size)
    return model, tok, rec, samples


@pytest.mark.parametrize("kv_policy", ["propagate", "copy_kv", "copy_hidden"])
@pytest.mark.parametrize("static", [False, True])
def test_dry_run_replays_the_engine_schedule(tiny_served, kv_policy, static):
    _, _, rec, samples = tiny_served
    g = torch.Generator().manual_seed(0)
    traj = OracleExit({i: torch.randint(0, 3, (40,), generator=g).tolist() for i in range(len(samples))})
    kw = dict(token_budget=7, max_active=3, exit_policy=traj, kv_policy=kv_policy, max_seq_len=20)
    real = (StaticBatchEngine if static else Engine)(rec, profile=True, **kw)
    real.run(requests_from(samples))
    dry = DryRunEngine(rec, static=static, **kw)
    dry.run(requests_from(samples))
    assert [n for kind, n in dry.trace if kind == "block"] == real.profile.step_rows  # same steps, same rows
    assert sum(n for kind, n in dry.trace if kind == "head") == real.stats["tokens"]  # head on exiting rows only
    assert dry.exit_loops == real.exit_loops
    fills = sum(n for kind, n in dry.trace if kind == "fill")
    assert fills == (real.stats["filled_rows"] if kv_policy == "copy_hidden" else 0)


def test_bound_prices_every_call_at_its_row_count():
    costs = pd.DataFrame({"rows": [1, 4], "block_s": [1.0, 2.5], "fill_s": [0.5, 0.5], "head_s": [0.1, 0.4]})
    assert interpolate(costs, "block_s", 2) == 1.5 and interpolate(costs, "block_s", 8) == 4.5  # extrapolated
    trace = [("block", 1), ("head", 4), ("fill", 2), ("block", 4)]
    assert bound_seconds(trace, costs) == pytest.approx(1.0 + 0.4 + 0.5 + 2.5)


def test_median_costs_per_row_count_over_rounds():
    rounds = [pd.DataFrame({"rows": [1, 2], "block_s": [b1, b2], "fill_s": [0.1, 0.2], "head_s": [h, h],
                            "kv_bytes": [64, 64], "fits": [True, False]})
              for b1, b2, h in [(1.0, 2.0, 0.5), (3.0, 2.5, 0.7), (2.0, 9.0, 0.6)]]
    df = median_costs(rounds)
    assert df["rows"].tolist() == [1, 2] and df["block_s"].tolist() == [2.0, 2.5]
    assert df["head_s"].tolist() == [0.6, 0.6] and df["fits"].tolist() == [True, False]
    assert interpolate(df, "block_s", 2) == 2.5


def test_serving_dtype():
    assert serving_dtype("cpu", "float32") == torch.float32 and serving_dtype("cpu", "bfloat16") == torch.bfloat16
    assert serving_dtype("cpu") == (torch.bfloat16 if native_bf16() else torch.float32)
    assert serving_dtype("cuda:0") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp32'; valid: auto, float32"):
        serving_dtype("cpu", "fp32")


def test_run_benchmark_rows_ratios_and_bound(tiny_served):
    model, tok, rec, _ = tiny_served
    result = run_benchmark(model, tok, rec, workload=Workload(num_requests=4, prefix_len=6, decode_len=5),
                           max_active=2, token_budget=8, repeats=1, kv_policies=("propagate", "copy_kv"),
                           arrival_rate=100.0)
    df = result.systems
    assert df["system"].tolist() == ["hf_generate_static", "vanilla_static", "vanilla_continuous", "recursive_no_exit",
                                     "cdb_oracle", "cdb_oracle", "cdb_oracle_own", "cdb_oracle_own",
                                     "cdb_oracle_no_lora", "cdb_oracle_no_lora"]
    assert df["tokens"].nunique() == 1  # every system serves the same requests
    assert (df.loc[df.system == "vanilla_static", "delta_v"] == 1.0).all()
    assert (df.loc[df.system == "vanilla_continuous", "delta_seq"] == 1.0).all()
    assert (df["real_over_bound"] > 0).all() and (df["bound_s"] > 0).all()
    assert df["bound_tokens_per_s"].tolist() == pytest.approx((df["tokens"] / df["bound_s"]).tolist())
    continuous = df.loc[df.system == "vanilla_continuous"].iloc[0]
    assert continuous["delta_seq_bound"] == 1.0
    assert df["delta_seq_bound"].tolist() == pytest.approx((df["bound_tokens_per_s"]
                                                            / continuous["bound_tokens_per_s"]).tolist())
    # layer rows: without exits every position runs all L layers (B loops of K), as on the vanilla model;
    # propagate runs exited tokens' remaining loops (where a later token reads them) on top of what copy_kv runs
    assert df.loc[df.exit_policy == "none", "kv_policy"].eq("-").all()  # nothing exits: no KV policy applies
    assert df["max_active"].eq(2).all()  # no memory cap: every model at max_active
    rows = df.set_index(["system", "kv_policy"])
    vanilla_rows = rows.loc[("vanilla_continuous", "-"), "layer_rows"]
    k = len(decoder_layers(rec)) // 3  # layers per loop
    assert rows.loc[("vanilla_static", "-"), "layer_rows"] == vanilla_rows
    assert rows.loc[("recursive_no_exit", "-"), "layer_rows"] == vanilla_rows
    propagate, copy_kv = rows.loc["cdb_oracle", "propagate"], rows.loc["cdb_oracle", "copy_kv"]
    assert propagate["layer_rows"] == copy_kv["layer_rows"] + k * propagate["propagation_rows"]
    assert copy_kv["layer_rows"] < propagate["layer_rows"] <= vanilla_rows
    assert copy_kv["delta_seq_rows"] == pytest.approx(vanilla_rows / copy_kv["layer_rows"])
    assert rows.loc[("recursive_no_exit", "-"), "delta_seq_rows"] == 1.0
    # decode rows: every prompt token runs all L layers in every system, so they are the layer rows less L each
    prompt_tokens, layers = 4 * 6, len(decoder_layers(rec))
    assert continuous["decode_tokens_per_layer_row"] == pytest.approx(
        (continuous["tokens"] - 4) / (vanilla_rows - prompt_tokens * layers))
    assert copy_kv["delta_seq_decode_rows"] == pytest.approx(
        (vanilla_rows - prompt_tokens * layers) / (copy_kv["layer_rows"] - prompt_tokens * layers))
    assert copy_kv["delta_seq_decode_rows"] > copy_kv["delta_seq_rows"] > 1  # the prompts dilute what exits save
    # the paper's Δ_Seq: output tokens after the first over the run's seconds less its prefill seconds
    assert (df["prefill_seconds"] > 0).all() and (df["prefill_seconds"] < df["seconds"]).all()
    assert df["decode_tokens_per_s"].tolist() == pytest.approx(
        ((df["tokens"] - 4) / (df["seconds"] - df["prefill_seconds"])).tolist())
    assert continuous["delta_seq_decode"] == 1.0
    oracle = df[df.system == "cdb_oracle"].set_index("kv_policy")
    no_lora = df[df.system == "cdb_oracle_no_lora"].set_index("kv_policy")
    assert (oracle["exits_per_loop"] == no_lora["exits_per_loop"]).all()  # same replayed trajectories
    assert oracle.loc["copy_kv", "filled_rows"] > 0 and oracle.loc["copy_kv", "propagation_rows"] == 0
    expected = sum(b + 1 for t in result.trajectories for b in t) / sum(len(t) for t in result.trajectories)
    assert oracle.loc["propagate", "mean_loops_per_token"] == pytest.approx(expected)
    assert set(result.step_costs["model"]) == {"vanilla", "recursive B=3 r=2", "recursive B=3 r=0"}
    assert result.latency["system"].tolist() == ["vanilla_continuous", "cdb_oracle"]
    assert (result.latency["ttft_p50_s"] <= result.latency["latency_p50_s"]).all()

    # the targets, read off the same table
    t = targets_table(df)
    assert t.groupby("target").size().to_dict() == {  # real / bound for the 9 engine systems, not HF generate
        "real_over_bound": 9, "ratio_vs_hf_generate": 4, "delta_seq": 2, "delta_seq_over_row_bound": 4,
        "delta_seq_decode_over_row_bound": 4, "lora_cost": 2}
    by = t.set_index(["target", "system", "kv_policy"])
    for r in df[df.system.isin(["cdb_oracle", "cdb_oracle_own"])].itertuples():
        got = by.loc[("delta_seq_over_row_bound", r.system, r.kv_policy)]
        assert got["value"] == pytest.approx(r.delta_seq / r.delta_seq_rows) and got["row_bound"] == r.delta_seq_rows
        got = by.loc[("delta_seq_decode_over_row_bound", r.system, r.kv_policy)]
        assert got["value"] == pytest.approx(r.delta_seq_decode / r.delta_seq_decode_rows)
        assert by.loc[("ratio_vs_hf_generate", r.system, r.kv_policy), "value"] == r.ratio_vs_hf_generate
        if r.kv_policy == "propagate":  # saves no layer rows: held to its row bound, not to 1.2
            assert ("delta_seq", r.system, r.kv_policy) not in by.index
        else:
            assert by.loc[("delta_seq", r.system, r.kv_policy), "value"] == r.delta_seq
    for kv in ("propagate", "copy_kv"):
        cost = by.loc[("lora_cost", "cdb_oracle", kv), "value"]
        assert cost == pytest.approx(1 - oracle.loc[kv, "tokens_per_s"] / no_lora.loc[kv, "tokens_per_s"])
    assert (t["met"] == [TARGETS[n].met(v) for n, v in zip(t["target"], t["value"])]).all()
    # a bench.csv from before delta_seq_rows: the same ratio from steps × mean_rows_per_step and B
    backfilled = targets_table(df.drop(columns=["delta_seq_rows", "layer_rows"]))
    assert backfilled["row_bound"].tolist() == pytest.approx(t["row_bound"].tolist(), nan_ok=True)


def test_targets_arithmetic_and_names():
    bench = pd.DataFrame([
        # system, model, kv, tokens/s, real/bound, Δ_Seq, ratio to HF, E, tokens, steps, rows per step
        ("vanilla_continuous", "vanilla", "propagate", 100.0, 0.95, 1.0, 2.0, 1.0, 60, 20, 4.0),
        ("cdb_oracle", "recursive B=3 r=64", "copy_kv", 175.0, 0.90, 1.7, 3.4, 1.5, 60, 40, 3.0),
        ("cdb_oracle_no_lora", "recursive B=3 r=0", "copy_kv", 200.0, 0.89, 2.0, 4.0, 1.5, 60, 40, 3.0),
    ], columns=["system", "model", "kv_policy", "tokens_per_s", "real_over_bound", "delta_seq",
                "ratio_vs_hf_generate", "mean_loops_per_token", "tokens", "steps", "mean_rows_per_step"])
    bench["exit_policy"] = ["none", "oracle", "oracle"]
    t = targets_table(bench).set_index(["target", "system"])
    assert t.loc[("real_over_bound", "cdb_oracle"), "met"] and not t.loc[("real_over_bound", "cdb_oracle_no_lora"), "met"]
    # layer rows: continuous 80 items × L layers for 60 tokens; CDB 120 items × L/3 = 40·L: 2× the tokens
    # per layer row, its row bound; Δ_Seq 1.7 is 0.85 of it
    assert t.loc[("delta_seq_over_row_bound", "cdb_oracle"), "row_bound"] == pytest.approx(2.0)
    assert t.loc[("delta_seq_over_row_bound", "cdb_oracle"), "value"] == pytest.approx(0.85)
    assert not t.loc[("delta_seq_over_row_bound", "cdb_oracle"), "met"] and t.loc[("delta_seq", "cdb_oracle"), "met"]
    assert ("delta_seq_decode_over_row_bound", "cdb_oracle") not in t.index  # no decode columns: not read
    assert t.loc[("ratio_vs_hf_generate", "cdb_oracle"), "met"]
    assert t.loc[("lora_cost", "cdb_oracle"), "value"] == 0.125 and t.loc[("lora_cost", "cdb_oracle"), "met"]
    assert TARGETS["lora_cost"].met(0.15) and not TARGETS["lora_cost"].met(0.151)  # at most, inclusive
    assert TARGETS["real_over_bound"].met(0.9) and not TARGETS["real_over_bound"].met(0.899)
    assert ("lora_cost", "cdb_oracle_no_lora") not in t.index
    assert model_loops_and_rank("vanilla") == (1, 0) and model_loops_and_rank("recursive B=2 r=0") == (2, 0)
    with pytest.raises(ValueError, match="not a bench model name"):
        model_loops_and_rank("recursive B=2")


def test_cli_writes_tables(tmp_path):
    result = main(["--model", "tiny-llama", "--num-requests", "2", "--decode-len", "3", "--prefix-len", "5",
                   "--max-active", "2", "--repeats", "1", "--no-hf-generate", "--exit-policies", "max_prob",
                   "--calibration-corpus", "wikitext2/test", "--target-agreement", "0.8", "--out", str(tmp_path)])
    # static, continuous, no exit, oracle and own-output oracle × 2 KV policies, max_prob × 2 KV policies
    assert len(result.systems) == 9 and (result.systems["system"] == "cdb_max_prob").sum() == 2
    calibration = read_json(tmp_path / "config.json")["calibration"]
    assert calibration[0]["exit_policy"] == "max_prob" and calibration[0]["agreement"] >= 0.8
    for name in ["bench.csv", "step_costs.csv", "paper_sim.csv", "targets.csv", "report.md", "config.json",
                 "versions.json"]:
        assert (tmp_path / name).exists()
    report = (tmp_path / "report.md").read_text()
    assert "real_over_bound" in report and "Targets" in report and "delta_seq_decode_over_row_bound" in report
    written = pd.read_csv(tmp_path / "targets.csv")
    # real / bound for every system; the two row-bound fractions for the four oracle rows (no HF, no LoRA), Δ_Seq
    # for the two under copy_kv (propagate saves no rows)
    assert len(written) == 9 + 2 * 4 + 2
    again = targets_main([str(tmp_path), "--no-write"])
    # a tiny model's decode time can time at <= 0 (prefill-only run as slow by noise): its Δ is NaN on both reads
    assert again["value"].tolist() == pytest.approx(written["value"].tolist(), nan_ok=True)
    assert again["met"].tolist() == written["met"].tolist()
    with pytest.raises(FileNotFoundError, match="no bench.csv"):
        targets_main([str(tmp_path / "missing")])


def test_step_costs_and_memory_cap():
    model, _ = rrt.load_model("tiny-llama")
    cfg = model.config
    assert kv_bytes_per_token(model) == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4
    cap = weight_bytes(model) + 2 * 6 * kv_bytes_per_token(model)
    costs = measure_step_costs(model, max_rows=5, context_len=4, max_active=2, seq_len=6, memory_cap_bytes=cap,
                               repeats=1)
    assert costs["rows"].tolist() == [1, 2, 3, 4, 5] and (costs["block_s"] > 0).all() and costs["fits"].all()
    over = measure_step_costs(model, max_rows=2, context_len=4, max_active=3, seq_len=6, memory_cap_bytes=cap,
                              repeats=1)
    assert not over["fits"].any()


@pytest.mark.parametrize("name,non_embedding", [("paper-gemma-2b", 1_981_884_416),
                                                ("paper-tinyllama-1.1b", 968_976_384),
                                                ("paper-pythia-1b", 805_736_448)])
def test_paper_configs_match_table_16(name, non_embedding):
    assert name in PAPER_MODELS
    model, tok = load_bench_model(name, device="meta")  # shapes only: no memory, no time
    assert tok is None and rrt.count_parameters(model)["non_embedding"] == non_embedding


def test_a_timed_round_keeps_the_engines_numbers_not_the_engine(tiny_served):
    """Each system's engine (its KV pool, packed weights) is gone when the next system runs: on CUDA its peak is its own."""
    import gc
    import weakref

    from rrt.serving.bench import _time_engine

    _, _, rec, samples = tiny_served
    made = []

    def make():
        made.append(Engine(rec, max_active=2, max_seq_len=16, profile=True))
        return made[-1]

    result = _time_engine(make, lambda: requests_from(samples))
    alive = weakref.ref(made.pop())
    gc.collect()
    assert alive() is None  # nothing in the round's result holds the engine
    assert result["stats"]["tokens"] == sum(len(s.continuation) for s in samples)
    assert result["kv_pool"] > 0 and result["num_shared"] == 2


def test_each_model_serves_at_the_largest_batch_within_the_memory_cap(tiny_served):
    """App. N: weights, the engine's packed copies and the KV of `batch` requests fit the cap; one more does not."""
    from rrt.serving.bench import batch_within_cap
    model, tok, rec, _ = tiny_served
    seq = 40
    held = weight_bytes(rec) + Engine(rec, max_active=1, max_seq_len=seq).packed_bytes
    per_request = seq * kv_bytes_per_token(rec)
    cap = held + 7 * per_request + per_request // 2
    assert batch_within_cap(rec, cap, seq_len=seq, upper=100) == 7
    assert batch_within_cap(rec, cap, seq_len=seq, upper=5) == 5 and batch_within_cap(rec, None, seq_len=seq, upper=9) == 9
    assert batch_within_cap(model, cap, seq_len=seq, upper=100) < 7  # the vanilla model holds more weights
    with pytest.raises(ValueError, match=r"memory cap .* holds no request of recursive B=3 r=2: weights"):
        batch_within_cap(rec, held, seq_len=seq, upper=100)
    # in the benchmark, every system of a model serves at that model's batch
    cap = weight_bytes(model) + Engine(model, max_active=1, max_seq_len=11).packed_bytes + 2 * 11 * per_request // seq
    result = run_benchmark(model, tok, rec, workload=Workload(num_requests=4, prefix_len=6, decode_len=5), max_active=4,
                           token_budget=8, repeats=1, kv_policies=("copy_kv",), hf_generate=False, own_oracle=False,
                           memory_cap_bytes=cap)
    batch = result.systems.groupby("model")["max_active"].unique().map(list).to_dict()
    assert batch["vanilla"] == [2] and result.settings["batch"]["vanilla"] == 2
    assert batch["recursive B=3 r=2"] == [4]  # a third of the layers' weights: room for all four


def test_an_even_number_of_rounds_reports_the_mean_of_the_middle_two():
    from rrt.serving.bench import _median_run
    runs = [{"seconds": s, "prefill_seconds": s / 10, "id": i} for i, s in enumerate([4.0, 1.0, 3.0, 2.0])]
    median = _median_run(runs)
    assert median["seconds"] == 2.5 and median["prefill_seconds"] == pytest.approx(0.25) and median["id"] == 3
    assert _median_run(runs[:3])["seconds"] == 3.0


def test_corpora_are_averaged_per_setting_and_system():
    from rrt.serving.study import average_corpora
    df = pd.DataFrame({"shape": ["64/256"] * 4, "config": ["B=2 r=0"] * 4, "system": ["a", "b", "a", "b"],
                       "corpus": ["x/test", "x/test", "y/test", "y/test"], "tokens_per_s": [10.0, 20.0, 30.0, 60.0],
                       "fits": [True, True, False, True], "exits_per_loop": ["1 2", "3 4", "5 6", "7 8"]})
    out = average_corpora(df, ["shape", "config", "system"])
    assert out["tokens_per_s"].tolist() == [20.0, 40.0] and out["fits"].tolist() == [False, True]
    assert out["corpus"].eq("x/test + y/test").all() and "exits_per_loop" not in out
