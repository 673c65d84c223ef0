"""Conversions without training: notebook 00's views of one conversion (sizes, SVD energy per layer,
per-loop predictions, exits) and 02's perplexity right after conversion (`init_perplexity`).

`explorer(original, tokenizer)` wires 00's views to ipywidgets for JupyterLab; under papermill the
notebook calls the same functions once with its parameters (headless).
"""
from __future__ import annotations

import itertools
import warnings

import pandas as pd
import torch
from tqdm.auto import tqdm

from rrt.evaluation import perplexity
from rrt.exits import POLICY_CLASSES, SCORED_POLICIES, exit_scores, loop_outputs
from rrt.families import decoder_layers, family_of
from rrt.recursive import convert, count_parameters
from rrt.relax import truncate_lora
from rrt.serving.engine import Engine, Request
from rrt.spec import INITS, RecursiveSpec

EXIT_POLICIES = ("none",) + SCORED_POLICIES


def convert_quietly(original, **spec) -> torch.nn.Module:
    """Return rrt.convert(original, RecursiveSpec(**spec)), rank clamping accepted silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(original, RecursiveSpec(**spec))


def parameter_table(original, rec) -> pd.DataFrame:
    """Return unique parameter counts of the original and the converted model side by side."""
    return pd.DataFrame({"original": count_parameters(original), "converted": count_parameters(rec)}).T


@torch.no_grad()
def residual_energy(original, rec, rank: int) -> pd.DataFrame:
    """Return, per depth and linear, the share of ‖Wℓ − W′‖²_F that a rank-r truncated SVD captures (eq. 4)."""
    rows = []
    for depth, (src, dst) in enumerate(zip(decoder_layers(original), decoder_layers(rec))):
        for name in family_of(original).linears:
            shared = dst.get_submodule(name)
            shared = getattr(shared, "base_layer", shared).weight
            s = torch.linalg.svdvals(src.get_submodule(name).weight.double() - shared.double())
            total = float((s ** 2).sum())
            rows.append({"depth": depth, "linear": name,
                         "energy_captured": 1.0 if total == 0 else float((s[:rank] ** 2).sum()) / total})
    return pd.DataFrame(rows)


@torch.no_grad()
def loop_predictions(model, tokenizer, prompt: str, *, k: int = 5, policy: str = "max_prob",
                     threshold: float = 0.5) -> pd.DataFrame:
    """Return each loop's top-k next tokens for the prompt's last position, its exit score, and whether it exits."""
    ids = tokenizer(prompt).input_ids
    rows = []
    for out in loop_outputs(model, ids):
        logits = out.logits[-1:]  # [1, vocab]: the prompt's last position
        score = (exit_scores(policy, loop=torch.tensor([out.loop]), logits=logits, hidden=out.hidden[-1:],
                             prev_hidden=out.prev_hidden[-1:]).item() if policy != "none" else float("nan"))
        top = logits.float().softmax(-1)[0].topk(k)
        for r, (p, t) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            rows.append({"loop": out.loop + 1, "rank": r + 1, "token": tokenizer.decode([t]), "prob": p,
                         "exit_score": score, "exits": policy != "none" and score >= threshold})
    return pd.DataFrame(rows)


def generate_with_exits(model, tokenizer, prompt: str, *, policy: str = "max_prob", threshold: float = 0.5,
                        max_new_tokens: int = 16) -> tuple[str, list[int]]:
    """Return (generated text, exit loop per generated token) from the depth-wise batching engine."""
    exit_policy = None if policy == "none" else POLICY_CLASSES[policy](threshold)
    engine = Engine(model, token_budget=64, exit_policy=exit_policy, max_active=1)
    ids = tokenizer(prompt).input_ids
    out = engine.run([Request(prompt=ids, max_new_tokens=max_new_tokens, request_id=0)])
    return tokenizer.decode(out[0]), [b + 1 for b in engine.exit_loops[0]]


def explorer(original, tokenizer):
    """Return an ipywidgets UI: choose block count, init, rank, norm tying, prompt and exit policy."""
    import ipywidgets as w
    from IPython.display import display

    layers = len(decoder_layers(original))
    controls = dict(
        num_blocks=w.Dropdown(options=[b for b in range(1, layers + 1) if layers % b == 0], value=2, description="B"),
        init=w.Dropdown(options=INITS, value="average", description="init"),
        lora_rank=w.IntSlider(value=0, min=0, max=256, step=8, description="LoRA rank"),
        untie_norms=w.Checkbox(value=False, description="untie norms"),
        prompt=w.Text(value="The capital of France is", description="prompt"),
        policy=w.Dropdown(options=EXIT_POLICIES, value="max_prob", description="exit policy"),
        threshold=w.FloatSlider(value=0.5, min=0, max=1, step=0.05, description="threshold"),
    )
    out = w.Output()

    def refresh(_=None):
        c = {k: v.value for k, v in controls.items()}
        with out:
            out.clear_output()
            rec = convert_quietly(original, num_blocks=c["num_blocks"], init=c["init"],
                                  lora_rank=c["lora_rank"], untie_norms=c["untie_norms"])
            display(parameter_table(original, rec))
            display(loop_predictions(rec, tokenizer, c["prompt"], policy=c["policy"], threshold=c["threshold"]))
            if not c["untie_norms"]:
                text, loops = generate_with_exits(rec, tokenizer, c["prompt"], policy=c["policy"],
                                                  threshold=c["threshold"])
                print(f"generated: {text!r}\nexit loop per token: {loops}")

    button = w.Button(description="convert and run")
    button.on_click(refresh)
    return w.VBox([*controls.values(), button, out])


def init_perplexity(model, sequences, *, num_blocks=2, inits=("stepwise", "average", "lower"),
                    ranks=(0, 64, 128, 256, "full"), untie_norms=(False, True), batch_size=8) -> pd.DataFrame:
    """Return held-out perplexity right after conversion for each init × LoRA rank × norm tying.

    SVD init (eq. 4) makes rank interpolate between the recursive model (r=0) and, with per-depth
    norms, the original (full rank): the paper's "perplexity at initialisation" view (Fig. 16).
    Everything runs where `model` is (the conversions and their SVDs too): the notebook loads it on its `device`,
    since on the CPU a paper-scale curve (Gemma 2B: one full-rank SVD conversion per init × tying, ~40
    full-vocabulary passes over the held-out set) takes hours.
    """
    full = max(min(w.shape) for w in model.parameters() if w.ndim == 2)
    rows = [{"model": "original", "init": "-", "lora_rank": "-", "untie_norms": "-",
             "perplexity": perplexity(model, sequences, batch_size=batch_size), **count_parameters(model)}]
    # One full-rank SVD conversion per (init, tying); lower ranks truncate it (truncate_lora), largest first.
    by_size = sorted(ranks, key=lambda r: full if r == "full" else r, reverse=True)
    for init, untie in tqdm(list(itertools.product(inits, untie_norms)), desc="init perplexity"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full rank is clamped per matrix on purpose
            rec = convert(model, RecursiveSpec(num_blocks=num_blocks, init=init, untie_norms=untie,
                                               lora_rank=full))
        for rank in by_size:
            truncate_lora(rec, full if rank == "full" else rank)
            rows.append({"model": f"B={num_blocks}", "init": init, "lora_rank": rank, "untie_norms": untie,
                         "perplexity": perplexity(rec, sequences, batch_size=batch_size),
                         **count_parameters(rec)})
    return pd.DataFrame(rows)
