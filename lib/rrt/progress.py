"""Progress for a grid of runs: one bar in a notebook, and lines in the terminal that started it.

A grid cell (`runs.run_plan`, 05's served models) shows one bar whose postfix names the current
run and its step; the nested bars (training's, lm-eval's, datasets') are turned off, because in a
notebook each would be an output area per run. A kernel's widget bar never reaches the terminal
of `make run`, so a line per run and every `every_s` seconds goes there too.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm.auto import tqdm


class GridProgress:
    """One progress bar for a grid of runs, the current run's name and step in its postfix.

    Nested bars (training's, lm-eval's) would each be an output area per run in a notebook, so callers
    turn theirs off and report here. In a notebook the bar is a widget that never reaches the terminal
    of `make run`, so a line per run and every `every_s` seconds also goes there (`_terminal_line`).
    """

    def __init__(self, total: int, *, desc: str, every_s: float = 30.0, write=None):
        from tqdm.notebook import tqdm_notebook

        self.bar = tqdm(total=total, desc=desc)
        self.write = write or (_terminal_line if isinstance(self.bar, tqdm_notebook) else None)
        self.every_s, self.name, self.index, self.steps, self.t0, self.last = every_s, "", 0, 0, 0.0, 0.0

    def start(self, name: str, *, steps: int = 0) -> None:
        self.name, self.index, self.steps, self.t0 = name, self.bar.n + 1, steps, time.monotonic()
        self.bar.set_postfix_str(name)

    def note(self, what: str) -> None:
        """Show what the current run is doing ("training", "evaluating", ...)."""
        self.bar.set_postfix_str(f"{self.name}: {what}")
        self._line(what)

    def step(self, record: dict) -> None:
        """Show a training step's record (`rrt.train.train`'s `progress` callback)."""
        text = f"step {record['step']}/{self.steps} loss {record['loss']:.4f} {record['tokens_per_s']:.0f} tok/s"
        self.bar.set_postfix_str(f"{self.name}: {text}")
        if time.monotonic() - self.last >= self.every_s or record["step"] == self.steps:
            self._line(text)

    def done(self, what: str = "done") -> None:
        self.bar.update(1)
        self._line(f"{what} ({time.monotonic() - self.t0:.0f}s)")

    def close(self) -> None:
        self.bar.set_postfix_str("")
        self.bar.close()

    def _line(self, text: str) -> None:
        self.last = time.monotonic()
        if self.write:
            self.write(f"{self.bar.desc} {self.index}/{self.bar.total} {self.name}: {text}")


@contextlib.contextmanager
def nested_bars_off():
    """Within the block, datasets' and transformers' progress bars are off (restored after): a grid shows one bar."""
    import datasets
    from transformers.utils import logging as hf_logging

    was_on = not datasets.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on[0]:
            datasets.enable_progress_bars()
        if was_on[1]:
            hf_logging.enable_progress_bar()


def _terminal_line(line: str) -> None:
    """Write a line to the terminal that started this process, never into a notebook's outputs.

    In a Jupyter kernel sys.stderr goes to the notebook, but its fileno() is the kernel's own stderr
    (ipykernel keeps it for subprocesses): the terminal papermill runs in.
    """
    try:
        os.write(sys.stderr.fileno(), f"{time.strftime('%H:%M:%S')} {line}\n".encode())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        pass
