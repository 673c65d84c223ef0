"""The serving workload (rrt.serving.workload): App. N requests from held-out text, replayed exits, arrivals, metrics."""
import pytest
import torch

import rrt
from rrt.exits import record_oracle_trajectories
from rrt.serving.workload import (Sample, corpus_samples, latency_metrics, mean_loops, poisson_arrivals,
                                  replay_trajectories, requests_from)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_samples_are_the_documents_own_text_and_lengths_follow_it(char_tok):
    # wikitext2/test has 62 articles, one of them only ~100 characters: with decode_len past most
    # articles' lengths, continuations end where their documents do.
    samples = corpus_samples(char_tok, "wikitext2", "test", num_requests=62, prefix_len=32, decode_len=2000)
    docs = rrt.data.load_corpus("wikitext2", "test")["text"]
    assert len({s.source for s in samples}) == 62
    for s in samples:
        row = int(s.source.removeprefix("wikitext2/test[").removesuffix("]"))
        doc = char_tok(docs[row], add_special_tokens=False)["input_ids"]
        assert len(s.prompt) == 32 and 1 <= len(s.continuation) <= 2000
        assert s.prompt + s.continuation == doc[:32 + 2000]
    lengths = {len(s.continuation) for s in samples}
    assert len(lengths) > 2 and min(lengths) < 2000 and max(lengths) == 2000


def test_prompt_starts_with_the_tokenizers_bos_and_counts_it(bos_tok, char_tok):
    kw = dict(num_requests=5, prefix_len=16, decode_len=8)
    with_bos = corpus_samples(bos_tok, "wikitext2", "test", **kw)
    plain = corpus_samples(char_tok, "wikitext2", "test", **kw)
    for b, p in zip(with_bos, plain):
        assert len(b.prompt) == 16 and b.prompt[0] == bos_tok.bos_token_id
        assert b.prompt[1:] + b.continuation == (p.prompt + p.continuation)[:15 + 8]


def test_samples_are_deterministic_by_seed_and_differ_across_seeds(char_tok):
    kw = dict(num_requests=8, prefix_len=16, decode_len=24)
    first = corpus_samples(char_tok, "wikitext2", "validation", seed=1, **kw)
    assert corpus_samples(char_tok, "wikitext2", "validation", seed=1, **kw) == first
    other = corpus_samples(char_tok, "wikitext2", "validation", seed=2, **kw)
    assert [s.source for s in other] != [s.source for s in first]


def test_documents_too_short_are_skipped(char_tok):
    # prefix 200 + at least 150 tokens: the ~100-character article can never qualify.
    kw = dict(prefix_len=200, decode_len=300, min_continuation=150)
    samples = corpus_samples(char_tok, "wikitext2", "test", num_requests=61, **kw)
    assert all(len(s.continuation) >= 150 for s in samples)
    with pytest.raises(ValueError, match=r"corpus 'wikitext2'.*only 61 of 62 documents.*num_requests=62"):
        corpus_samples(char_tok, "wikitext2", "test", num_requests=62, **kw)


def test_too_few_documents_names_the_corpus(char_tok):
    with pytest.raises(ValueError, match=r"corpus 'tinyshakespeare'.*only 1 of 1 documents.*num_requests=2"):
        corpus_samples(char_tok, "tinyshakespeare", "test", num_requests=2, prefix_len=8, decode_len=8)


@pytest.mark.parametrize("bad", [dict(prefix_len=0), dict(decode_len=0), dict(min_continuation=9),
                                 dict(num_requests=0)])
def test_bad_lengths_are_refused(char_tok, bad):
    kw = dict(num_requests=2, prefix_len=8, decode_len=8) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        corpus_samples(char_tok, "wikitext2", "test", **kw)


@pytest.fixture(scope="module")
def rec_and_samples(char_tok):
    model, _ = rrt.load_model("tiny-llama")
    rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=2))
    samples = corpus_samples(char_tok, "wikitext2", "test", num_requests=4, prefix_len=16, decode_len=24)
    return rec, samples


def test_replay_is_the_oracle_trajectory_at_the_positions_predicting_the_continuation(rec_and_samples):
    rec, samples = rec_and_samples
    replay = replay_trajectories(rec, samples)
    full = record_oracle_trajectories(rec, [s.prompt + s.continuation for s in samples])
    for s, r, f in zip(samples, replay, full):
        assert len(r) == len(s.continuation)
        assert r == f[len(s.prompt) - 1:-1].tolist()  # position p predicts token p + 1
        assert all(0 <= b < 2 for b in r)
    tokens = [b for r in replay for b in r]
    assert mean_loops(replay) == pytest.approx(sum(b + 1 for b in tokens) / len(tokens))


def test_mean_loops_counts_exit_loop_plus_one():
    assert mean_loops([[0, 1], [2]]) == pytest.approx((1 + 2 + 3) / 3)
    with pytest.raises(ValueError, match="at least one token"):
        mean_loops([[], []])


def test_poisson_arrivals_start_at_zero_increase_and_have_mean_gap_one_over_rate():
    arrivals = poisson_arrivals(2000, 4.0, seed=3)
    gaps = torch.diff(torch.tensor(arrivals, dtype=torch.float64))
    assert arrivals[0] == 0.0 and len(arrivals) == 2000 and (gaps > 0).all()
    # The mean of 1999 exponential gaps has standard error (1/rate)/sqrt(1999) ≈ 2.2%: 10% is > 4 sigma.
    assert gaps.mean().item() == pytest.approx(1 / 4.0, rel=0.10)
    assert poisson_arrivals(2000, 4.0, seed=3) == arrivals != poisson_arrivals(2000, 4.0, seed=4)
    assert poisson_arrivals(1, 4.0) == [0.0] and poisson_arrivals(0, 4.0) == []
    with pytest.raises(ValueError, match="rate_per_s=0"):
        poisson_arrivals(10, 0)


def test_latency_metrics_on_a_hand_computed_example():
    arrived = {"a": 0.0, "b": 1.0, "c": 2.0}
    first_token = {"a": 0.5, "b": 2.0, "c": 2.25}
    finished = {"a": 1.5, "b": 4.0, "c": 2.25}
    num_tokens = {"a": 5, "b": 3, "c": 1}
    m = latency_metrics(arrived, first_token, finished, num_tokens)
    # TTFT [0.5, 1.0, 0.25]; TPOT a: 1.0/4 = 0.25, b: 2.0/2 = 1.0 (c has one token); latency [1.5, 3.0, 0.25].
    assert m["ttft_mean_s"] == pytest.approx(1.75 / 3)
    assert m["ttft_p50_s"] == pytest.approx(0.5)
    assert m["ttft_p99_s"] == pytest.approx(0.5 + 0.98 * 0.5)  # linear interpolation between 0.5 and 1.0
    assert m["tpot_mean_s"] == pytest.approx(0.625)
    assert m["tpot_p50_s"] == pytest.approx(0.625)
    assert m["tpot_p99_s"] == pytest.approx(0.25 + 0.99 * 0.75)
    assert m["latency_p50_s"] == pytest.approx(1.5)
    assert m["latency_p99_s"] == pytest.approx(1.5 + 0.98 * 1.5)
    with pytest.raises(ValueError, match="share request ids"):
        latency_metrics(arrived, first_token, finished, {"a": 5})


def test_requests_carry_the_continuations_length_and_index():
    samples = [Sample([1, 5, 6], [7, 8], "x[0]"), Sample([1, 9], [10], "x[1]")]
    reqs = requests_from(samples)
    assert [(r.prompt, r.max_new_tokens, r.request_id) for r in reqs] == [([1, 5, 6], 2, 0), ([1, 9], 1, 1)]


def test_requests_take_arrivals_and_forcing():
    samples = [Sample([1, 5], [7, 8], "x[0]"), Sample([1, 9], [10], "x[1]")]
    reqs = requests_from(samples, arrivals=[0.0, 0.5], forced=True)
    assert [(r.arrival_s, r.forced) for r in reqs] == [(0.0, [7, 8]), (0.5, [10])]
    assert [(r.arrival_s, r.forced) for r in requests_from(samples)] == [(None, None), (None, None)]
    with pytest.raises(ValueError, match="1 arrivals for 2 samples"):
        requests_from(samples, arrivals=[0.0])
