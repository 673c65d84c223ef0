"""`python -m rrt.nbrun` = papermill's command line with whole-file writes of the executed notebook (`make run`).

Papermill writes the output notebook after every cell with a plain `open(path, "w")`, so a full disk or a kill
mid-write leaves a torn `.ipynb` that neither Jupyter nor `make report` can read. Here its local handler writes
through `rrt.rundir.write_text` instead (a temp file beside it, fsynced, renamed): a reader sees the previous
version or the new one, and a failed write raises an OSError naming the notebook. Papermill has no option for this
(its I/O handlers are registered per scheme), so the local one's `write` is replaced, nothing else.
"""
from __future__ import annotations

from papermill.cli import papermill as papermill_cli
from papermill.iorw import LocalHandler
from papermill.utils import chdir

from rrt.rundir import write_text


def _write_whole(self, buf: str, path: str) -> None:
    with chdir(self._cwd):
        write_text(path, buf)


def whole_notebook_writes() -> None:
    """Make papermill's local writes atomic (idempotent)."""
    LocalHandler.write = _write_whole


def main() -> None:
    whole_notebook_writes()
    papermill_cli(prog_name="papermill")


if __name__ == "__main__":
    main()
