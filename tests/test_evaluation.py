"""Perplexity, per-loop perplexity and lm-eval few-shot accuracy (rrt.evaluation), offline only."""
import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.api.task import ConfigurableTask

import rrt
from rrt import data, evaluation
from rrt.tasks import utils as task_utils

V = 99


class FixedModel(torch.nn.Module):
    """Puts probability p on the next token of the cycle t -> t+1 mod V (p=1/V: uniform logits)."""

    def __init__(self, p):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # so the evaluator can find the device
        self.p = p

    def forward(self, input_ids):
        rest = math.log((1 - self.p) / (V - 1)) if self.p < 1 else -1e9
        logits = torch.full((*input_ids.shape, V), rest, dtype=torch.float64)
        logits.scatter_(-1, ((input_ids + 1) % V)[..., None], math.log(self.p))
        return SimpleNamespace(logits=logits)


def cycle_seqs(n_seqs, seq_len):
    return (torch.arange(n_seqs * seq_len) % V).reshape(n_seqs, seq_len)


@pytest.fixture(scope="module")
def tiny():
    return rrt.load_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_seqs(tiny):
    return data.load_packed("tinystories", "test", tokenizer=tiny[1], seq_len=33, max_seqs=12)


@pytest.fixture(scope="module")
def recursive(tiny):
    return rrt.convert(tiny[0], rrt.RecursiveSpec(num_blocks=2))


@pytest.fixture
def no_network(monkeypatch):
    """Fails any attempt to open an internet connection (hub offline variables set, too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def guard(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection attempted to {address}")
        return real_connect(sock, address, *args)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: guard(
        SimpleNamespace(family=socket.AF_INET), address))


def test_embedded_corpora_load_and_pack_without_network(tiny, no_network, tmp_path):
    for name, splits in data.corpora().items():
        for split in splits:
            assert len(data.load_corpus(name, split, cache_dir=tmp_path)) >= 1
    packed = data.load_packed("sherlock", "test", tokenizer=tiny[1], seq_len=16, max_seqs=2, cache_dir=tmp_path)
    assert len(packed) == 2


def test_uniform_logits_give_perplexity_vocab_size():
    assert evaluation.perplexity(FixedModel(1 / V), cycle_seqs(3, 17), batch_size=2) == pytest.approx(V, rel=1e-12)


@pytest.mark.parametrize("p", [0.5, 0.9, 1 / 3])
def test_next_token_probability_p_gives_perplexity_one_over_p(p):
    sequences = cycle_seqs(5, 16)
    assert evaluation.perplexity(FixedModel(p), sequences, batch_size=2) == pytest.approx(1 / p, rel=1e-12)
    assert evaluation.perplexity(FixedModel(p), sequences, batch_size=3, stride=5) == pytest.approx(1 / p, rel=1e-12)


def test_sliding_window_scores_every_token_once():
    sequences = cycle_seqs(4, 16)  # a 64-token stream
    out = evaluation.token_nll(FixedModel(0.5), sequences, batch_size=4, stride=8)
    assert out["tokens"] == 63  # windows end at 16, 24, ..., 64: 15 + 6 * 8
    assert out["nll"] == pytest.approx(63 * math.log(2), rel=1e-12)
    assert evaluation.token_nll(FixedModel(0.5), sequences, batch_size=3)["tokens"] == 4 * 15
    with pytest.raises(ValueError, match="stride=16"):
        evaluation.perplexity(FixedModel(0.5), sequences, stride=16)


def test_sliding_window_equals_overlapping_sequences(tiny, tiny_seqs):
    # stride = seq_len - 1: each window scores all its targets, windows overlap by one token
    model, seq_len = tiny[0], 33
    stream = torch.tensor(tiny_seqs["input_ids"]).reshape(-1)
    n = (len(stream) - 1) // (seq_len - 1)
    overlapping = torch.stack([stream[i * (seq_len - 1):i * (seq_len - 1) + seq_len] for i in range(n)])
    assert evaluation.perplexity(model, tiny_seqs, batch_size=5, stride=seq_len - 1) == pytest.approx(
        evaluation.perplexity(model, overlapping, batch_size=4), rel=1e-5)


def bos_seqs(n_seqs, seq_len, bos=V - 1):
    """[n_seqs, seq_len]: BOS then seq_len - 1 tokens of the cycle (which never reaches `bos` here)."""
    body = cycle_seqs(1, n_seqs * (seq_len - 1)).reshape(n_seqs, seq_len - 1) % (V - 1)
    return torch.cat([torch.full((n_seqs, 1), bos), body], dim=1)


def test_sliding_windows_start_with_bos_and_score_each_corpus_token_once():
    ids = bos_seqs(4, 16)  # 60 corpus tokens
    stream = ids[:, 1:].reshape(-1)
    windows = evaluation._windows(ids, 8, V - 1)
    assert all(len(w) == 16 and w[0] == V - 1 and (w[1:] != V - 1).all() for w, _ in windows)
    # ends at 15, 23, ..., 55: each window is BOS then the 15 stream tokens before its end
    assert [n for _, n in windows] == [15] + [8] * 5
    assert all(torch.equal(w[1:], stream[end - 15:end]) for (w, _), end in zip(windows, range(15, 56, 8)))
    scored = torch.cat([w[-n:] for w, n in windows])  # the targets each window scores, in order
    assert torch.equal(scored, stream[:55])
    assert torch.equal(windows[0][0], ids[0])
    out = evaluation.token_nll(FixedModel(0.5), ids, batch_size=4, stride=8, bos_token_id=V - 1)
    assert out["tokens"] == 55
    # off: the BOSes stay in the stream as ordinary tokens, as before
    assert evaluation.token_nll(FixedModel(0.5), ids, batch_size=4, stride=8)["tokens"] == 63
    with pytest.raises(ValueError, match="bos_token_id=1 but not every sequence starts with it"):
        evaluation.perplexity(FixedModel(0.5), ids, bos_token_id=1)


def test_sliding_window_with_bos_at_full_stride_is_the_packed_sequences(tiny):
    model, tok = tiny
    seqs = data.load_packed("tinystories", "test", tokenizer=tok, seq_len=33, max_seqs=12, bos=True)
    bos = data.packed_bos(tok, bos=True)
    assert (torch.tensor(seqs["input_ids"])[:, 0] == bos).all()
    plain = evaluation.perplexity(model, seqs, batch_size=4)
    # stride seq_len - 1 with BOS: windows are exactly the packed sequences, no overlap
    full_stride = evaluation.perplexity(model, seqs, batch_size=5, stride=32, bos_token_id=bos)
    assert full_stride == pytest.approx(plain, rel=1e-5)
    assert evaluation.perplexity(model, seqs, batch_size=4, bos_token_id=bos) == plain  # only checked without stride
    # 12 * 32 = 384 corpus tokens, every one scored: windows end at 32, 40, ..., 384
    assert evaluation.token_nll(model, seqs, stride=8, bos_token_id=bos)["tokens"] == 32 + 8 * 44


def test_token_weighted_and_batch_size_free(tiny, tiny_seqs):
    a = evaluation.perplexity(tiny[0], tiny_seqs, batch_size=1)
    assert evaluation.perplexity(tiny[0], tiny_seqs, batch_size=5) == pytest.approx(a, rel=1e-5)
    assert 1 < a < 10 * V  # a random model is about uniform


def test_per_loop_perplexity_last_loop_is_ordinary_perplexity(tiny, recursive, tiny_seqs):
    df = evaluation.per_loop_perplexity(recursive, tiny_seqs, batch_size=4)
    assert df["loop_idx"].tolist() == [0, 1]
    ordinary = evaluation.perplexity(recursive, tiny_seqs, batch_size=4)
    assert df["perplexity"].iloc[-1] == pytest.approx(ordinary, rel=1e-5)
    assert evaluation.perplexity(recursive, tiny_seqs, batch_size=4, loop_idx=1) == pytest.approx(ordinary, rel=1e-5)
    assert evaluation.perplexity(recursive, tiny_seqs, batch_size=4, loop_idx=0) == pytest.approx(
        df["perplexity"].iloc[0], rel=1e-5)
    # an ordinary model has one loop
    plain = evaluation.per_loop_perplexity(tiny[0], tiny_seqs, batch_size=4)
    assert len(plain) == 1 and plain["perplexity"].iloc[0] == pytest.approx(
        evaluation.perplexity(tiny[0], tiny_seqs), rel=1e-5)
    with pytest.raises(ValueError, match="loop_idx=2 out of range"):
        evaluation.perplexity(recursive, tiny_seqs, loop_idx=2)


def test_every_embedded_task_runs_through_lm_eval_without_network(tiny, no_network, monkeypatch):
    model, tok = tiny
    with pytest.raises(AssertionError, match="network connection attempted"):  # the guard is armed
        socket.create_connection(("huggingface.co", 443))
    logged = {}  # every task's lm-eval samples, as few_shot_rows hands them to gold_summary
    summary = evaluation.gold_summary
    monkeypatch.setattr(evaluation, "gold_summary", lambda samples, *, task: logged.setdefault(task, samples) and
                        summary(samples, task=task))
    df = evaluation.few_shot(model, tok, limit=2, batch_size=4, model_name="tiny-llama")
    assert df["task"].tolist() == list(evaluation.TASKS)
    assert df.columns.tolist() == ["model", "task", "loop_idx", "metric", "value", "stderr", "n", "num_fewshot",
                                   "source", "gold_ll", "gold_ll_stderr", "gold_margin"]
    # gold_score reads lm-eval's own samples as lm-eval scores them: the gold wins (margin > 0) where it counted
    # the example correct, and the row's gold_ll is the mean over the examples
    for row in df.itertuples():
        scores = [evaluation.gold_score(s, task=row.task) for s in logged[row.task]]
        assert row.gold_ll == pytest.approx(sum(g for g, _ in scores) / len(scores))
        assert row.gold_ll < 0 and row.gold_ll_stderr > 0
        if row.task != "lambada_openai":
            assert [m > 0 for _, m in scores] == [s[row.metric] == 1 for s in logged[row.task]]
            assert row.gold_margin == pytest.approx(sum(m for _, m in scores) / len(scores))
    assert df["metric"].tolist() == ["acc", "acc_norm", "acc_norm", "acc", "acc_norm", "acc_norm", "acc_norm"]
    assert (df["n"] == 2).all() and (df["num_fewshot"] == 0).all() and (df["source"] == "embedded").all()
    assert df["value"].between(0, 1).all() and df["stderr"].notna().all()


def test_per_loop_accuracy_last_loop_is_ordinary(tiny, recursive, no_network):
    tok = tiny[1]
    kw = dict(tasks=["winogrande"], limit=3, batch_size=4, num_fewshot=1)
    ordinary = evaluation.few_shot(recursive, tok, **kw)
    per_loop = evaluation.per_loop_few_shot(recursive, tok, **kw)
    assert per_loop["loop_idx"].tolist() == [0, 1] and (per_loop["num_fewshot"] == 1).all()
    assert per_loop["value"].iloc[1] == ordinary["value"].iloc[0]
    with pytest.raises(ValueError, match="loop_idx=2 out of range"):
        evaluation.few_shot(recursive, tok, loop_idx=2, **kw)


def test_loop_model_sees_that_loops_logits(tiny, recursive):
    # what lm-eval scores with: the wrapped model's logits call returns loop loop_idx's exit
    x = torch.tensor([[5, 17, 42, 8, 63, 21]])
    exits = rrt.loop_logits(recursive, x)
    for loop_idx in (0, 1):
        lm = evaluation._loop_lm(recursive, tiny[1], loop_idx=loop_idx, batch_size=1)
        torch.testing.assert_close(lm._model_call(x), exits[loop_idx], rtol=0, atol=0)
    assert not torch.equal(exits[0], exits[1])


def test_hub_source_runs_lm_evals_built_in_tasks_and_embedded_hellaswag_says_where_it_differs(tiny, monkeypatch):
    import lm_eval
    import lm_eval.tasks

    calls = []

    def simple_evaluate(*, tasks, task_manager, **kwargs):  # what lm-eval is asked to run, not run
        calls.append((tasks, task_manager))
        return {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.5} for t in tasks},
                "n-samples": {t: {"effective": 1} for t in tasks}, "n-shot": {t: 0 for t in tasks},
                "samples": {t: [] for t in tasks}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: kwargs)  # the arguments it was built with
    rows = evaluation.few_shot_rows(None, tasks=["hellaswag", "piqa"], limit=1, source="hub", num_fewshot=None,
                                    seed=0, model_name="m")
    assert calls[0] == (["hellaswag", "piqa"], {}) and [r["source"] for r in rows] == ["hub", "hub"]
    with pytest.warns(UserWarning, match="hellaswag \\(source='embedded'\\) may score differently .*activity_label"):
        evaluation.few_shot_rows(None, tasks=["hellaswag", "piqa"], limit=1, source="embedded", num_fewshot=None,
                                 seed=0, model_name="m")
    assert calls[1] == (["rrt_hellaswag", "rrt_piqa"],
                        {"include_path": str(evaluation.TASKS_DIR), "include_defaults": False})


def test_unknown_task_or_source_lists_the_known_ones(tiny):
    with pytest.raises(ValueError, match="known: \\['lambada_openai', 'hellaswag', .*'openbookqa'\\]"):
        evaluation.few_shot(*tiny, tasks=["mmlu"])
    with pytest.raises(ValueError, match="known: \\['embedded', 'hub'\\]"):
        evaluation.few_shot(*tiny, tasks=["piqa"], source="web")
    with pytest.raises(ValueError, match="unknown tasks \\['mmlu'\\]"):  # before lm-eval indexes or fetches
        evaluation.download_tasks(["piqa", "mmlu"])


# --- the embedded tasks build the requests of lm-eval's own built-in tasks over the same files ---
BUILT_IN = {"lambada_openai": "lambada/lambada_openai.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
            "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
            "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}
# The only changes the built-in definitions need to read the vendored files, beyond where the data is
# (evaluation.EMBEDDED_DIFFERENCES says what they cost): HellaSwag's rows lack activity_label, ctx_a and
# ctx_b, which lm-eval's process_docs reads, and no train split is vendored to draw few-shot examples from.
KNOWN_DIFFERENCES = {"hellaswag": {"process_docs": task_utils.hellaswag_process_docs, "training_split": None}}
# What else decides a task's scores: the request types, the metrics and how few-shot contexts are joined
SCORED = ("output_type", "metric_list", "target_delimiter", "fewshot_delimiter", "training_split",
          "validation_split", "test_split", "fewshot_split", "num_fewshot")


def built_in_task(task):
    """lm-eval's built-in task definition (the YAML its TaskManager indexes), reading the vendored files."""
    import lm_eval.tasks

    config = load_yaml(Path(lm_eval.tasks.__path__[0]) / BUILT_IN[task])
    files = {path.name.removesuffix(".jsonl.gz"): str(path)
             for path in sorted((task_utils.TASK_DATA_DIR / task).glob("*.jsonl.gz"))}
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
                  **KNOWN_DIFFERENCES.get(task, {}))
    return ConfigurableTask(config={k: v for k, v in config.items() if k != "tag"})


def requests(task, *, num_fewshot, limit, seed=1234):
    """Every request lm-eval would send for `task`, built as simple_evaluate builds them (few_shot's seed)."""
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=seed)
    task.build_all_requests(limit=limit)
    return [(r.doc_id, r.idx, r.request_type, r.arguments) for r in task.instances]


# zero-shot (as the paper ran them) over the first documents of the evaluated split, or all (slow: about a minute)
@pytest.mark.parametrize("zero_shot_docs", [300, pytest.param(None, marks=pytest.mark.slow)])
@pytest.mark.parametrize("task", list(evaluation.TASKS))
def test_embedded_tasks_build_the_requests_of_lm_evals_built_in_tasks(task, zero_shot_docs, no_network):
    import lm_eval.tasks

    manager = lm_eval.tasks.TaskManager(include_path=str(evaluation.TASKS_DIR), include_defaults=False)
    with evaluation.quiet_lm_eval():
        ours = manager.load(f"rrt_{task}")["tasks"][f"rrt_{task}"]
        theirs = built_in_task(task)
        # zero-shot, then 5-shot contexts drawn at the same seed for the first 40 documents
        for num_fewshot, limit in ((0, zero_shot_docs), (5, 40)):
            ours_requests, their_requests = (requests(t, num_fewshot=num_fewshot, limit=limit) for t in (ours, theirs))
            assert ours_requests and ours_requests == their_requests, (task, num_fewshot)
    assert [ours.config.to_dict().get(k) for k in SCORED] == [theirs.config.to_dict().get(k) for k in SCORED]
    # the list of differences is current: each one is a real difference from the built-in definition
    built_in = load_yaml(Path(lm_eval.tasks.__path__[0]) / BUILT_IN[task], resolve_func=False)
    ours_yaml = load_yaml(evaluation.TASKS_DIR / f"rrt_{task}.yaml", resolve_func=False)
    assert all(str(built_in.get(k)) != str(ours_yaml.get(k)) for k in KNOWN_DIFFERENCES.get(task, {}))
    assert set(KNOWN_DIFFERENCES) == set(evaluation.EMBEDDED_DIFFERENCES)


def test_hellaswag_prompt_matches_lm_eval_on_a_hand_built_hub_doc(no_network):
    import lm_eval.tasks
    from lm_eval.tasks.hellaswag import utils as official_utils
    import datasets

    # validation doc 0 as the hub stores it (Rowan/hellaswag: ctx_a, ctx_b, activity_label)
    hub = datasets.Dataset.from_list([{
        "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}])
    expected = official_utils.process_docs(hub)[0]
    ours = ConfigurableTask(config=load_yaml(evaluation.TASKS_DIR / "rrt_hellaswag.yaml"))
    doc = ours.eval_docs[0]
    assert ours.doc_to_text(doc) == expected["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert ours.doc_to_choice(doc) == expected["choices"]
    assert ours.doc_to_target(doc) == 3


def test_save_results_writes_csv_and_json_with_params(tmp_path):
    df = pd.DataFrame([{"model": "m", "task": "piqa", "loop_idx": None, "metric": "acc_norm", "value": 0.5,
                        "stderr": 0.1, "n": 4}])
    csv, js = evaluation.save_results(df, tmp_path / "out", params={"limit": 4})
    assert pd.read_csv(csv)["value"].tolist() == [0.5]
    record = json.loads(js.read_text())
    assert record["params"] == {"limit": 4} and record["rows"][0]["task"] == "piqa" and "lm_eval" in record["versions"]


# ---------------------------------------------------------------- bad arguments fail before any compute

@pytest.mark.parametrize("score", [evaluation.perplexity, evaluation.token_nll, evaluation.per_loop_perplexity])
def test_scoring_refuses_no_sequences(score):
    with pytest.raises(ValueError, match=r"sequences must be \[n_seqs >= 1, seq_len >= 2\].*got shape \(0, 32\)"):
        score(FixedModel(0.5), torch.zeros(0, 32))


@pytest.mark.parametrize("score", [evaluation.perplexity, evaluation.token_nll, evaluation.per_loop_perplexity])
@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(batch_size=-2), dict(batch_size=2.0),
                                 dict(batch_size=True), dict(stride=0), dict(stride=2.5)])
def test_scoring_refuses_a_bad_batch_size_or_stride(score, bad):
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=rf"{name} must be (None or )?an int >= 1, got {value!r}"):
        score(FixedModel(0.5), cycle_seqs(3, 8), **bad)


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=0), r"batch_size must be an int >= 1 or lm-eval's 'auto'.*got 0"),
    (dict(batch_size="big"), r"batch_size must be .*got 'big'"),
    (dict(limit=0), r"limit must be None, an int >= 1 .* or a float in \(0, 1\).*got 0"),
    (dict(limit=1.5), r"limit must be .*got 1.5"),
    (dict(limit=-3), r"limit must be .*got -3"),
])
def test_few_shot_refuses_a_bad_batch_size_or_limit(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        evaluation.few_shot(*tiny, tasks=["piqa"], **bad)


def test_quiet_lm_eval_hides_warnings_and_bars_within_the_block_only(capsys):
    import logging
    import sys
    import warnings

    from tqdm import tqdm

    parent = logging.getLogger("lm_eval")
    before = parent.level
    with evaluation.quiet_lm_eval():
        logging.getLogger("lm_eval.models.huggingface").warning("`pretrained` model kwarg is not of type `str`")
        warnings.warn("a deprecation")
        list(tqdm(range(3), desc="Running loglikelihood requests"))
    assert capsys.readouterr().err == "" and parent.level == before
    with pytest.raises(RuntimeError), evaluation.quiet_lm_eval():
        print("what lm-eval said before failing", file=sys.stderr)
        raise RuntimeError("lm-eval failed")
    assert "what lm-eval said before failing" in capsys.readouterr().err  # shown when it raises
    assert parent.level == before


def _sample(lls, *, target, continuations, doc=None):
    """A logged sample as lm-eval's evaluator writes it (log_samples=True), for a multiple-choice task."""
    return {"doc_id": 0, "doc": doc or {}, "target": target,
            "arguments": [("Question: q\nAnswer:", c) for c in continuations],
            "resps": [[(ll, False)] for ll in lls], "filtered_resps": [(ll, False) for ll in lls]}


def test_gold_score_is_the_gold_choices_loglik_and_its_margin_over_the_best_wrong_one():
    # piqa (acc_norm): per character of the choice, the space lm-eval sends before it not counted
    s = _sample([-6.0, -3.0], target=0, continuations=[" abc", " a"])
    assert evaluation.gold_score(s, task="piqa") == (-2.0, 1.0)  # -6 / 3 against -3 / 1: raw, the gold would lose
    # winogrande (acc): raw logliks, gold from doc["answer"] (its target is the shared continuation)
    s = _sample([-3.0, -5.0], target="went home", continuations=[" went home"] * 2, doc={"answer": "2"})
    assert evaluation.gold_score(s, task="winogrande") == (-5.0, -2.0)
    # a choice-text target; three choices: the margin is over the best wrong one
    s = _sample([-1.0, -4.0, -2.5], target="b", continuations=[" a", " b", " c"])
    assert evaluation.gold_score(s, task="arc_easy") == (-4.0, -3.0)
    # LAMBADA: one loglikelihood request, no wrong choices
    lambada = {"target": " word", "arguments": [("ctx", " word")], "filtered_resps": [(-7.5, True)], "doc": {}}
    g, m = evaluation.gold_score(lambada, task="lambada_openai")
    assert g == -7.5 and math.isnan(m)
    with pytest.raises(ValueError, match="gold answer 3 is not one of the 2 choices"):
        evaluation.gold_score(_sample([-1.0, -2.0], target=3, continuations=[" a", " b"]), task="piqa")


def test_gold_summary_is_the_mean_over_examples_with_its_standard_error():
    samples = [_sample([a, b], target=0, continuations=[" x", " y"]) for a, b in [(-1.0, -2.0), (-3.0, -2.0),
                                                                                    (-2.0, -2.0)]]
    out = evaluation.gold_summary(samples, task="piqa")
    assert out["gold_ll"] == pytest.approx(-2.0)
    assert out["gold_ll_stderr"] == pytest.approx(1.0 / math.sqrt(3))  # std (n-1) of -1, -3, -2 is 1
    assert out["gold_margin"] == pytest.approx((1.0 - 1.0 + 0.0) / 3)
    assert math.isnan(evaluation.gold_summary([], task="piqa")["gold_ll"])
