"""Accuracy and perplexity as served: every score comes from the CDB engine's own forward (§2.4, §3.8).

Each (context, continuation) pair is one teacher-forced engine request (`Request.forced`): the
context is the prompt, the continuation is emitted instead of the argmax, and each continuation
token is scored by the logits of the loop its exit policy left at. Under a copy KV policy a token
that exited early leaves approximate keys at the depths it skipped, and every later token attends
to them: that cost is exactly what these scores measure. With `exit_policy="none"` and
`kv_policy="propagate"` they equal the full model's teacher-forced scores.

- `serve_forced`: per pair, what the engine served (`Served`: log-probs, argmax flags, exit loops).
- `served_loglikelihood`: lm-eval's (sum of log-probs, all greedy) per pair.
- `served_perplexity`: token-weighted perplexity, counted as `rrt.evaluation.perplexity` counts it.
- `EngineLM` / `served_few_shot`: lm-eval tasks scored through the engine.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from lm_eval.models.huggingface import HFLM

from rrt import evaluation
from rrt.exits import POLICIES, SCORED_POLICIES, NoExit, OracleExit, record_oracle_trajectories
from rrt.serving.engine import KV_POLICIES, Engine, Request
from rrt.spec import check_choice

EXIT_POLICY_NAMES = tuple(p for p in POLICIES if p not in SCORED_POLICIES)  # by name: those with no threshold


@dataclass(frozen=True)
class Served:
    """One forced request as the engine served it, per continuation token: its log-prob under the logits
    of its exit loop, whether it was their argmax, and that exit loop (0-based)."""
    logprobs: list[float]
    greedy: list[bool]
    exit_loops: list[int]


def served_loglikelihood(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, exit_policy="none",
                         kv_policy: str = "propagate", max_active: int = 8,
                         token_budget: int = 64) -> list[tuple[float, bool]]:
    """Returns, per (context, continuation) pair in order, lm-eval's (summed log-prob, every token greedy) as served.

    See `serve_forced` for the arguments.
    """
    served = serve_forced(model, pairs, exit_policy=exit_policy, kv_policy=kv_policy, max_active=max_active,
                          token_budget=token_budget)
    return [(sum(s.logprobs), all(s.greedy)) for s in served]


def served_perplexity(model, sequences, *, exit_policy="none", kv_policy: str = "propagate", max_active: int = 8,
                      token_budget: int = 64) -> dict:
    """Returns {"nll" (summed, nats), "tokens", "mean_nll", "perplexity", "mean_exit_loop"} of `sequences` as served.

    Each sequence (a Dataset of `input_ids`, a [n_seqs, seq_len] tensor, or lists of ids of any lengths
    >= 2) is one request: prompt = its first token, forced = the rest. So every token but the first is
    scored once, as `rrt.evaluation.perplexity` (without `stride`) scores it: a BOS first token is
    context only. Token-weighted over all sequences; mean_exit_loop is 0-based.
    """
    seqs = _as_sequences(sequences)
    served = serve_forced(model, [(s[:1], s[1:]) for s in seqs], exit_policy=exit_policy, kv_policy=kv_policy,
                          max_active=max_active, token_budget=token_budget)
    nll = -sum(sum(s.logprobs) for s in served)
    tokens = sum(len(s.logprobs) for s in served)
    return {"nll": nll, "tokens": tokens, "mean_nll": nll / tokens, "perplexity": math.exp(nll / tokens),
            "mean_exit_loop": sum(sum(s.exit_loops) for s in served) / tokens}


def serve_forced(model, pairs, *, exit_policy="none", kv_policy: str = "propagate", max_active: int = 8,
                 token_budget: int = 64) -> list[Served]:
    """Returns, per (context, continuation) pair in order, what the engine served for it (`Served`).

    One forced request per pair, request_id = the pair's index, all in one engine run (batched
    depth-wise, `max_active` at a time, `token_budget` items per step).
    exit_policy: "none" (every token runs all loops), "oracle" (trajectories recorded teacher-forced
    on context + continuation, §3.8), or a policy object from `rrt.exits` (an `OracleExit` must key its
    trajectories by pair index). kv_policy: one of `rrt.serving.engine.KV_POLICIES`.
    """
    pairs = _check_pairs(pairs)
    _check_policies(exit_policy, kv_policy)
    if exit_policy == "oracle":
        exit_policy = OracleExit(dict(enumerate(record_oracle_trajectories(model, [c + x for c, x in pairs]))))
    elif exit_policy == "none":
        exit_policy = NoExit()
    engine = Engine(model, token_budget=token_budget, exit_policy=exit_policy, max_active=max_active,
                    max_seq_len=max(len(c) + len(x) for c, x in pairs), kv_policy=kv_policy)
    engine.run([Request(c, len(x), request_id=i, forced=x) for i, (c, x) in enumerate(pairs)])
    if engine.failed:
        raise RuntimeError(f"the engine failed {len(engine.failed)} of {len(pairs)} scoring requests: "
                           f"{dict(list(engine.failed.items())[:3])}")
    return [Served(logprobs=[lp for lp, _ in engine.logprobs[i]], greedy=[g for _, g in engine.logprobs[i]],
                   exit_loops=list(engine.exit_loops[i])) for i in range(len(pairs))]


def served_few_shot(model, tokenizer, *, tasks=tuple(evaluation.TASKS), limit=None, exit_policy="none",
                    kv_policy: str = "propagate", max_active: int = 8, token_budget: int = 64, source="embedded",
                    num_fewshot=None, model_name="model", seed=1234) -> pd.DataFrame:
    """Returns `rrt.evaluation.few_shot`'s DataFrame scored by the engine, plus exit_policy, kv_policy, mean_exit_loop.

    One row per task; mean_exit_loop (0-based) is over every continuation token the engine scored for
    that task. exit_policy is labelled by name ("none", "oracle", "max_prob(0.9)", ...).
    """
    evaluation._check_task_args(tasks=tasks, source=source, limit=limit)  # all tasks, before the first runs
    _check_policies(exit_policy, kv_policy)
    rows = []
    for task in tasks:  # one task per lm-eval run, so each row's mean_exit_loop is its own
        with evaluation.quiet_lm_eval():  # HFLM warns on every in-memory model
            lm = EngineLM(model, tokenizer, exit_policy=exit_policy, kv_policy=kv_policy, max_active=max_active,
                          token_budget=token_budget)
        row, = evaluation.few_shot_rows(lm, tasks=[task], limit=limit, source=source, num_fewshot=num_fewshot,
                                        seed=seed, model_name=model_name)
        rows.append(row | {"exit_policy": _policy_label(exit_policy), "kv_policy": kv_policy,
                           "mean_exit_loop": lm.mean_exit_loop})
    return pd.DataFrame(rows)


class EngineLM(HFLM):
    """lm-eval's HFLM whose log-likelihoods are served by the engine (`serve_forced`) under an exit and KV policy.

    Everything else is HFLM's: tokenisation (`_encode_pair` moves the context's trailing whitespace
    into the continuation; an empty context becomes the prefix/BOS token), left truncation to
    `max_length`, rolling windows for `loglikelihood_rolling`. Only `_loglikelihood_tokens` changes.
    `exit_loops_served` / `tokens_served` tally every scored continuation token.
    """

    def __init__(self, model, tokenizer, *, exit_policy="none", kv_policy: str = "propagate", max_active: int = 8,
                 token_budget: int = 64, batch_size: int = 64):
        _check_policies(exit_policy, kv_policy)
        if isinstance(exit_policy, OracleExit):
            raise ValueError("EngineLM needs exit_policy='oracle' (recorded per scored pair): an OracleExit's "
                             "trajectories cannot be keyed by lm-eval's requests")
        # batch_size: only how many rolling windows go into one engine run
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.exit_policy, self.kv_policy = exit_policy, kv_policy
        self.max_active, self.token_budget = max_active, token_budget
        self.exit_loops_served, self.tokens_served = 0, 0

    @property
    def mean_exit_loop(self) -> float:
        return self.exit_loops_served / self.tokens_served if self.tokens_served else float("nan")

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        if not requests:
            return []
        pairs = [self._truncate(context, continuation) for _, context, continuation in requests]
        served = serve_forced(self.model, pairs, exit_policy=self.exit_policy, kv_policy=self.kv_policy,
                              max_active=self.max_active, token_budget=self.token_budget)
        out = []
        for (request_str, _, _), s in zip(requests, served):
            self.exit_loops_served += sum(s.exit_loops)
            self.tokens_served += len(s.exit_loops)
            answer = (sum(s.logprobs), all(s.greedy))
            if request_str is not None:  # rolling windows have no key; HFLM caches them per document
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
            out.append(answer)
        return out

    def _truncate(self, context, continuation):
        """HFLM's left truncation: the model sees the last max_length + 1 tokens of context + continuation."""
        if len(continuation) > self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
        whole = (list(context) + list(continuation))[-(self.max_length + 1):]
        return whole[:-len(continuation)], list(continuation)

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError("EngineLM serves log-likelihoods only (multiple-choice and perplexity tasks); "
                                  "generate_until tasks are not scored through the engine: use rrt.evaluation.few_shot")


def _check_pairs(pairs) -> list[tuple[list[int], list[int]]]:
    """Returns the pairs as lists of ints; raises ValueError for none, or an empty context or continuation."""
    out = [(_ids(c), _ids(x)) for c, x in pairs]
    if not out:
        raise ValueError("pairs must hold at least one (context, continuation) pair, got none")
    for i, (c, x) in enumerate(out):
        if not c or not x:
            raise ValueError(f"pair {i}: context and continuation must both be non-empty token ids, got "
                             f"{len(c)} and {len(x)} tokens (lm-eval puts a BOS/prefix token before an empty context)")
    return out


def _check_policies(exit_policy, kv_policy) -> None:
    if isinstance(exit_policy, str) and exit_policy not in EXIT_POLICY_NAMES or \
            not isinstance(exit_policy, str) and not hasattr(exit_policy, "exit_mask"):
        raise ValueError(f"exit_policy must be one of {list(EXIT_POLICY_NAMES)} or a policy from rrt.exits, "
                         f"got {exit_policy!r}")
    check_choice("kv_policy", kv_policy, KV_POLICIES)


def _ids(seq) -> list[int]:
    return seq.tolist() if torch.is_tensor(seq) else [int(t) for t in seq]


def _as_sequences(sequences) -> list[list[int]]:
    """Returns the sequences as lists of ids (Dataset of input_ids, 2-D tensor, or lists), each >= 2 tokens."""
    rows = sequences["input_ids"] if hasattr(sequences, "column_names") else sequences
    seqs = [_ids(s) for s in rows]
    if not seqs or min(len(s) for s in seqs) < 2:
        raise ValueError(f"sequences must be >= 1 sequences of >= 2 token ids, got lengths "
                         f"{[len(s) for s in seqs][:5]}")
    return seqs


def _policy_label(exit_policy) -> str:
    """Returns the exit policy's name for a results row: "none", "oracle", "max_prob(0.9)", ..."""
    if isinstance(exit_policy, str):
        return exit_policy
    if isinstance(exit_policy, NoExit):
        return "none"
    if isinstance(exit_policy, OracleExit):
        return "oracle"
    kind = getattr(exit_policy, "kind", type(exit_policy).__name__)
    threshold = getattr(exit_policy, "threshold", None)
    return kind if threshold is None else f"{kind}({threshold:g})"
