"""Early-exit policies for Recursive Transformers (§2.4, §3.8): after loop b, exit a token or loop on.

A policy answers, for n tokens that just finished a loop, which of them exit now:
`policy.exit_mask(loop=[n], logits=[n, vocab], hidden=[n, hidden], prev_hidden=[n, hidden],
keys=[(request_id, position)] * n) -> bool [n]`. `hidden` is loop b's output (before the final
norm), `prev_hidden` its input (loop b−1's output, or the embeddings at loop 0). Callers always exit
at the last loop whatever the policy says. A policy's `needs_logits` says whether it reads
`logits`; when False, callers may pass None (the engine then runs the LM head on exiting rows only).

- `NoExit`: every token runs all loops.
- `OracleExit` (§3.8): exit at the first loop whose argmax equals the last loop's, read from
  trajectories recorded by `record_oracle_trajectories` on the sequences that will be generated.
- `MaxProbExit`, `MarginExit`, `CosineExit` (confidence measures of CALM, Schuster et al. 2022):
  exit once max softmax probability / top-1 minus top-2 probability / cosine between loop b's and
  loop b−1's hidden states reaches a threshold; `calibrate_threshold` picks it on held-out text.
  Cosine never exits at loop 0 (there is no previous loop to compare with).

Each policy class owns its decision (and a scored one its `score`); `POLICIES` names them all.
`loop_outputs` is the one per-loop view (hidden, its input, logits per loop of a sequence) that
calibration, oracle recording, the sequential reference and notebook 00 read; the engine asks the
same `exit_mask` of its batched rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import torch

from rrt.families import head_logits
from rrt.recursive import loop_hidden_states
from rrt.spec import check_choice


@dataclass(frozen=True)
class NoExit:
    """Run every loop (the recursive model itself)."""
    needs_logits: ClassVar[bool] = False

    def exit_mask(self, *, loop, **_):
        return torch.zeros(len(loop), dtype=torch.bool, device=loop.device)


@dataclass(frozen=True)
class OracleExit:
    """Exit at the recorded oracle loop: trajectories {request_id: exit loop per position [seq]}."""
    trajectories: Mapping = field(default_factory=dict)
    needs_logits: ClassVar[bool] = False

    def exit_mask(self, *, loop, keys, **_):
        oracle = [int(self.trajectories[rid][pos]) for rid, pos in keys]
        return torch.as_tensor(oracle, device=loop.device) <= loop

    def check_request(self, request_id, request) -> None:
        """Raise ValueError unless a trajectory for `request_id` covers its first exit decision (the engine asks
        before any compute; later positions may be cut short by a stop token, so only the first is certain)."""
        try:
            trajectory = self.trajectories[request_id]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"request {request_id!r}: the oracle exit policy has no trajectory for it; it holds "
                             f"{len(self.trajectories)} (record them with record_oracle_trajectories)") from None
        if len(trajectory) < len(request.prompt):
            raise ValueError(f"request {request_id!r}: the oracle exit policy's trajectory covers {len(trajectory)} "
                             f"positions; this request's first decision is at position {len(request.prompt) - 1}")


@dataclass(frozen=True)
class _ScoredExit:
    """Exit once the policy's own `score` reaches `threshold`; each subclass owns its score."""
    threshold: float
    kind: ClassVar[str]
    needs_logits: ClassVar[bool] = True

    @staticmethod
    def score(*, loop, logits, hidden, prev_hidden) -> torch.Tensor:
        """The confidence score [n] (higher = more confident)."""
        raise NotImplementedError

    def exit_mask(self, *, loop, logits, hidden, prev_hidden, **_):
        return self.score(loop=loop, logits=logits, hidden=hidden, prev_hidden=prev_hidden) >= self.threshold


class MaxProbExit(_ScoredExit):
    """Exit once the largest softmax probability reaches `threshold`."""
    kind = "max_prob"

    @staticmethod
    def score(*, loop, logits, hidden, prev_hidden):
        return logits.float().softmax(-1).amax(-1)


class MarginExit(_ScoredExit):
    """Exit once top-1 minus top-2 softmax probability reaches `threshold`."""
    kind = "margin"

    @staticmethod
    def score(*, loop, logits, hidden, prev_hidden):
        top2 = logits.float().softmax(-1).topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]


class CosineExit(_ScoredExit):
    """Exit once cos(hidden after loop b, hidden after loop b−1) reaches `threshold` (never at loop 0)."""
    kind = "cosine"
    needs_logits = False

    @staticmethod
    def score(*, loop, logits, hidden, prev_hidden):
        cos = torch.nn.functional.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
        return cos.masked_fill(loop == 0, float("-inf"))


# The one registry of exit policies: every other list of their names (notebook parameters, CLI choices,
# calibration) is read from it.
POLICY_CLASSES = {cls.kind: cls for cls in (MaxProbExit, MarginExit, CosineExit)}
SCORED_POLICIES = tuple(POLICY_CLASSES)  # the confidence policies, calibrated on held-out text
POLICIES = {"none": NoExit, "oracle": OracleExit, **POLICY_CLASSES}


def exit_scores(kind: str, *, loop: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor,
                prev_hidden: torch.Tensor) -> torch.Tensor:
    """Return the confidence score [n] of the scored policy `kind` (its class's `score`)."""
    check_choice("exit policy", kind, SCORED_POLICIES)
    return POLICY_CLASSES[kind].score(loop=loop, logits=logits, hidden=hidden, prev_hidden=prev_hidden)


@dataclass(frozen=True)
class LoopOutput:
    """What an exit policy sees after loop `loop` for every position of one sequence (teacher-forced)."""
    loop: int
    hidden: torch.Tensor       # [seq, hidden] loop output, before the final norm
    prev_hidden: torch.Tensor  # [seq, hidden] its input: the previous loop's output, or the embeddings
    logits: torch.Tensor       # [seq, vocab] through the final norm + LM head (+ head LoRA at intermediate loops)

    def exit_mask(self, policy, positions: torch.Tensor, keys) -> torch.Tensor:
        """The policy's decision [n] for `positions` [n] of this loop (keys: (request_id, position) each)."""
        loop = torch.full((len(positions),), self.loop, device=self.hidden.device)
        return policy.exit_mask(loop=loop, logits=self.logits[positions], hidden=self.hidden[positions],
                                prev_hidden=self.prev_hidden[positions], keys=keys)


@torch.no_grad()
def loop_outputs(model, input_ids) -> list[LoopOutput]:
    """Return every loop's `LoopOutput` for one sequence of ids: the one per-loop view that calibration,
    oracle recording, the sequential reference and notebook 00's explorer all read."""
    ids = torch.as_tensor(list(input_ids), device=model.device)[None]
    states, embeddings = _loop_states(model, ids)
    prev = [embeddings[0]] + [h[0] for h in states[:-1]]
    return [LoopOutput(b, h[0], prev[b], head_logits(model, h, loop_idx=b)[0]) for b, h in enumerate(states)]


@torch.no_grad()
def _loop_states(model, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return (per-loop hidden states, each [batch, seq, hidden] before the final norm; embeddings)."""
    return loop_hidden_states(model, input_ids), model.get_input_embeddings()(input_ids)


@torch.no_grad()
def record_oracle_trajectories(model, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Return, per sequence, the oracle exit loop [seq] at each position (§3.8).

    Position p's oracle loop is the first loop whose argmax next-token prediction equals the last
    loop's. Record on the sequences the engine will produce (prompt + greedy output).
    """
    out = []
    for seq in sequences:
        preds = torch.stack([o.logits.argmax(-1) for o in loop_outputs(model, seq)])  # [loops, seq]
        out.append((preds == preds[-1]).int().argmax(0).cpu())  # first True (the last loop always agrees)
    return out


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and what it gave on the held-out data."""
    policy: str
    threshold: float
    agreement: float        # fraction of tokens whose exit prediction equals the last loop's
    mean_exit_loop: float   # 0-based; num_loops − 1 means no saving


@torch.no_grad()
def calibrate_threshold(model, sequences: Sequence[Sequence[int]], *, policy: str,
                        target_agreement: float = 0.95, max_candidates: int = 512) -> Calibration:
    """Return the lowest threshold whose exits agree with the last loop on >= target_agreement of tokens.

    Teacher-forced over every position of the held-out `sequences`; candidates are quantiles of the
    observed scores (at most `max_candidates`). The lowest passing threshold exits the earliest.
    """
    check_choice("exit policy", policy, SCORED_POLICIES)
    if not 0.0 <= target_agreement <= 1.0:
        raise ValueError(f"target_agreement must be in [0, 1], got {target_agreement!r}")
    scores, agree = _teacher_forced_scores(model, sequences, policy)  # [tokens, loops] each
    last = scores.shape[1] - 1
    finite = scores[:, :last][scores[:, :last].isfinite()].double()
    # none finite: the policy can never exit before the last loop (cosine at B = 2 has no loop to compare)
    candidates = (torch.quantile(finite, torch.linspace(0, 1, max_candidates, dtype=torch.double)).unique()
                  if len(finite) else finite)
    candidates = torch.cat([candidates, torch.tensor([float("inf")], dtype=torch.double)])
    for threshold in candidates.tolist():
        exit_loop = _first_exit(scores, threshold)
        agreement = agree.gather(1, exit_loop[:, None]).float().mean().item()
        if agreement >= target_agreement:
            return Calibration(policy, threshold, agreement, exit_loop.float().mean().item())
    raise AssertionError("unreachable: an infinite threshold always agrees")


def _first_exit(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return each token's exit loop [tokens]: first loop with score >= threshold, else the last."""
    passes = scores >= threshold
    passes[:, -1] = True
    return passes.int().argmax(1)


def _teacher_forced_scores(model, sequences, policy):
    """Return (scores [tokens, loops], agrees-with-last-loop [tokens, loops]) over all positions."""
    score = POLICY_CLASSES[policy].score
    all_scores, all_agree = [], []
    for seq in sequences:
        outputs = loop_outputs(model, seq)
        per_loop = [score(loop=torch.full((len(o.logits),), o.loop, device=o.logits.device), logits=o.logits,
                          hidden=o.hidden, prev_hidden=o.prev_hidden) for o in outputs]
        preds = torch.stack([o.logits.argmax(-1) for o in outputs], 1)  # [seq, loops]
        all_scores.append(torch.stack(per_loop, 1).cpu())
        all_agree.append((preds == preds[:, -1:]).cpu())
    return torch.cat(all_scores), torch.cat(all_agree)
