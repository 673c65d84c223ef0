"""Each notebook's claims table: the paper's finding, ours from the run's own CSVs, and whether it reproduces.

`for_notebook("01", run_dir)` reads the CSVs a notebook wrote (`perplexity.csv`, `accuracy.csv`, `curves.csv`,
02's `init_perplexity.csv`, 05's `deltas.csv`) and returns one row per claim: `claim`, `paper` (the paper's
Gemma 2B numbers, from `rrt.tables.PAPER`), `ours`, `measured as` and `reproduces` (`rrt.verdicts`: yes / no /
within noise; "not run" where this scale ran no such model). Accuracy decides a claim when every model compared
is above chance by more than twice its stderr; otherwise held-out perplexity does (at `cpu` scale every
recursive model is at chance), each held-out set tested on its own (`rrt.evidence`).
`claims_main` is `python -m rrt claims DIR... [--readme README.md]`.
"""
from __future__ import annotations

import argparse
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from rrt.evidence import Missing, RunCSVs, Stat, compare, final_loss, fmt, many, norm, rows_of, values
from rrt.rundir import write_csv
from rrt.tables import PAPER, style
from rrt.verdicts import K, better, combine, combined_error, same

COLUMNS = ["claim", "paper", "ours", "measured as", "reproduces"]
NOT_RUN = "not run"
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
EXACT = 1e-3  # log-perplexity tolerance of "gives back the original model exactly" (float sums in another order)


def for_notebook(notebook: str, run_dir) -> pd.DataFrame:
    """Return the claims table of notebook `notebook` ("01"…"05", or its full name) from the CSVs in `run_dir`."""
    key = str(notebook)[:2]
    if key not in BUILDERS:
        raise ValueError(f"no claims for notebook {notebook!r}; valid: {sorted(BUILDERS)}")
    run = RunCSVs(Path(run_dir))
    return pd.DataFrame([_row(run, *claim) for claim in BUILDERS[key]], columns=COLUMNS)


def save(notebook: str, run_dir):
    """Write `for_notebook`'s table as <run_dir>/claims.csv and return it styled for the notebook's last cell."""
    table = for_notebook(notebook, run_dir)
    write_csv(Path(run_dir) / "claims.csv", table)
    caption = (f"Claims of {notebook}: the paper's finding, ours from this run's CSVs, and whether it reproduces "
               f"(a difference beyond {K:g}× its error)")
    return style(table, caption).set_properties(**{"text-align": "left"})


def markdown(table: pd.DataFrame) -> str:
    """Return a claims table (or several, concatenated) as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |"
              for row in table[COLUMNS].itertuples(index=False)]
    return "\n".join(lines)


def readme_table(run_dirs) -> str:
    """Return the README's claims table: every notebook's claims from its run dir (the directory's name says which)."""
    return markdown(pd.concat([for_notebook(Path(d).name, d) for d in run_dirs], ignore_index=True))


def replace_between_markers(text: str, table: str) -> str:
    """Return `text` with what lies between the claims markers replaced by `table`."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} … {END} markers in the README")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


def claims_parser() -> argparse.ArgumentParser:
    """The parser of `python -m rrt claims`."""
    parser = argparse.ArgumentParser(prog="python -m rrt claims", description="Print the claims table of each "
                                     "notebook output dir (01…05: its name starts with the notebook's number).")
    parser.add_argument("dirs", nargs="+", help="notebook output dirs, e.g. outputs/examples/cpu/0[1-5]_* (others "
                                                "are skipped)")
    parser.add_argument("--readme", default=None, help="rewrite this README's claims table, between the lines "
                                                       f"{BEGIN} and {END}")
    return parser


def claims_main(argv=None) -> str:
    """Print the claims tables of notebook output dirs; with --readme, write them into the README."""
    args = claims_parser().parse_args(argv)
    dirs = [d for d in args.dirs if Path(d).name[:2] in BUILDERS]
    table = readme_table(dirs)
    print(table)
    if args.readme:
        path = Path(args.readme)
        path.write_text(replace_between_markers(path.read_text(), table))
        print(f"wrote the claims of {len(dirs)} notebooks into {path}")
    return table


def _row(run: RunCSVs, claim: str, paper: str, build) -> list[str]:
    try:
        ours, measure, verdicts = build(run)
    except Missing:
        return [claim, paper, "not run at this scale", "–", NOT_RUN]
    return [claim, paper, ours, measure, _verdict_text(verdicts)]


def _verdict_text(verdicts: list[str]) -> str:
    """The claim's verdict, and how many of its tests said what when they disagree: "no (yes 3, no 1 of 4)"."""
    overall, counts = combine(verdicts), Counter(verdicts)
    if len(counts) == 1:
        return overall
    return f"{overall} ({', '.join(f'{v} {n}' for v, n in counts.items())} of {len(verdicts)} tests)"


# ---------------------------------------------------------------- 01: inits (Fig. 5, Table 5, Fig. 11)

T5, T9, T11, T13 = PAPER["table5"], PAPER["table9"], PAPER["table11"], PAPER["table13"]


def _init(name: str, **tags) -> dict:
    return {"role": "study", "init": name, "num_blocks": 2} | tags


REDUCED = {"role": "baseline", "baseline": "reduced", "num_blocks": 2}


def _other_inits(run: RunCSVs) -> list[str]:
    others = [i for i in values(run.table("perplexity"), "init", {"role": "study", "num_blocks": 2}) if i != "stepwise"]
    if not others:
        raise Missing
    return others


def _seeds(run: RunCSVs, tags: dict) -> str:
    n = rows_of(run.table("perplexity"), tags)["seed"].nunique()
    return f" ({n} seeds)" if n > 1 else ""


def stepwise_best(run: RunCSVs):
    others = _other_inits(run)
    cs = [compare(run, _init("stepwise"), _init(i)) for i in others]
    ours = f"Stepwise {cs[0].text('a')}{_seeds(run, _init('stepwise'))}; " + "; ".join(
        f"{i.capitalize()} {c.text('b')}" for i, c in zip(others, cs))
    return (ours, *many(cs))


def lowest_loss(run: RunCSVs):
    arms = {i.capitalize(): _init(i) for i in _other_inits(run)} | {"reduced-size": REDUCED}
    a, texts, verdicts = final_loss(run, _init("stepwise")), [], []
    for name, tags in arms.items():
        try:
            b = final_loss(run, tags)
        except Missing:
            continue
        texts.append(f"{name} {b.shown}")
        verdicts.append(better(a.value, b.value, error=combined_error(a.error, b.error), higher_is_better=False))
    if not verdicts:
        raise Missing
    return f"Stepwise {a.shown}; " + "; ".join(texts), "training loss (last tenth of the steps)", verdicts


def beats_reduced(run: RunCSVs):
    c = compare(run, _init("stepwise"), REDUCED)
    ours = f"Stepwise {c.text('a')}{_seeds(run, _init('stepwise'))} vs reduced-size {c.text('b')}"
    return ours, c.measure, c.verdicts


def fixed_ends(run: RunCSVs):
    c = compare(run, _init("stepwise"), _init("stepwise_start", role="variant"))
    return f"fixed ends {c.text('a')} vs fixed start {c.text('b')}", c.measure, c.verdicts


def ln_zero(run: RunCSVs):
    c = compare(run, _init("average"), _init("average", role="variant", norm_init="zero"))
    return f"LN-avg {c.text('a')} vs LN-zero {c.text('b')} (Average)", c.measure, c.verdicts


# ---------------------------------------------------------------- 02: relaxation (Fig. 6, Table 9, App. I)

def _relaxed(rank, lora_init: str) -> dict:
    tags = {"init": "average", "num_blocks": 2, "untie_norms": False, "final": "", "lora_rank": rank}
    return tags | ({"lora_init": lora_init} if rank else {})


def svd_beats_zero(run: RunCSVs):
    ppl = run.table("perplexity")
    average = {"init": "average", "num_blocks": 2}
    ranks = [r for r in values(ppl, "lora_rank", average | {"lora_init": "svd"})
             if r in values(ppl, "lora_rank", average | {"lora_init": "zero"})]
    if not ranks:
        raise Missing
    r = max(ranks, key=int)
    cs = [compare(run, _relaxed(r, "svd"), _relaxed(r, "zero"))]
    ours = f"Average r={r}: SVD {cs[0].text('a')} vs zero init {cs[0].text('b')}"
    try:
        cs.append(compare(run, _relaxed(r, "svd"), _relaxed(0, "-")))
        ours += f"; r=0 {cs[1].text('b')}"
    except Missing:
        pass
    return (ours, *many(cs))


def full_rank_is_original(run: RunCSVs):
    df = run.table("init_perplexity")
    original = rows_of(df, {"model": "original"})
    untied = rows_of(df, {"untie_norms": True})
    if original.empty or untied.empty:
        raise Missing
    base, texts, verdicts = float(original["perplexity"].iloc[0]), [], []
    for init, g in untied.groupby("init", sort=False):
        top = g.loc[g["lora_rank"].astype(int).idxmax()]
        tied = rows_of(df, {"init": init, "lora_rank": top["lora_rank"], "untie_norms": False})
        texts.append(f"{init.capitalize()} r={norm(top['lora_rank'])} {fmt(top['perplexity'])}"
                     + (f" (tied norms {fmt(tied['perplexity'].iloc[0])})" if not tied.empty else ""))
        verdicts.append(same(math.log(top["perplexity"]), math.log(base), error=EXACT, k=1))
    return f"{'; '.join(texts)} vs the original's {fmt(base)}", "perplexity at conversion (no training)", verdicts


# ---------------------------------------------------------------- 03: distillation (Fig. 7b, Table 11)

def _student(kd: str, steps) -> dict:
    return {"init": "stepwise", "num_blocks": 2, "lora_rank": 0, "kd": kd, "uptrain_steps": steps}


def _steps(run: RunCSVs, kd: str) -> list[str]:
    tags = {k: v for k, v in _student(kd, 0).items() if k != "uptrain_steps"}
    return sorted(values(run.table("perplexity"), "uptrain_steps", tags), key=float)


def kd_beats_ce(run: RunCSVs):
    shared = sorted(set(_steps(run, "fkl")) & set(_steps(run, "ce")), key=float)
    if not shared:
        raise Missing
    c = compare(run, _student("fkl", shared[0]), _student("ce", shared[0]))
    return f"FKL {c.text('a')} vs CE {c.text('b')} (both {shared[0]} steps)", c.measure, c.verdicts


def longer_helps(run: RunCSVs):
    kd = next((k for k in ("ce", "fkl") if len(_steps(run, k)) > 1), None)
    if kd is None:
        raise Missing
    short, long = _steps(run, kd)[0], _steps(run, kd)[-1]
    c = compare(run, _student(kd, long), _student(kd, short))
    return f"{kd.upper()} {long} steps {c.text('a')} vs {short} steps {c.text('b')}", c.measure, c.verdicts


# ---------------------------------------------------------------- 04: early exits (Tables 1, 13)

UPTRAINED = {"role": "uptrained", "num_blocks": 2, "final": ""}  # not 03's final models (Tables 14, 15)


def _post(scheme: str, coefficient=None, sd=False, *, trainable="all", data="ovlp", training="post") -> dict:
    return {"num_blocks": 2, "final": "", "training": training, "exit_scheme": scheme,
            "exit_coefficient": coefficient or "-", "self_distill": sd, "trainable": trainable, "data": data}


AGG, AGG_SD = _post("aggressive", 0.1), _post("aggressive", 0.1, True)
WEIGHTED, WEIGHTED_SD = _post("weighted"), _post("weighted", None, True)
FROZEN = _post("standard", trainable="head_lora")


def _t13(*key) -> str:
    loop1, last = T13[key]
    return f"{loop1} / {last}"


def aggressive_sd(run: RunCSVs):
    c1, c2 = compare(run, AGG_SD, UPTRAINED, loop=0), compare(run, AGG_SD, UPTRAINED, how="not_worse", loop="last")
    return (f"loop 1 {c1.text('b')} → {c1.text('a')}, last loop {c2.text('b')} → {c2.text('a')} (uptrained → "
            f"post-trained)", *many([c1, c2]))


def weighted_trade(run: RunCSVs):
    cs = [compare(run, WEIGHTED, AGG, loop=0), compare(run, AGG, WEIGHTED, loop="last"),
          compare(run, WEIGHTED_SD, AGG_SD, loop=0), compare(run, AGG_SD, WEIGHTED_SD, loop="last")]
    ours = (f"loop 1 / last: weighted {cs[0].text('a')} · {cs[1].text('b')} vs aggressive 0.1 {cs[0].text('b')} · "
            f"{cs[1].text('a')}; + SD {cs[2].text('a')} · {cs[3].text('b')} vs {cs[2].text('b')} · {cs[3].text('a')}")
    return (ours, *many(cs))


def post_beats_co(run: RunCSVs):
    c = compare(run, AGG, _post("aggressive", 0.1, training="co"), loop="last")
    return f"last loop: post {c.text('a')} vs co-training {c.text('b')}", c.measure, c.verdicts


def frozen_head_lora(run: RunCSVs):
    c1, c2 = compare(run, AGG, FROZEN, loop=0), compare(run, FROZEN, UPTRAINED, how="same", loop="last")
    return (f"loop 1: frozen {c1.text('b')} vs aggressive 0.1 {c1.text('a')}; last loop {c2.text('a')} vs "
            f"uptrained {c2.text('b')}", *many([c1, c2]))


def new_tokens(run: RunCSVs):
    new = _post("aggressive", 0.1, data="new")
    c1, c2 = compare(run, new, AGG, how="same", loop=0), compare(run, new, AGG, how="same", loop="last")
    return (f"loop 1 / last: new tokens {c1.text('a')} · {c2.text('a')} vs the uptraining's {c1.text('b')} · "
            f"{c2.text('b')}", *many([c1, c2]))


# ---------------------------------------------------------------- 05: serving (Fig. 8, Table 17)

def cdb_beats_vanilla(run: RunCSVs):
    d = run.table("deltas")
    if d is None or not {"vanilla_static", "cdb_oracle"} <= set(d["system"]):
        raise Missing
    keys = [c for c in ("shape", "config", "max_active") if c in d]
    texts, verdicts = [], []
    for key, g in d.groupby(keys, sort=False):
        base = g[g["system"] == "vanilla_static"]
        for _, row in g[g["system"] == "cdb_oracle"].iterrows():
            if base.empty:
                continue
            a, b = _rate(row), _rate(base.iloc[0])
            verdicts.append(better(a.value, b.value, error=combined_error(a.error, b.error), higher_is_better=True))
            texts.append(f"{row.get('config', '')} {row['kv_policy']} {math.exp(a.value - b.value):.2f}×")
    if not verdicts:
        raise Missing
    return ("CDB + oracle / vanilla static: " + ", ".join(texts),
            "tokens/s measured (median of rounds, ± half their log range)", verdicts)


def _rate(row) -> Stat:
    value = math.log(row["tokens_per_s"])
    lo, hi = row.get("tokens_per_s_min", np.nan), row.get("tokens_per_s_max", np.nan)
    error = (math.log(hi) - math.log(lo)) / 2 if np.isfinite(lo) and np.isfinite(hi) and lo > 0 else 0.0
    return Stat(value, error, fmt(row["tokens_per_s"]))


BUILDERS = {
    "01": [("01: Stepwise is the best init (Fig. 5, Table 5)",
            f"Stepwise {T5['stepwise']}, Lower {T5['lower']}, Average {T5['average']}, Random {T5['random']} "
            "(avg accuracy)", stepwise_best),
           ("01: Stepwise ends with the lowest training loss (Fig. 5a)", "Stepwise lowest", lowest_loss),
           ("01: a recursive model beats the reduced-size model trained from scratch (Table 5)",
            f"{T5['stepwise']} vs {T5['reduced']}", beats_reduced),
           ("01: Stepwise keeps the first and last layers (\"fixed ends\") rather than every B-th from layer 0 "
            "(Fig. 11a)", "Gemma markedly better with fixed ends; Pythia no difference (loss curves)", fixed_ends),
           ("01: zeroed tied norms hurt; averaged ones do not (Fig. 11b)",
            "a large drop for TinyLlama and Pythia with LN-zero", ln_zero)],
    "02": [("02: SVD init makes relaxation pay; zero init gains little (Fig. 6, Table 9)",
            f"Average r=512: SVD {T9[('average', 512, 'svd')]}, zero init {T9[('average', 512, 'zero')]}, "
            f"r=0 {T9[('average', 0, '-')]}", svd_beats_zero),
           ("02: full rank with per-depth norms gives back the original model (App. I; `untie_norms`)",
            "exactly the original", full_rank_is_original)],
    "03": [("03: KD (FKL) from the full-size model beats CE (Fig. 7b, Table 11)",
            f"FKL {T11[('fkl', False)]} vs CE {T11[('ce', False)]}", kd_beats_ce),
           ("03: longer uptraining helps (Table 11)",
            f"CE 60B tokens {T11[('ce', True)]} vs 15B {T11[('ce', False)]}", longer_helps)],
    "04": [("04: aggressive 0.1 + self-distillation lifts loop 1 and keeps the last loop (Tables 1, 13)",
            f"loop 1 / last: {_t13('post', 'aggressive', 0.1, True, 'all', 'ovlp')} vs uptrained – / "
            f"{T13['uptrained'][1]}", aggressive_sd),
           ("04: weighted trades the last loop for loop 1, with self-distillation too (Table 13)",
            f"loop 1 / last: weighted {_t13('post', 'weighted', None, False, 'all', 'ovlp')} vs aggressive 0.1 "
            f"{_t13('post', 'aggressive', 0.1, False, 'all', 'ovlp')}; + SD "
            f"{_t13('post', 'weighted', None, True, 'all', 'ovlp')} vs "
            f"{_t13('post', 'aggressive', 0.1, True, 'all', 'ovlp')}",
            weighted_trade),
           ("04: post-training beats co-training on the last loop (Table 13)",
            f"loop 1 / last: post {_t13('post', 'aggressive', 0.1, False, 'all', 'ovlp')} vs co "
            f"{_t13('co', 'aggressive', 0.1, False, 'all', 'ovlp')}", post_beats_co),
           ("04: a frozen model with an LM-head LoRA is ineffective (Table 13)",
            f"loop 1 {T13[('post', 'standard', None, False, 'head_lora', 'ovlp')][0]} vs aggressive 0.1 "
            f"{T13[('post', 'aggressive', 0.1, False, 'all', 'ovlp')][0]}; last loop unchanged", frozen_head_lora),
           ("04: new tokens for post-training make no difference (Table 13)",
            f"loop 1 / last: {_t13('post', 'aggressive', 0.1, False, 'all', 'new')} vs "
            f"{_t13('post', 'aggressive', 0.1, False, 'all', 'ovlp')}", new_tokens)],
    "05": [("05: continuous depth-wise batching + oracle exits beats vanilla batching (Fig. 8, Table 17)",
            f"B=2 + CDB + oracle {PAPER['table17'][('cdb_oracle', 'B=2 r=0')][1]}× vanilla static (A100, simulated)",
            cdb_beats_vanilla)],
}
