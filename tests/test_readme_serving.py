"""The README's account of 05's committed cpu example against the serving targets is that example's targets.csv.

The block between `<!-- targets05:begin -->` and `<!-- targets05:end -->` is written from the CSV by

    .venv/bin/python tests/test_readme_serving.py

and this test rebuilds it and finds it unchanged, so no number in it is typed by hand.
"""
import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "outputs" / "examples" / "cpu" / "05_throughput"
BEGIN, END = "<!-- targets05:begin -->", "<!-- targets05:end -->"
LABELS = {  # rrt.serving.targets.TARGETS, in reading order
    "real_over_bound": "real / bound ≥ 0.90",
    "ratio_vs_hf_generate": "CDB + oracle ≥ 1.5× HF `generate`",
    "delta_seq": "Δ_Seq (CDB + oracle / continuous) ≥ 1.2, copy policies",
    "delta_seq_over_row_bound": "Δ_Seq ≥ 0.9 × its row bound, prompts included (ours)",
    "delta_seq_decode_over_row_bound": "Δ_Seq ≥ 0.9 × its row bound, decode time only (the paper's)",
    "lora_cost": "LoRA r = 64 costs ≤ 15% of CDB + oracle",
}


def targets_block(example: Path = EXAMPLE) -> str:
    """Per target: points met / points, the range of the values, and each point not met (model, system, policy)."""
    t = pd.read_csv(example / "targets.csv")
    lines = ["| target | met / points | values (min–max) | not met |", "|---|---|---|---|"]
    for name, label in LABELS.items():
        rows = t[t["target"] == name]
        if rows.empty:
            continue
        missed = rows[~rows["met"].astype(bool)]
        where = "; ".join(f"{r.config} {r.system}{'' if r.kv_policy in ('-', 'none') else ' ' + r.kv_policy} "
                          f"{r.value:.2f}" for r in missed.itertuples()) or "–"
        lines.append(f"| {label} | {int(rows['met'].astype(bool).sum())} / {len(rows)} | "
                     f"{rows['value'].min():.2f}–{rows['value'].max():.2f} | {where} |")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    found = re.search(re.escape(BEGIN) + r"\n(.*?)\n?" + re.escape(END), text, re.S)
    assert found, f"README.md has no {BEGIN} … {END} block"
    return found[1]


def test_the_readme_05_targets_block_is_the_examples_targets_csv():
    assert readme_block((ROOT / "README.md").read_text()) == targets_block()


def test_the_block_lists_every_point_not_met(tmp_path):
    (tmp_path / "targets.csv").write_text(
        "shape,config,target,system,model,exit_policy,kv_policy,value,threshold,met,row_bound\n"
        "64/256,B=2 r=0,real_over_bound,cdb_oracle,recursive B=2 r=0,oracle,copy_kv,0.85,0.9,False,\n"
        "64/256,B=2 r=0,real_over_bound,vanilla_static,vanilla,none,-,0.95,0.9,True,\n"
        "64/256,B=2 r=0,delta_seq,cdb_oracle,recursive B=2 r=0,oracle,copy_kv,1.3,1.2,True,\n")
    block = targets_block(tmp_path).splitlines()
    assert block[2] == "| real / bound ≥ 0.90 | 1 / 2 | 0.85–0.95 | B=2 r=0 cdb_oracle copy_kv 0.85 |"
    assert block[3].endswith("| 1 / 1 | 1.30–1.30 | – |") and len(block) == 4


if __name__ == "__main__":  # rewrite the README's block from the committed example
    readme = ROOT / "README.md"
    text = readme.read_text()
    readme_block(text)  # the markers are there
    start, end = text.index(BEGIN), text.index(END) + len(END)
    block = targets_block()
    readme.write_text(text[:start] + f"{BEGIN}\n{block}\n{END}" + text[end:])
    print(block)
