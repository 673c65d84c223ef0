"""Carrying out a plan (rrt.runs): finished runs read back, a crash loses at most the run in flight,
and a planned run launched as its own 2-process job."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import rrt
import rrt.runs
import rrt.runs.execute
from rrt.notebook import start
from rrt.plans import InitAblation
from rrt.progress import GridProgress
from rrt.runs.execute import StudyData, load_data, run_plan

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(repeat_seeds=[], variants=[], model="tiny-llama", scale="smoke", steps=2, global_batch_size=2, batch_size=2, warmup_steps=0, seq_len=16,
             baselines=False, tasks=[], max_eval_seqs=2)


def blocks(n, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (n, length), generator=g)


@pytest.fixture()
def counted_train(monkeypatch):
    """rrt.runs.execute.train, recording its calls; `calls.fail_on = n` makes the n-th call raise (a crash mid-grid)."""
    class Calls(list):
        fail_on = None
    calls, real = Calls(), rrt.runs.execute.train

    def train(config, **kwargs):
        calls.append(config.out)
        if len(calls) == calls.fail_on:
            raise RuntimeError("killed")
        return real(config, **kwargs)
    monkeypatch.setattr(rrt.runs.execute, "train", train)
    return calls


def test_rerunning_a_plan_reads_finished_runs_back(tmp_path, counted_train):
    study = InitAblation(**SMALL, inits=["stepwise", "average"], runs_root=str(tmp_path / "runs"))
    original, tok = rrt.load_model("tiny-llama")
    data = StudyData(train=blocks(16), evals={"synthetic": blocks(2, seed=1)})
    first = run_plan(study, original=original, tokenizer=tok, data=data, run_dir=tmp_path / "a")
    assert len(counted_train) == 2
    again = run_plan(study, original=original, tokenizer=tok, data=data, run_dir=tmp_path / "b")
    assert len(counted_train) == 2  # nothing retrained
    for name in ("runs", "curves", "perplexity"):
        pd.testing.assert_frame_equal(first[name], again[name])


def test_a_crash_keeps_every_finished_run_and_the_rerun_trains_only_the_rest(tmp_path, counted_train):
    study = InitAblation(**SMALL, inits=["stepwise", "average", "lower"], runs_root=str(tmp_path / "runs"))
    original, tok = rrt.load_model("tiny-llama")
    data = StudyData(train=blocks(16), evals={"synthetic": blocks(2, seed=1)})
    counted_train.fail_on = 2
    with pytest.raises(RuntimeError, match="killed"):
        run_plan(study, original=original, tokenizer=tok, data=data, run_dir=tmp_path / "nb")
    saved = pd.read_csv(tmp_path / "nb" / "runs.csv")
    assert saved["run"].tolist() == ["stepwise B=2"]  # written as it finished
    counted_train.fail_on = None
    done = run_plan(study, original=original, tokenizer=tok, data=data, run_dir=tmp_path / "nb")
    assert len(counted_train) == 2 + 2  # the crashed one and the one after it; not the finished one
    assert done["runs"]["run"].tolist() == ["stepwise B=2", "average B=2", "lower B=2"]
    assert pd.read_csv(tmp_path / "nb" / "runs.csv").loc[0].equals(saved.loc[0])


@pytest.mark.slow
def test_a_planned_run_launches_as_its_own_two_process_job(tmp_path, counted_train):
    """`torchrun --nproc_per_node 2 -m rrt.runs <run>/run.json`: the cluster's unit of work, on CPU."""
    study = InitAblation(**{**SMALL, "global_batch_size": 4, "gpus_per_run": 2}, inits=["stepwise"],
                         eval_corpora=["wikitext2/test"], run_dir=str(tmp_path / "nb"), runs_root=str(tmp_path / "runs"))
    start(study)
    run = study.runs()[0]
    assert run.config.num_processes == 2 and run.config.grad_accum == 1
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "rrt.runs",
                           str(run.dir / "run.json")], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert run.trained() and len(list(run.dir.glob("results-*.json"))) == 1
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in metrics if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and train[-1]["tokens"] == 2 * 4 * 16
    # the notebook then collects it (collect mode) without training it again
    original, tok = rrt.load_model("tiny-llama")
    data = load_data(study.data_spec(), tok)
    tables = run_plan(study, original=original, tokenizer=tok, data=data, run_dir=tmp_path / "nb")
    assert counted_train == [] and tables["runs"]["run"].tolist() == ["stepwise B=2"]
    assert tables["perplexity"]["corpus"].tolist() == ["wikitext2/test"]


def test_fig8_points_take_the_accuracy_of_what_each_system_serves():
    """Vanilla systems get the vanilla model's accuracy; CDB systems their config's, under their exit and KV
    policy; the LoRA-removed ablation none (it is timed, never evaluated); Δ_V's spread from the repeats."""
    from rrt.serving.study import throughput_vs_accuracy
    t = pd.DataFrame({
        "config": ["B=2 r=64"] * 5, "system": ["vanilla_static", "recursive_no_exit", "cdb_oracle", "cdb_max_prob",
                                              "cdb_oracle_no_lora"],
        "exit_policy": ["none", "none", "oracle", "max_prob", "oracle"],
        "kv_policy": ["propagate", "propagate", "copy_kv", "copy_kv", "copy_kv"],
        "tokens_per_s": [10.0, 9.0, 14.0, 12.0, 16.0], "tokens_per_s_min": [9.0, 8.0, 13.0, 11.0, 15.0],
        "tokens_per_s_max": [11.0, 10.0, 15.0, 13.0, 17.0], "delta_v": [1.0, 0.9, 1.4, 1.2, 1.6]})
    acc = pd.DataFrame({"config": ["vanilla", "B=2 r=64", "B=2 r=64", "B=2 r=64"],
                        "exit_policy": ["none", "none", "oracle", "max_prob"], "kv_policy": ["-", "-", "copy_kv", "copy_kv"],
                        "value": [0.6, 0.5, 0.45, 0.4], "stderr": [0.05, 0.05, 0.05, 0.05]})
    points = throughput_vs_accuracy({"throughput": t, "accuracy": acc}).set_index("system")
    assert points["avg_accuracy"].tolist()[:4] == [0.6, 0.5, 0.45, 0.4]
    assert pd.isna(points.loc["cdb_oracle_no_lora", "avg_accuracy"])
    assert points.loc["cdb_oracle", "delta_v_min"] == pytest.approx(1.3)
    assert points.loc["cdb_oracle", "delta_v_max"] == pytest.approx(1.5)
    assert "gold_ll" not in points  # rows evaluated before gold_ll was logged
    # with the gold answer's log-likelihood: its mean over tasks and the pooled stderr, None where accuracy is
    gold = pd.concat([acc.assign(task="piqa"), acc.assign(task="arc_easy", value=0.3)])
    gold = gold.assign(gold_ll=[-1.0, -2.0, -3.0, -4.0, -2.0, -3.0, -4.0, -5.0], gold_ll_stderr=0.3)
    points = throughput_vs_accuracy({"throughput": t, "accuracy": gold}).set_index("system")
    assert points["gold_ll"].tolist()[:4] == [-1.5, -2.5, -3.5, -4.5]
    assert points["gold_ll_stderr"].iloc[:4].tolist() == pytest.approx([(2 * 0.3 ** 2) ** 0.5 / 2] * 4)
    assert pd.isna(points.loc["cdb_oracle_no_lora", "gold_ll"])


def test_run_plan_shows_each_training_step_on_its_one_bar(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(GridProgress, "step", lambda self, record: steps.append((self.name, record["step"])))
    study = InitAblation(**SMALL, inits=["stepwise"], runs_root=str(tmp_path / "runs"))
    original, tok = rrt.load_model("tiny-llama")
    data = StudyData(train=blocks(16), evals={"synthetic": blocks(2, seed=1)})
    run_plan(study, original=original, tokenizer=tok, data=data, run_dir=tmp_path / "nb")
    assert steps == [("stepwise B=2", 1), ("stepwise B=2", 2)]


def test_grid_progress_writes_a_line_per_run_event_and_throttles_steps():
    lines = []
    grid = GridProgress(2, desc="runs", every_s=3600, write=lines.append)
    grid.start("stepwise B=2", steps=3)
    grid.note("training")
    for step in (1, 2, 3):  # within every_s of the last line: only the last step is written
        grid.step({"step": step, "loss": 1.5, "tokens_per_s": 100.0})
    grid.done()
    grid.start("random B=2", steps=3)
    grid.done("read back")
    grid.close()
    assert [line.split(" (")[0] for line in lines] == ["runs 1/2 stepwise B=2: training",
                                                       "runs 1/2 stepwise B=2: step 3/3 loss 1.5000 100 tok/s",
                                                       "runs 1/2 stepwise B=2: done", "runs 2/2 random B=2: read back"]
    assert grid.bar.n == 2


def test_by_role_keeps_the_rows_of_those_roles_and_tables_without_roles_whole():
    tables = {"runs": pd.DataFrame({"run": ["a", "b", "c"], "role": ["study", "baseline", "variant"]}),
              "curve": pd.DataFrame({"rank": [0, 4]})}
    picked = rrt.runs.by_role(tables, "study", "baseline")
    assert picked["runs"]["run"].tolist() == ["a", "b"] and picked["curve"] is tables["curve"]


def test_a_pretrained_run_is_the_original_evaluated_and_never_trained(tmp_path, counted_train):
    """Table 12's TinyLlama full-size: the original checkpoint as a run (role "pretrained"): done before any training,
    no tokens, no hours, and its results are the original's own evaluation."""
    from rrt.evaluation import perplexity
    from rrt.plans import Distillation
    from rrt.runs.cost import plan_table
    from rrt.runs.execute import execute, read_results
    study = Distillation(model="tiny-llama", scale="smoke", final_num_blocks=[2], final_lora_ranks=[0],
                         final_full_size="pretrained", kd_ablation=False, runs_root=str(tmp_path / "runs"), steps=2,
                         global_batch_size=2, batch_size=2, warmup_steps=0, seq_len=16, long_steps=2,
                         long_warmup_steps=0, tasks=[], max_eval_seqs=2)
    [run] = [r for r in study.runs() if r.role == "pretrained"]
    assert run.trained() and run.tokens == 0 and run.samples == 0 and run.needs == ()
    assert run.tags == {"baseline": "full", "pretrained": True, "final": True, "seed": 0}
    assert plan_table([run]).h100_hours.item() == 0 and run.key not in {r.key for r in study.runs() if r is not run}
    original, tok = rrt.load_model("tiny-llama")
    data = StudyData(train=blocks(16), evals={"synthetic": blocks(2, seed=1)})
    results = execute(run, original=original, tokenizer=tok, data=data, evaluation=study.eval_spec())
    assert counted_train == [] and results["curves"] == [] and results["summary"]["checkpoint"] == "-"
    assert results["perplexity"] == [{"corpus": "synthetic", "loop_idx": None,
                                      "perplexity": perplexity(original, data.evals["synthetic"])}]
    assert read_results(run, study.eval_spec()) == results

