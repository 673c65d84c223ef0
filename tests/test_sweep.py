"""Sweeps: grid expansion, skipping complete runs, the SLURM array script; a plan's jobs, their trap, their status."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rrt import cli, sweep
from rrt.notebook import load_params
from rrt.rundir import write_json
from rrt.runs.cost import plan_table
from rrt.runs.execute import _results_path, run_plan
from rrt.data import load_corpus, load_packed
from rrt.serving.bench import Workload, heldout_text
from rrt.serving.study import PackedWorkload, packed_stream, repack, served_models

GRID = Path(__file__).resolve().parents[1] / "params" / "grids" / "explore-smoke.yaml"


def test_expand_combines_grid_over_base():
    notebook, runs = sweep.expand(GRID)
    assert notebook == "00_explore" and len(runs) == 4
    assert {(r["num_blocks"], r["init"]) for r in runs} == {(2, "stepwise"), (2, "average"), (3, "stepwise"),
                                                            (3, "average")}
    assert all(r["model"] == "tiny-gemma3" for r in runs)  # from the base params file


def test_rerun_skips_complete_runs(tmp_path):
    executed = []

    def fake_run(notebook, run_dir, params):
        executed.append(run_dir.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / sweep.DONE).write_text("ok")
    first = sweep.run_local(GRID, tmp_path, run=fake_run)
    assert len(first) == 4 and 'num_blocks=2,init="stepwise"' in executed
    (first[1] / sweep.DONE).unlink()  # an interrupted run
    assert sweep.run_local(GRID, tmp_path, run=fake_run) == [first[1]]


def test_grid_slurm_script_has_one_task_per_grid_point(tmp_path):
    script = sweep.write_slurm(GRID, tmp_path).read_text()
    assert "#SBATCH --array=0-3" in script and "--task \"$SLURM_ARRAY_TASK_ID\"" in script


def test_bad_grid_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("notebook: 00_explore\ngrids: {seed: [0]}\n")
    with pytest.raises(ValueError, match="unknown keys: \\['grids'\\]"):
        sweep.expand(bad)


def test_report_links_every_executed_notebook_and_its_figures(tmp_path):
    import nbformat

    from rrt.report import write_index
    run = tmp_path / "01_init_ablation" / "smoke-1"
    (run / "figures").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nbformat.write(nb, run / "01_init_ablation.ipynb")
    (run / "figures" / "fig5a.png").write_bytes(b"\x89PNG")
    (run / "config.json").write_text('{"scale": "smoke"}')
    index = write_index(tmp_path).read_text()
    assert (run / "01_init_ablation.html").exists()
    assert 'href="01_init_ablation/smoke-1/01_init_ablation.html"' in index
    assert 'src="01_init_ablation/smoke-1/figures/fig5a.png"' in index and "<td>smoke</td>" in index


def test_a_plan_becomes_one_array_task_per_run_in_waves_then_a_collect_job(tmp_path):
    """04 at paper scale: packing first; the uptrained models, co-training and 03's teachers; the post-training rows
    and App. M's final models (60B + KD) wait for them; App. M's post-training waits for those."""
    submit = sweep.write_plan_jobs("04_early_exit", "paper-gemma-2b", tmp_path, runs_root=str(tmp_path / "runs"))
    root = submit.parent
    waves = [(root / f"wave{i}.sbatch").read_text() for i in range(3)]
    assert not (root / "wave3.sbatch").exists()
    # Table 13's 2 + 10 rows; App. M: the full-size 60B (+15B), the 10 final models of Table 12 and their 18 runs
    for wave, size in zip(waves, (4, 21, 18)):
        assert f"#SBATCH --array=0-{size - 1}\n" in wave
    for script in waves:
        assert "#SBATCH --gres=gpu:8\n" in script and "#SBATCH --cpus-per-task=64\n" in script
        assert script.count("cmd=(accelerate launch --config_file params/accelerate/ddp.yaml --num_processes 8 "
                            "-m rrt.runs ") == script.count("launcher=1;")
    text = submit.read_text()
    assert "w1=$(sbatch --parsable --dependency=afterok:$w0 " in text
    assert "w2=$(sbatch --parsable --dependency=afterok:$w1 " in text
    assert "collect=$(sbatch --parsable --dependency=afterany:$w0:$w1:$w2 " in text
    collect = (root / "collect.sbatch").read_text()
    assert "--gres" not in collect and "python -m rrt.runs" not in collect and "make run" not in collect
    assert "-p read_only True" in collect and "sweep-status 04_early_exit paper-gemma-2b --check" in collect
    assert len(list((tmp_path / "runs").glob("*/run.json"))) == 4 + 21 + 18


@pytest.mark.parametrize("notebook,waves", [("03_distillation", 2), ("05_throughput", 3)])
def test_paper_sbatch_files_survive_the_time_limit_and_a_failure(tmp_path, notebook, waves):
    """Every training job asks for time, requeues, is warned ahead of its limit and traps the warning; the packing
    wave comes first; a job that waits on another is cancelled when that one fails; only packing is online."""
    submit = sweep.write_plan_jobs(notebook, "paper-gemma-2b", tmp_path, runs_root=str(tmp_path / "runs"))
    root = submit.parent
    submitted = [line.split()[-1].rstrip(")") for line in submit.read_text().splitlines() if "sbatch --parsable" in line]
    names = [Path(p).name for p in submitted]
    assert names == ["pack.sbatch", "fetch.sbatch", *(f"wave{i}.sbatch" for i in range(waves)), "collect.sbatch"]
    assert submit.read_text().count('echo "') == len(names) + 1  # each job id printed, then the status command
    pack = (root / "pack.sbatch").read_text()
    assert f"python -m rrt pack {notebook} paper-gemma-2b --workers \"$SLURM_CPUS_PER_TASK\" --part " \
           f"\"$SLURM_ARRAY_TASK_ID/8\"" in pack
    assert "--gres" not in pack and "HF_HUB_OFFLINE" not in pack and "--kill-on-invalid-dep" not in pack
    assert "hf download google/gemma-2b" in (root / "fetch.sbatch").read_text()
    tasks = load_params(notebook, "paper-gemma-2b").tasks  # lm-eval's built-in tasks, cached for the offline jobs
    assert f"download_tasks({json.dumps(list(tasks))})'\n" in (root / "fetch.sbatch").read_text() and tasks
    for name in names[1:]:
        assert "#SBATCH --kill-on-invalid-dep=yes\n" in (root / name).read_text()
    for name in names:
        script = (root / name).read_text()
        assert f"source {sweep.REPO}/.venv/bin/activate\n" in script and "#SBATCH --time=" in script
        assert ("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in script) == (name not in names[:2])
    for i in range(waves):
        wave = (root / f"wave{i}.sbatch").read_text()
        assert "#SBATCH --time=1-00:00:00\n" in wave  # 7153 steps on 8 GPUs: days, so the 24 h cap; requeue goes on
        assert "#SBATCH --requeue\n" in wave and "#SBATCH --signal=B:USR1@900\n" in wave
        assert "trap 'warned=1; forward' USR1" in wave and 'pkill -USR1 -P "$pid"' in wave
        assert 'scontrol requeue "$SLURM_JOB_ID"' in wave
    collect = (root / "collect.sbatch").read_text()
    assert ("#SBATCH --gres=gpu:1\n" in collect) == (notebook == "05_throughput")  # 05's notebook serves on a GPU


def test_05_served_models_are_ordinary_runs_of_the_sweep(tmp_path):
    """05's plan is 04's App. M runs per (B, r): the KD teacher, Table 12's final models, then the early-exit runs
    that post-train them."""
    study = load_params("05_throughput", "paper-gemma-2b", runs_root=str(tmp_path / "runs"))
    teacher, second, third = sweep.waves(study.runs())
    assert [r.name for r in teacher] == ["full-size"]
    assert [r.config.lora_rank for r in second] == [0, 64, 128, 256, 512] * 2 == [r.config.lora_rank for r in third]
    assert all(r.config.kd == "fkl" and r.needs == ("full-size",) for r in second)
    assert all(r.config.objective == "early_exit" and r.needs for r in third)
    assert {r.dir for pair in study.served().values() for r in pair} | {teacher[0].dir} == {r.dir for r in study.runs()}


def test_slurm_parameters_are_checked():
    with pytest.raises(ValueError, match=r"max_time='24h' is not a SLURM time \[D-\]HH:MM:SS"):
        sweep.Slurm(max_time="24h")
    with pytest.raises(ValueError, match="grace_seconds=7200 must be shorter than max_time=01:00:00"):
        sweep.Slurm(max_time="01:00:00", grace_seconds=7200)


def test_the_local_backend_runs_the_same_commands_packing_first(tmp_path):
    ran = []
    commands = sweep.run_plan_locally("03_distillation", "paper-gemma-2b", shell=ran.append,
                                      runs_root=str(tmp_path / "runs"))
    assert ran == commands and ran[0] == ".venv/bin/python -m rrt pack 03_distillation paper-gemma-2b"
    assert len(ran) == 1 + 25 and all("-m rrt.runs " in c for c in ran[1:])  # Table 11's 15 runs, Table 12's 10


def test_a_read_only_study_names_the_missing_runs_and_trains_nothing(tmp_path):
    """The collect job's notebook: a run not done stops run_plan (and 05's served models) before any compute."""
    study = load_params("03_distillation", "smoke", runs_root=str(tmp_path), read_only=True)
    with pytest.raises(RuntimeError, match=r"read_only: 8 of 8 runs are not evaluated.*'full-size' \(not trained"):
        run_plan(study, original=None, tokenizer=None, data=None, run_dir=tmp_path / "nb")
    served = load_params("05_throughput", "smoke", runs_root=str(tmp_path), read_only=True)
    with pytest.raises(RuntimeError, match=r"read_only: 3 of 3 runs are not trained.*'full-size' \(not trained"
                                           r".*'average B=2 r=4 fkl 3 steps'"):
        served_models(served, original=None, tokenizer=None)
    assert not list(tmp_path.rglob("checkpoints")) and not (tmp_path / "nb").exists()


def _fabricate(tmp_path):
    """01 at smoke scale, swept, with its seven runs left in six states by hand."""
    sweep.write_plan_jobs("01_init_ablation", "smoke", tmp_path, runs_root=str(tmp_path / "runs"))
    root = sweep.sweep_root("01_init_ablation", "smoke", tmp_path)
    study = load_params("01_init_ablation", "smoke", runs_root=str(tmp_path / "runs"))
    runs = {r.name: r for r in study.runs()}

    def checkpoint(run, step):
        (run.dir / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (run.dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors").write_bytes(b"")
    for name in ("full-size", "stepwise B=2"):  # done; trained, not evaluated
        checkpoint(runs[name], runs[name].config.steps)
    write_json(_results_path(runs["full-size"], study.eval_spec()), {"summary": {}})
    (runs["random B=2"].dir / "run.lock").write_text("pid 4242 on node7")  # running
    checkpoint(runs["stepwise B=2 seed=1"], 1)  # interrupted at step 1 (requeued: its job said 75)
    (root / "exit").mkdir()
    (root / "exit" / runs["stepwise B=2 seed=1"].dir.name).write_text("75\n")
    (root / "exit" / runs["reduced-size B=2"].dir.name).write_text("1\n")  # failed
    log = root / f"slurm-w0-77_{list(runs).index('reduced-size B=2')}.out"
    log.write_text("Traceback ...\n")
    return root, log


def test_sweep_status_reports_each_state(tmp_path):
    root, log = _fabricate(tmp_path)
    rows = {r["run"]: r for r in sweep.plan_status("01_init_ablation", "smoke", tmp_path)}
    steps = load_params("01_init_ablation", "smoke").steps
    assert {name: (r["state"], r["step"]) for name, r in rows.items()} == {
        "full-size": ("done", steps), "stepwise B=2": ("trained-not-evaluated", steps),
        "random B=2": ("running (lock held: pid 4242 on node7)", None),
        "stepwise B=2 seed=1": ("interrupted at step 1", 1), "reduced-size B=2": ("failed (exit 1)", None),
        "stepwise_start B=2": ("not started", None), "average B=2 norm=zero": ("not started", None)}
    assert rows["reduced-size B=2"]["log"] == str(log) and rows["stepwise_start B=2"]["log"] == "-"


def test_sweep_status_check_fails_naming_the_runs_not_done(tmp_path, capsys):
    _, log = _fabricate(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep-status", "01_init_ablation", "smoke", "--out-root", str(tmp_path), "--check"])
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert "1 of 7 runs done" in out and "interrupted at step 1" in out
    assert "reduced-size B=2" in err and str(log) in err and "full-size," not in err


FAKE_WORKER = """#!/bin/bash
# a training process: on SIGUSR1 it ends its step, writes a checkpoint and exits 75
trap 'echo USR1 >> "$FAKE_LOG"; echo checkpoint >> "$FAKE_LOG"; exit 75' USR1
echo started >> "$FAKE_LOG"
for _ in $(seq 600); do sleep 0.05; done  # never left behind for long, even when the test fails
exit 3
"""
# torch's elastic agent: its workers are its children; SIGUSR1 has no handler there and kills it
FAKE_LAUNCHER = """#!/bin/bash
"$FAKE_BIN/python" & child=$!
wait $child
exit 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["smoke", "paper-gemma-2b"])
def test_the_wave_trap_forwards_the_warning_and_requeues(tmp_path, scale):
    """The generated wave script run by bash on a fake training command: SLURM's USR1 reaches the training process
    (under a launcher: its worker, not the launcher) and the job requeues itself with scontrol."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in {"python": FAKE_WORKER, "accelerate": FAKE_LAUNCHER,
                       "scontrol": '#!/bin/bash\necho "$@" >> "$FAKE_LOG.scontrol"\n'}.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    slurm = sweep.Slurm(env=f'export PATH="{bin_}:$PATH"')
    sweep.write_plan_jobs("03_distillation", scale, tmp_path, slurm=slurm, runs_root=str(tmp_path / "runs"))
    script = sweep.sweep_root("03_distillation", scale, tmp_path) / "wave0.sbatch"
    assert ("launcher=1" in script.read_text()) == (scale != "smoke")
    log = tmp_path / "fake.log"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_BIN": str(bin_), "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_JOB_ID": "4242"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (log.exists() and "started" in log.read_text()):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out = job.communicate(timeout=60)[0]
    assert job.returncode == 0, out
    assert log.read_text().splitlines() == ["started", "USR1", "checkpoint"]
    assert Path(f"{log}.scontrol").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in out


def test_plan_waves_put_every_run_after_what_it_reads():
    from rrt.plans import Distillation
    runs = Distillation(model="tiny-llama").runs()
    first, second = sweep.waves(runs)
    assert [r.name for r in first if r.name == "full-size"] == ["full-size"]
    assert all(not r.needs for r in first) and all(set(r.needs) <= {f.name for f in first} for r in second)
    assert {r.name for r in second if not r.config.kd} == {"full-size 90+15 steps"}  # the 75B, from the 60B


@pytest.mark.parametrize("tok_name", ["char_tok", "bos_tok"])
def test_05_reads_its_hub_text_from_packed_sets_as_packing_would_give_it(tok_name, request):
    """Offline 05: calibration text re-cut from a packed set equals packing the corpus at 128 itself, and each
    request is a window of one document of that corpus (consecutive windows of prompt + output tokens)."""
    tok = request.getfixturevalue(tok_name)
    packed = load_packed("wikitext2", "test", tokenizer=tok, seq_len=512)  # every document
    stream = packed_stream(packed, tok)
    assert repack(stream, tok) == heldout_text(tok, "wikitext2/test", vocab_size=99)
    workload = PackedWorkload(stream, tok, corpus="wikitext2", split="test", num_requests=5, prefix_len=12,
                              decode_len=7, seed=3)
    samples = workload.samples(tok, 99)
    docs = tok(list(load_corpus("wikitext2", "test")["text"]), add_special_tokens=False)["input_ids"]
    head = [tok.bos_token_id] if tok_name == "bos_tok" else []
    assert len({s.source for s in samples}) == 5 and all(len(s.prompt) == 12 for s in samples)
    for s in samples:
        text = s.prompt[len(head):] + s.continuation
        assert s.prompt[:len(head)] == head and len(s.continuation) == 7
        assert any(doc[i:i + len(text)] == text for doc in docs for i in range(0, len(doc), 12 - len(head) + 7))
    assert dataclasses.asdict(workload) == dataclasses.asdict(Workload(
        corpus="wikitext2", split="test", num_requests=5, prefix_len=12, decode_len=7, seed=3))  # settings stay small


def test_the_sweep_parameters_reach_every_job(tmp_path):
    """--env, --partition and --max-time as written; --time is the plan's hours × the factor + setup, rounded up."""
    slurm = sweep.Slurm(env="conda activate rrt", partition="gpu", max_time="2-00:00:00", time_factor=2.0,
                        setup_minutes=30)
    submit = sweep.write_plan_jobs("03_distillation", "paper-gemma-2b", tmp_path, slurm=slurm,
                                   runs_root=str(tmp_path / "runs"))
    for script in submit.parent.glob("*.sbatch"):
        text = script.read_text()
        assert "\nconda activate rrt\n" in text and ".venv" not in text and "#SBATCH --partition=gpu\n" in text
    assert "#SBATCH --time=2-00:00:00\n" in (submit.parent / "wave0.sbatch").read_text()  # capped
    sweep.write_plan_jobs("03_distillation", "smoke", tmp_path, slurm=slurm, runs_root=str(tmp_path / "runs"))
    study = load_params("03_distillation", "smoke", runs_root=str(tmp_path / "runs"))
    table = plan_table(study.runs())
    wave0 = [r.dir.name for r in sweep.waves(study.runs())[0]]
    minutes = math.ceil(table[table.run_dir.isin(wave0)].h100_hours.max() * 60 * 2.0 + 30)
    assert f"#SBATCH --time=0-00:{minutes:02d}:00\n" in (sweep.sweep_root("03_distillation", "smoke", tmp_path)
                                                          / "wave0.sbatch").read_text()


def test_05_on_hub_data_reads_only_what_make_pack_packs():
    with pytest.raises(ValueError, match=r"corpora: 'wikitext2/test' with data_source='hub' is read from the held-out "
                                         r"sets .*\['slimpajama/test', 'redpajama/sample', 'pg19/test'\]"):
        load_params("05_throughput", "paper-gemma-2b", corpora=["slimpajama/test", "wikitext2/test"])
