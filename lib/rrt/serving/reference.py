"""The sequential reference the engine must match (DESIGN invariant 9): one request, one token at a time.

Each step recomputes the whole prefix with the model's own HF forward (`exits.loop_outputs`) and walks
the latest token's loops in order, asking the exit policy after each; the first exit emits that
loop's argmax. Full recomputation runs every earlier token through every loop, which is exactly
what state propagation gives the engine's cache (exited tokens still run their remaining loops),
so this is the per-request "exit, then propagate" reference, computed independently of the
engine's ragged attention and KV pool. Quadratic in length: for tests only.
"""
from __future__ import annotations

import torch

from rrt.exits import NoExit, loop_outputs


@torch.no_grad()
def reference_generate(model, prompt: list[int], max_new_tokens: int, *, exit_policy=None,
                       request_id=0, eos_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """Return (generated token ids, exit loop of each) for one request, greedy, token by token."""
    policy = exit_policy if exit_policy is not None else NoExit()
    tokens, exits = list(prompt), []
    while len(exits) < max_new_tokens:
        outputs = loop_outputs(model, tokens)
        last = torch.tensor([len(tokens) - 1], device=model.device)
        for out in outputs:
            if out.loop == len(outputs) - 1 or out.exit_mask(policy, last, [(request_id, len(tokens) - 1)])[0]:
                tokens.append(int(out.logits[-1].argmax(-1)))
                exits.append(out.loop)
                break
        if tokens[-1] == eos_token_id:
            break
    return tokens[len(prompt):], exits
