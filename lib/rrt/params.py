"""The params files: params/<notebook>/<scale>.yaml, the overrides of a notebook's parameters at one scale.

Scripts and the notebooks' first cells read them (rrt.notebook.load_params; 05 also reads 04's, whose
recipe its served models follow); the studies themselves (rrt.plans) take plain values.
"""
from __future__ import annotations

from pathlib import Path

import yaml

PARAMS_DIR = Path(__file__).resolve().parents[2] / "params"


def read_params(notebook: str, scale: str) -> dict:
    """Return the overrides of params/<notebook>/<scale>.yaml, or of a YAML file's path given as `scale`."""
    path = Path(scale) if scale.endswith((".yaml", ".yml")) else PARAMS_DIR / notebook / f"{scale}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (PARAMS_DIR / notebook).glob("*.yaml"))
        raise ValueError(f"no params file {path}; scales of {notebook}: {known}")
    return yaml.safe_load(path.read_text()) or {}
