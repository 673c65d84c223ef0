"""Notebook parameters: a schema per notebook, validated in the cell after `parameters`, and run dirs.

papermill injects overrides as a new cell and silently accepts misspelt names (`-p num_blcks 2`
just defines a new variable), so every notebook's second cell calls `resolve(notebook, globals())`,
which stops the run there with a message naming the key and the allowed values.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import importlib.metadata
import json
import subprocess
import types
from dataclasses import dataclass
from pathlib import Path

from rrt.evaluation import TASKS
from rrt.losses import KD_KINDS
from rrt.recursive import INITS, LORA_INITS

SCALES = ("smoke", "cpu", "paper-gemma-2b", "paper-tinyllama-1.1b", "paper-pythia-1b")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class P:
    """One parameter: its type(s), and optionally allowed values, a range, or allowed list items."""
    kind: type | tuple
    choices: tuple = ()
    items: tuple = ()          # for lists: allowed item values
    min: float | None = None
    max: float | None = None

    def check(self, key, value):
        if not isinstance(value, self.kind) or (isinstance(value, bool) and bool not in _kinds(self.kind)):
            hint = ""
            if isinstance(value, str) and list in _kinds(self.kind):
                # papermill's -p passes text; lists need YAML (-y) or a params file
                hint = f"; papermill -p passes text, pass lists with -y '{{{key}: [...]}}' or in a params file"
            raise TypeError(f"parameter {key}={value!r} must be {_kind_name(self.kind)}, got {type(value).__name__}{hint}")
        if self.choices and value not in self.choices:
            raise ValueError(f"parameter {key}={value!r} is not allowed; allowed: {', '.join(map(str, self.choices))}")
        for item in value if isinstance(value, list) else [value]:
            if self.items and item not in self.items:
                raise ValueError(f"parameter {key} holds {item!r}; allowed items: {', '.join(map(str, self.items))}")
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if self.min is not None and item < self.min or self.max is not None and item > self.max:
                    raise ValueError(f"parameter {key}={value!r} out of range [{self.min}, {self.max}]")


def _kinds(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind):
    return " or ".join("None" if k is type(None) else k.__name__ for k in _kinds(kind))


OPT_INT = (int, type(None))
# What every study shares: which model, which data, how long to train, where to write.
COMMON = {
    "scale": P(str, choices=SCALES),
    "model": P(str),
    "run_dir": P(str),                        # "" = outputs/<notebook>/<scale>-<timestamp>
    "seed": P(int, min=0),
}
TRAINING = {
    "train_corpus": P(str), "train_split": P(str), "data_source": P(str, choices=("embedded", "hub")),
    "eval_corpora": P(list), "seq_len": P(int, min=2), "max_train_seqs": P(OPT_INT, min=1),
    "max_eval_seqs": P(int, min=1), "steps": P(int, min=1), "batch_size": P(int, min=1),
    "grad_accum": P(int, min=1), "lr": P(float, min=0), "warmup_steps": P(int, min=0),
    "tasks": P(list, items=tuple(TASKS)), "task_limit": P(OPT_INT, min=1),
}
SCHEMAS = {
    "00_explore": {**COMMON, "num_blocks": P(int, min=1), "init": P(str, choices=INITS),
                   "lora_rank": P(int, min=0), "untie_norms": P(bool), "prompt": P(str),
                   "exit_policy": P(str, choices=("none", "max_prob", "margin", "cosine")),
                   "exit_threshold": P(float, min=0, max=1),
                   "max_new_tokens": P(int, min=1)},
    "01_init_ablation": {**COMMON, **TRAINING, "inits": P(list, items=INITS), "num_blocks": P(list, min=1),
                         "baselines": P(bool), "kd": P((str, type(None)), choices=KD_KINDS + (None,))},
    "02_relaxation_rank_sweep": {**COMMON, **TRAINING, "num_blocks": P(int, min=1),
                                 "inits": P(list, items=INITS), "ranks": P(list, min=0),
                                 "lora_inits": P(list, items=LORA_INITS), "untie_norms": P(list, items=(False, True)),
                                 "init_curve_ranks": P(list, min=0)},
    "03_distillation": {**COMMON, **TRAINING, "num_blocks": P(int, min=1), "init": P(str, choices=INITS),
                        "losses": P(list, items=("ce",) + KD_KINDS), "long_steps": P(int, min=1)},
    "04_early_exit": {**COMMON, **TRAINING, "num_blocks": P(int, min=1), "init": P(str, choices=INITS),
                      "uptrain_steps": P(int, min=1), "coefficients": P(list, min=0, max=1),
                      "head_lora_rank": P(int, min=1)},
    "05_throughput": {**COMMON, "num_blocks": P(list, min=1), "lora_ranks": P(list, min=0),
                      "num_requests": P(int, min=1), "prompt_len": P(int, min=1), "new_tokens": P(int, min=2),
                      "batch_size": P(int, min=1), "token_budget": P(int, min=1), "repeats": P(int, min=1),
                      "threads": P(int, min=1), "tasks": P(list, items=tuple(TASKS)), "task_limit": P(OPT_INT, min=1)},
}


def _is_param(name, value):
    return not (name.startswith("_") or name in {"In", "Out", "get_ipython", "exit", "quit"}
                or isinstance(value, (types.ModuleType, types.FunctionType, type)) or callable(value))


def resolve(notebook: str, namespace: dict) -> dict:
    """Return the notebook's parameters from its namespace, or raise naming the bad key and allowed values."""
    if notebook not in SCHEMAS:
        raise ValueError(f"unknown notebook {notebook!r}; known: {', '.join(SCHEMAS)}")
    schema = SCHEMAS[notebook]
    params = {k: v for k, v in namespace.items() if _is_param(k, v)}
    for key in params:
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown parameter {key!r}{hint} for {notebook}; allowed: {', '.join(schema)}")
    missing = [k for k in schema if k not in params]
    if missing:
        raise ValueError(f"{notebook}: parameters cell lacks {missing}")
    for key, rule in schema.items():
        rule.check(key, params[key])
    return params


def start_run(notebook: str, params: dict, out_root: str | Path = REPO / "outputs") -> Path:
    """Create the run directory and write config.json, versions.json and the git commit beside results."""
    run_dir = Path(params["run_dir"]) if params["run_dir"] else (
        Path(out_root) / notebook / f"{params['scale']}-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"notebook": notebook, **params}, indent=2))
    packages = ["torch", "transformers", "peft", "datasets", "lm_eval", "accelerate", "papermill", "rrt"]
    versions = {p: importlib.metadata.version(p) for p in packages}
    versions["git_commit"] = _git_commit()
    (run_dir / "versions.json").write_text(json.dumps(versions, indent=2))
    return run_dir


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"
