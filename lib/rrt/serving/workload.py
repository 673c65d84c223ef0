"""The serving benchmark's workload (App. N): requests cut from held-out corpus documents.

Each request is one held-out document: its first `prefix_len` tokens are the prompt and the tokens
that follow (at most `decode_len`) are the continuation, so output lengths follow the text.
`replay_trajectories` records, teacher-forced, the oracle exit loop of every continuation token, so
an exit schedule can be replayed by position whatever the model generates (as "Continuous Depth
Batching" does). `poisson_arrivals` gives open-loop arrival times, `requests_from` turns samples into
engine `Request`s, and `latency_metrics` reduces per-request timestamps to TTFT, TPOT and latency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import datasets
import torch

from rrt.data import load_corpus, packed_bos
from rrt.exits import record_oracle_trajectories
from rrt.serving.engine import Request


@dataclass(frozen=True)
class Sample:
    """One workload request: prompt ids (BOS first when the tokenizer adds one), the text's next tokens."""
    prompt: list[int]
    continuation: list[int]
    source: str  # "corpus/split[row]": the document it was cut from


def corpus_samples(tokenizer, corpus: str, split: str, *, num_requests: int, prefix_len: int, decode_len: int,
                   source: str = "embedded", seed: int = 0, min_continuation: int = 1) -> list[Sample]:
    """Return `num_requests` samples from distinct held-out documents, shuffled by `seed` (App. N).

    A prompt is exactly prefix_len tokens: the tokenizer's BOS (`rrt.data.packed_bos`, as `pack`
    puts it) then the document's first tokens. The continuation is the next tokens, at most
    decode_len: a short document gives a short continuation. Documents with fewer than
    min_continuation tokens after the prompt are skipped.
    """
    if num_requests < 1 or decode_len < 1 or not 1 <= min_continuation <= decode_len:
        raise ValueError(f"need num_requests >= 1, decode_len >= 1 and 1 <= min_continuation <= decode_len; got "
                         f"num_requests={num_requests}, decode_len={decode_len}, min_continuation={min_continuation}")
    bos = packed_bos(tokenizer)
    head = [] if bos is None else [bos]
    body = prefix_len - len(head)  # document tokens in the prompt
    if body < 0 or prefix_len < 1:
        raise ValueError(f"prefix_len={prefix_len} must be >= {max(len(head), 1)} (the BOS counts)")
    ds = load_corpus(corpus, split, source=source).map(lambda b, rows: {"row": rows}, with_indices=True, batched=True)
    # keep_in_memory: a shuffle of the embedded corpora need not write an indices file to the cache.
    ds = (ds.shuffle(seed=seed, keep_in_memory=True) if isinstance(ds, datasets.Dataset)
          else ds.shuffle(seed=seed, buffer_size=10_000))
    samples, seen = [], 0
    for batch in ds.iter(batch_size=64):
        # Truncated: only prompt + decode_len tokens of a document are ever used (books are long).
        ids = tokenizer(batch["text"], add_special_tokens=False, truncation=True, max_length=body + decode_len,
                        verbose=False)["input_ids"]
        for row, doc in zip(batch["row"], ids):
            seen += 1
            if len(doc) >= body + min_continuation:
                samples.append(Sample(head + doc[:body], doc[body:], f"{corpus}/{split}[{row}]"))
            if len(samples) == num_requests:
                return samples
    raise ValueError(f"corpus {corpus!r} ({source}, split {split!r}): only {len(samples)} of {seen} documents have "
                     f">= {body + min_continuation} tokens (prefix_len={prefix_len} incl. BOS + "
                     f"min_continuation={min_continuation}); need num_requests={num_requests}")


def replay_trajectories(model, samples: Sequence[Sample]) -> list[list[int]]:
    """Return, per sample, the oracle exit loop (0-based) of each continuation token, teacher-forced.

    Continuation token i is predicted at position len(prompt) - 1 + i of prompt + continuation,
    so its entry is `record_oracle_trajectories` there (§3.8).
    """
    trajectories = record_oracle_trajectories(model, [s.prompt + s.continuation for s in samples])
    return [t[len(s.prompt) - 1:len(s.prompt) - 1 + len(s.continuation)].tolist()
            for s, t in zip(samples, trajectories)]


def mean_loops(trajectories: Sequence[Sequence[int]]) -> float:
    """Return E, the mean number of loops a token runs (exit loop + 1) over all tokens."""
    loops = [b + 1 for t in trajectories for b in t]
    if not loops:
        raise ValueError("mean_loops needs at least one token; every trajectory is empty")
    return sum(loops) / len(loops)


def poisson_arrivals(num_requests: int, rate_per_s: float, *, seed: int = 0) -> list[float]:
    """Return arrival times in seconds of a Poisson process at rate_per_s, the first request at 0.0."""
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s={rate_per_s!r} must be > 0 (requests per second)")
    if num_requests < 0:
        raise ValueError(f"num_requests={num_requests} must be >= 0")
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.empty(max(num_requests - 1, 0), dtype=torch.float64).exponential_(rate_per_s, generator=gen)
    return ([0.0] + torch.cumsum(gaps, 0).tolist())[:num_requests]


def latency_metrics(arrived: Mapping, first_token: Mapping, finished: Mapping, num_tokens: Mapping) -> dict[str, float]:
    """Return TTFT, TPOT and end-to-end latency statistics in seconds from per-request timestamps.

    All four mappings are keyed by request id. TTFT = first_token − arrived; TPOT = (finished −
    first_token) / (n − 1) over requests with n > 1 output tokens (nan if none); latency = finished − arrived.
    """
    ids = list(arrived)
    if not ids or any(set(ids) != set(m) for m in (first_token, finished, num_tokens)):
        raise ValueError("arrived, first_token, finished and num_tokens must be non-empty and share request ids")
    multi = [r for r in ids if num_tokens[r] > 1]
    series = {
        "ttft": [first_token[r] - arrived[r] for r in ids],
        "tpot": [(finished[r] - first_token[r]) / (num_tokens[r] - 1) for r in multi],
        "latency": [finished[r] - arrived[r] for r in ids],
    }
    return {f"{name}_{stat}_s": value for name, values in series.items() for stat, value in _stats(values).items()}


def requests_from(samples: Sequence[Sample], *, arrivals: Sequence[float] | None = None,
                  forced: bool = False) -> list[Request]:
    """Return one engine `Request` per sample: max_new_tokens = len(continuation), request_id = index.

    arrivals (seconds, e.g. `poisson_arrivals`) set `Request.arrival_s`; forced=True sets
    `Request.forced` to the continuation (teacher-forced decoding).
    """
    if arrivals is not None and len(arrivals) != len(samples):
        raise ValueError(f"{len(arrivals)} arrivals for {len(samples)} samples; need one each")
    return [Request(list(s.prompt), len(s.continuation), request_id=i,
                    arrival_s=None if arrivals is None else float(arrivals[i]),
                    forced=list(s.continuation) if forced else None)
            for i, s in enumerate(samples)]


def _stats(values: Sequence[float]) -> dict[str, float]:
    """Return mean, p50 and p99 of values (float64; all nan when there are none)."""
    if not values:
        return dict.fromkeys(("mean", "p50", "p99"), float("nan"))
    x = torch.tensor(values, dtype=torch.float64)
    p50, p99 = torch.quantile(x, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    return {"mean": x.mean().item(), "p50": p50, "p99": p99}
