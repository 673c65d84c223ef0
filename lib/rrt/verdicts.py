"""Whether our numbers reproduce a paper's claim: "yes", "no" or "within noise", from a difference and its error.

A claim compares two arms (the one the paper found better, and the other). Ours reproduces it when our
difference has the paper's sign and exceeds `k` times its error; it contradicts it when the difference has the
other sign beyond that; anything smaller is within noise. Perplexity is compared in logs (lower is better),
accuracy and throughput as they are or in logs (higher is better). The error of a difference is the two arms'
errors added in quadrature (lm-eval's stderr, or the spread over seeds or repeats).
"""
from __future__ import annotations

import math

YES, NO, NOISE = "yes", "no", "within noise"
K = 2.0  # errors a difference must exceed: about 95% for a normal stderr


def combined_error(*errors: float) -> float:
    """Return the error of a difference (or sum) of independent values: the errors added in quadrature."""
    return math.sqrt(sum(e * e for e in errors))


def pooled_stderr(errors) -> float:
    """Return the standard error of a mean of independent values (a mean over tasks): √(Σ error²) / n."""
    errors = [float(e) for e in errors]
    return combined_error(*errors) / len(errors)


def better(ours_better: float, ours_worse: float, *, error: float, higher_is_better: bool, k: float = K) -> str:
    """Return yes / no / within noise for "the first arm beats the second" (the paper's finding), ours at `error`."""
    _check(ours_better, ours_worse, error)
    gain = (ours_better - ours_worse) * (1 if higher_is_better else -1)
    if gain > k * error:
        return YES
    if gain < -k * error:
        return NO
    return NOISE


def not_worse(ours_new: float, ours_old: float, *, error: float, higher_is_better: bool, k: float = K) -> str:
    """Return yes / no for "the first arm keeps the second's level" (better or within noise counts as kept)."""
    return NO if better(ours_old, ours_new, error=error, higher_is_better=higher_is_better, k=k) == YES else YES


def same(ours_a: float, ours_b: float, *, error: float, k: float = K) -> str:
    """Return yes / no for "the two arms do not differ" (the paper's "no difference"): yes within `k` errors."""
    _check(ours_a, ours_b, error)
    return YES if abs(ours_a - ours_b) <= k * error else NO


def combine(verdicts: list[str]) -> str:
    """Return one verdict for a claim tested several ways (held-out sets, loops, arms): yes when every test says
    yes, no when any says no, else within noise."""
    if not verdicts:
        raise ValueError("combine() needs at least one verdict")
    unknown = sorted(set(verdicts) - {YES, NO, NOISE})
    if unknown:
        raise ValueError(f"unknown verdicts {unknown}; valid: {[YES, NO, NOISE]}")
    if all(v == YES for v in verdicts):
        return YES
    return NO if NO in verdicts else NOISE


def _check(a: float, b: float, error: float) -> None:
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"a verdict needs finite values, got {a} and {b}")
    if not (math.isfinite(error) and error >= 0):
        raise ValueError(f"a verdict needs a finite error >= 0, got {error}")
