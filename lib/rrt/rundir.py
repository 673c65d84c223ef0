"""Run directories: what sits beside a run's results so it can be read and repeated later.

`config.json` (the resolved parameters), `versions.json` (packages, Python, git commit) and
`metrics.jsonl` (one record a line). Training, notebooks, evaluation and the serving benchmark all
write them through this module, so every run directory reads the same.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG, VERSIONS, METRICS = "config.json", "versions.json", "metrics.jsonl"
PACKAGES = ("torch", "transformers", "peft", "datasets", "lm_eval", "accelerate", "papermill", "rrt")


def write_config(run_dir: str | Path, config: dict) -> Path:
    """Write `config` as run_dir/config.json (creating run_dir); return the file."""
    path = Path(run_dir) / CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, default=str))
    return path


def read_config(run_dir: str | Path) -> dict | None:
    """Return run_dir/config.json's contents, or None if the run has none yet."""
    path = Path(run_dir) / CONFIG
    return json.loads(path.read_text()) if path.exists() else None


def write_versions(run_dir: str | Path) -> dict:
    """Write `versions()` as run_dir/versions.json (creating run_dir); return it."""
    found = versions()
    path = Path(run_dir) / VERSIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=2))
    return found


def versions() -> dict:
    """Return {package: version or None if not installed} for PACKAGES, plus python and git_commit."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = sys.version.split()[0]
    found["git_commit"] = git_commit()
    return found


def git_commit() -> str:
    """Return the commit of the checkout rrt is imported from ("-dirty" if it has changes), else "unknown"."""
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class Metrics:
    """run_dir/metrics.jsonl, one record a line, written by one process (`writer`), read by any.

    On resume, records after the checkpoint's step (`keep_until`) are dropped: a killed attempt's
    later records would otherwise repeat. A fresh start (keep_until 0) keeps nothing.
    """

    def __init__(self, run_dir: str | Path, *, writer: bool = True, keep_until: int = 0):
        self.path, self.writer = Path(run_dir) / METRICS, writer
        if writer and self.path.exists():
            kept = [r for r in self.read() if keep_until and r["step"] <= keep_until]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Append one record (only in the writing process)."""
        if self.writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Return every record written so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
