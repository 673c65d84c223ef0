"""`make demo`: convert the embedded SmolLM2-135M into Recursive Transformers and show what changes."""
import argparse

import pandas as pd
import torch

import rrt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args(argv)
    model, tok = rrt.load_model(args.model)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    num_layers = model.config.num_hidden_layers
    rows = []
    for b in [b for b in range(1, num_layers + 1) if num_layers % b == 0][:4]:
        rec = rrt.convert(model, rrt.RecursiveSpec(num_blocks=b, init="stepwise"))
        with torch.no_grad():
            exits = rrt.loop_logits(rec, ids)
        rows.append({"num_blocks": b, **rrt.count_parameters(rec),
                     "next token per loop": [tok.decode(e[0, -1].argmax()) for e in exits]})
    print(f"{args.model}: {num_layers} layers; Stepwise conversion, prompt {args.prompt!r}")
    print(pd.DataFrame(rows).set_index("num_blocks").to_markdown())


if __name__ == "__main__":
    main()
