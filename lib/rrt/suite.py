"""The suite at one scale: every notebook's plan, each run owned by the first notebook that lists it (01 → 05), so
hours are counted once. A run another notebook lists too (01's full-size model as 03's teacher, 03's final models
as 04's starting points, 04's App. M runs as 05's served models) costs its owner's hours, nobody else's."""
from __future__ import annotations

import pandas as pd

from rrt.notebook import load_params, planned
from rrt.plans import STUDIES
from rrt.runs.cost import COST_RULE, format_tokens, plan_table
from rrt.runs.store import Run


def suite_plans(scale: str) -> dict[str, list[Run]]:
    """{notebook: its plan} for every notebook that trains at this scale (its params file), in notebook order."""
    studies = {name: load_params(name, scale) for name in sorted(STUDIES)}
    return {name: study.runs() for name, study in studies.items() if planned(study) is not None}


def owners(scale: str) -> dict[str, str]:
    """{run key: the first notebook whose plan lists it}: the notebook whose hours count that run."""
    out = {}
    for name, runs in suite_plans(scale).items():
        for run in runs:
            out.setdefault(run.key, name)
    return out


def suite_table(scale: str) -> pd.DataFrame:
    """One row per notebook (the runs it lists, and the runs, tokens, FLOPs and H100 hours it owns), then the suite:
    every run once (`python -m rrt plan all SCALE`)."""
    plans = suite_plans(scale)
    owner = owners(scale)
    tables = {name: plan_table(runs, owners=owner) for name, runs in plans.items()}
    rows = [{"notebook": name, "runs": len(t), **_totals(t[t.owner == name])} for name, t in tables.items()]
    every = pd.concat(tables.values()).drop_duplicates("config_hash")
    return pd.DataFrame(rows + [{"notebook": "suite (each run once)", "runs": len(every), **_totals(every)}])


def suite_text(scale: str) -> str:
    """`suite_table` as `python -m rrt plan all SCALE` prints it, with the cost rule."""
    return (suite_table(scale).to_string(index=False, formatters={
        "tokens": format_tokens, "flops": "{:.2e}".format, "h100_hours": "{:,.0f}".format})
        + f"\nH100 hours of the runs each notebook owns (the first to list a run owns it); {COST_RULE}.")


def _totals(table: pd.DataFrame) -> dict:
    return {"owned_runs": len(table), "to_train": int((~table.trained).sum()), "tokens": table.tokens.sum(),
            "flops": table.flops.sum(), "h100_hours": table.h100_hours.sum()}
