"""Run directories: what sits beside a run's results so it can be read and repeated later.

`config.json` (the resolved parameters), `versions.json` (packages, Python, git commit) and
`metrics.jsonl` (one record a line). Training, notebooks, evaluation and the serving benchmark all
write them through this module, so every run directory reads the same. Files are replaced
atomically (temp file, fsync, rename) and metrics appended one fsynced line at a time, so a kill or
a full disk leaves at most a torn last line, which `Metrics` truncates on resume; `RunLock` keeps a
second writer out of a directory.
"""
from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

CONFIG, VERSIONS, METRICS, LOCK = "config.json", "versions.json", "metrics.jsonl", "run.lock"
PACKAGES = ("torch", "transformers", "peft", "datasets", "lm_eval", "accelerate", "papermill", "rrt")


def write_config(run_dir: str | Path, config: dict) -> Path:
    """Write `config` as run_dir/config.json (creating run_dir); return the file."""
    return write_json(Path(run_dir) / CONFIG, config)


def read_config(run_dir: str | Path) -> dict | None:
    """Return run_dir/config.json's contents, or None if the run has none yet; raise naming it if unreadable."""
    return read_json(Path(run_dir) / CONFIG)


def write_json(path: str | Path, value) -> Path:
    """Write `value` as JSON to `path` atomically (temp file, fsync, rename; creating the directory); return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer: concurrent writers never share it
    with tmp.open("w") as f:
        f.write(json.dumps(value, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | Path):
    """Return a JSON file's contents, or None if it does not exist; raise ValueError naming it if it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or move the run directory aside") from None


def write_versions(run_dir: str | Path) -> dict:
    """Write `versions()` as run_dir/versions.json (creating run_dir); return it."""
    found = versions()
    write_json(Path(run_dir) / VERSIONS, found)
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
    """run_dir/metrics.jsonl, one strict-JSON record a line, written by one process (`writer`), read by any.

    Each record is one fsynced append; a non-finite float is written as null and its key listed
    under "nonfinite". A failed append (disk full) is cut back off. On opening, a torn last line (a
    kill or a full disk mid-append) is truncated with a warning, and records after the checkpoint's
    step (`keep_until`) are dropped: a killed attempt's later records would otherwise repeat. A fresh
    start (keep_until 0) keeps nothing.
    """

    def __init__(self, run_dir: str | Path, *, writer: bool = True, keep_until: int = 0):
        self.path, self.writer = Path(run_dir) / METRICS, writer
        if writer and self.path.exists():
            records, torn = self._parse(self.path.read_bytes()) if keep_until else ([], b"")
            if torn:
                warnings.warn(f"{self.path}: dropped a torn last line ({torn[:80]!r}): an append was interrupted")
            kept = [r for r in records if keep_until and r["step"] <= keep_until]
            if torn or len(kept) != len(records) or not keep_until:
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                with tmp.open("w") as f:
                    f.write("".join(_json_line(r) for r in kept))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Append one record as one fsynced line (only in the writing process); on failure, cut it back off."""
        if not self.writer:
            return
        line = _json_line(record).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, size)  # no torn line left behind for the next reader
                raise OSError(e.errno, f"appending a record to {self.path} failed: {e.strerror or e}; "
                                       f"the file is left as it was", str(self.path)) from e
        finally:
            os.close(fd)

    def read(self) -> list[dict]:
        """Return every record written so far (a torn last line, being written or interrupted, left out)."""
        if not self.path.exists():
            return []
        return self._parse(self.path.read_bytes())[0]

    def _parse(self, data: bytes) -> tuple[list[dict], bytes]:
        """Return (records, torn last line or b""); raise ValueError naming the file and line of an earlier bad one."""
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines) and not tail:  # the last line: torn in a way that kept its newline
                    return records, line
                raise ValueError(f"{self.path} line {number} is not JSON: {line[:80]!r}") from None
        return records, tail


def _json_line(record: dict) -> str:
    """Return one strict-JSON line: a non-finite float becomes null, its key listed under "nonfinite"."""
    nonfinite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        record = {**{k: None if k in nonfinite else v for k, v in record.items()},
                  "nonfinite": record.get("nonfinite", []) + nonfinite}
    return json.dumps(record, allow_nan=False) + "\n"


class RunLock:
    """An exclusive lock on a run directory (run_dir/run.lock holding the writer's pid and host).

    `acquire` refuses while another live process holds it, naming that pid. The lock is an flock on
    the file, which the kernel drops when its holder dies, so the lock of a killed (dead) pid is
    reclaimed by the next writer, with a warning.
    """

    def __init__(self, run_dir: str | Path):
        self.path, self.fd = Path(run_dir) / LOCK, None

    def acquire(self) -> None:
        """Take the lock (creating the run directory); raise RuntimeError naming the holder if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RuntimeError(f"{self.path.parent} is in use by another writer ({self._holder()}; lock file "
                                   f"{self.path}): wait for it to finish, or use another run directory") from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.fd = fd  # else a releasing holder unlinked the file between our open and flock: retry
            else:
                os.close(fd)
        stale = os.read(self.fd, 4096).decode(errors="replace").strip()
        if stale:
            warnings.warn(f"{self.path}: reclaimed the lock of {stale}, which is no longer running")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Drop the lock and its file (a no-op if not held)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: no one can lock a file that is going away
            os.close(self.fd)
            self.fd = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "pid unknown"
        except OSError:
            return "pid unknown"
