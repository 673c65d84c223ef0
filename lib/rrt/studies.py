"""Studies that sweep conversions without training (the notebooks call these; so does the CLI)."""
from __future__ import annotations

import argparse
import itertools
import warnings

import pandas as pd
from tqdm.auto import tqdm

import rrt
from rrt.data import load_packed
from rrt.evaluation import perplexity


def init_perplexity(model, blocks, *, num_blocks=2, inits=("stepwise", "average", "lower"),
                    ranks=(0, 64, 128, 256, "full"), untie_norms=(False, True), batch_size=8) -> pd.DataFrame:
    """Return held-out perplexity right after conversion for each init × LoRA rank × norm tying.

    SVD init (eq. 4) makes rank interpolate between the recursive model (r=0) and, with per-depth
    norms, the original (full rank): the paper's "perplexity at initialisation" curve (Fig. 16).
    """
    full = max(min(w.shape) for w in model.parameters() if w.ndim == 2)
    rows = [{"model": "original", "init": "-", "lora_rank": "-", "untie_norms": "-",
             "perplexity": perplexity(model, blocks, batch_size=batch_size)}]
    grid = list(itertools.product(inits, ranks, untie_norms))
    for init, rank, untie in tqdm(grid, desc="init perplexity"):
        spec = rrt.RecursiveSpec(num_blocks=num_blocks, init=init, untie_norms=untie,
                                 lora_rank=full if rank == "full" else rank)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "full" is clamped per matrix on purpose
            rec = rrt.convert(model, spec)
        rows.append({"model": f"B={num_blocks}", "init": init, "lora_rank": rank, "untie_norms": untie,
                     "perplexity": perplexity(rec, blocks, batch_size=batch_size),
                     **rrt.count_parameters(rec)})
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Perplexity right after conversion (no training).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="wikitext2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--max-blocks", type=int, default=16)
    parser.add_argument("--out", default=None, help="CSV path for the table")
    args = parser.parse_args(argv)
    model, tok = rrt.load_model(args.model)
    blocks = load_packed(args.corpus, args.split, tokenizer=tok, seq_len=args.block_len,
                         max_seqs=args.max_blocks)
    df = init_perplexity(model, blocks, num_blocks=args.num_blocks)
    print(df.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
