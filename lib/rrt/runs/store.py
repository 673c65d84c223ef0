"""The run store: a `Run` (its TrainConfig, tags and the runs it reads), its key and directory, its run file.

Runs live in a run store shared by every notebook (default outputs/runs/), one directory per config
hash, `<model>-<key>`: 01's full-size model is 03's KD teacher (App. L) and 01's Stepwise model is
where 04's early-exit post-training starts, each trained once and reused when present. A run is
done when its final checkpoint holds its weights; `run.json` beside it holds all a job needs to
train and evaluate it alone (`python -m rrt.runs <run dir>/run.json`).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rrt.rundir import read_json, write_json
from rrt.trainconfig import TrainConfig

RUN_FILE = "run.json"
SEED_SUFFIX = r" seed=\d+$"  # a repeated seed's run is named "<model> seed=<n>" (01's repeat_seeds)
PRETRAINED = "pretrained"  # a Run's role: the original checkpoint itself, evaluated as is and never trained


@dataclass(frozen=True)
class DataSpec:
    """What a plan's runs train and are scored on: corpora, sequence length, how many packed sequences."""
    train_corpus: str = "wikitext2"   # uptraining corpus (clusters: "slimpajama")
    train_split: str = "validation"   # its split (WikiText-2's train split is not vendored)
    data_source: str = "embedded"     # embedded (vendored, offline) | hub (streamed by name)
    seq_len: int = 128                # tokens per packed sequence
    max_train_seqs: int | None = None  # packed training sequences (None: all; a hub corpus: what the run reads)
    eval_corpora: tuple = ("wikitext2/test",)  # held-out perplexity sets, "corpus/split"
    max_eval_seqs: int = 32           # sequences per held-out set
    packed_dir: str = ""              # where `make pack` wrote a hub corpus' shards ("": outputs/packed)

    def to_dict(self) -> dict:
        out = _json_ready(self)
        if not self.packed_dir:  # run.json files from before the field read the same
            del out["packed_dir"]
        return out


@dataclass(frozen=True)
class EvalSpec:
    """What a finished run is evaluated on; its results file is keyed by a hash of this."""
    eval_corpora: tuple               # held-out perplexity sets, "corpus/split"
    max_eval_seqs: int
    seq_len: int
    data_source: str
    tasks: tuple                      # few-shot tasks
    task_limit: int | None            # examples per task (None: the full split)
    per_loop: bool                    # every loop exit (static exiting, §3.7), not the last only

    def to_dict(self) -> dict:
        return _json_ready(self)


@dataclass(frozen=True)
class Run:
    """One training run of a plan: its TrainConfig (config.out is its directory in the run store) and tags."""
    name: str                 # unique within the plan, e.g. "stepwise B=2"
    role: str                 # study | baseline | variant | uptrained (a starting point) | pretrained (the
                              # original checkpoint, never trained): how a notebook shows it
    config: TrainConfig
    tags: dict = field(default_factory=dict)  # the fields that tell it apart, for tables and plots
    needs: tuple = ()         # names of runs whose final checkpoint it reads (teacher, init_from)

    @property
    def dir(self) -> Path:
        return Path(self.config.out)

    @property
    def key(self) -> str:
        """The run's identity in the store: its directory is <model>-<key> (a hash of its config)."""
        return self.dir.name.rsplit("-", 1)[-1]

    @property
    def final_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / f"step-{self.config.steps:08d}"

    @property
    def tokens_per_step(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * c.num_processes * c.seq_len

    @property
    def samples(self) -> int:
        """Training sequences this run reads (its data_offset first skipped; none for the pretrained checkpoint)."""
        c = self.config
        return 0 if self.role == PRETRAINED else c.steps * c.batch_size * c.grad_accum * c.num_processes

    @property
    def tokens(self) -> int:
        return self.samples * self.config.seq_len

    def trained(self) -> bool:
        """Whether the run is done: its final checkpoint holds its weights (the pretrained checkpoint: always)."""
        return self.role == PRETRAINED or (self.final_checkpoint / "model.safetensors").exists()


def make_run(store: Path, *, name: str, role: str, tags: dict, needs: tuple = (), **config) -> Run:
    """Return the run of TrainConfig fields `config` in `store`: its directory is <model>-<config hash>.

    The hash is taken with checkpoints read from the store (teacher, init_from) named relative to it:
    the same plan has the same run directories wherever the store lives.
    """
    relative = {k: str(Path(v).relative_to(store)) if k in ("teacher", "init_from") and v and Path(v).is_relative_to(store)
                else v for k, v in config.items()}
    key = TrainConfig(out="", **relative).hash()
    out = store / f"{_slug(config['model'])}-{key}"
    return Run(name=name, role=role, config=TrainConfig(out=str(out), **config), tags=tags, needs=needs)


def write_run_files(runs: list[Run], data: DataSpec, evaluation: EvalSpec) -> list[Path]:
    """Write <run dir>/run.json for every run: all `python -m rrt.runs` needs to train and evaluate it as its
    own (multi-GPU) job, e.g. `accelerate launch --num_processes N -m rrt.runs <run dir>/run.json`.

    A run.json that already says the same is left untouched: starting a plan again never rewrites a finished
    run's file. One that differs is replaced whole (atomically): a run shared by two notebooks is evaluated as
    the later one asks (04 scores 03's models at every loop). The studies validate every field before this.
    """
    paths = []
    for run in runs:
        path = run.dir / RUN_FILE
        spec = json.loads(json.dumps({
            "name": run.name, "role": run.role, "tags": run.tags, "needs": list(run.needs),
            "config": run.config.to_dict(), "data": data.to_dict(), "evaluation": evaluation.to_dict()}, default=str))
        if _existing(path) != spec:
            write_json(path, spec)
        paths.append(path)
    return paths


def _existing(path: Path):
    """A run file's contents; None if absent or damaged (then it is written again)."""
    try:
        return read_json(path)
    except ValueError:
        return None


def read_run_file(path: str | Path) -> tuple[Run, DataSpec, EvalSpec]:
    """Return (run, data spec, evaluation spec) from a run.json written by `write_run_files`."""
    spec = read_json(path)
    if spec is None:
        raise ValueError(f"no run file {path}: write it with `make sweep` or rrt.params.start")
    run = Run(name=spec["name"], role=spec["role"], config=TrainConfig.from_dict(spec["config"]), tags=spec["tags"],
              needs=tuple(spec["needs"]))
    data = DataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["data"].items()})
    evaluation = EvalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["evaluation"].items()})
    return run, data, evaluation


def label_of(run: str) -> str:
    """A run's name without its repeat seed ("stepwise B=2 seed=1" → "stepwise B=2"): repeats share a label."""
    return re.sub(SEED_SUFFIX, "", str(run))


def tag_is_true(value) -> bool:
    """A boolean tag read back from a table (True, "True", 1, "1.0" after a CSV round trip)."""
    return str(value).lower() in ("true", "1", "1.0")


def _json_ready(spec) -> dict:
    """A spec's fields as JSON values (tuples as lists), as run.json holds them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.split("/")[-1])
