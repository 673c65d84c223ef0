"""Run directories: what sits beside a run's results so it can be read and repeated later.

`config.json` (the resolved parameters), `versions.json` (packages, Python, git commit) and
`metrics.jsonl` (one record a line). Training, notebooks, evaluation and the serving benchmark all
write them through this module, so every run directory reads the same. Files are replaced
atomically (temp file, fsync, rename) and metrics appended one fsynced line at a time, so a kill or
a full disk leaves at most a torn last line, which `Metrics` truncates on resume; `RunLock` keeps a
second writer out of a directory (an O_EXCL lock file with a heartbeat, not flock: shared filesystems).
Every other file a notebook, table, figure or report writes goes through `replacing` the same way, and
`new_run_dir` names a notebook run's directory so that two started in one second never share one.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
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
    """Write `value` as JSON to `path` atomically (`replacing`; creating the directory); return it."""
    return write_text(path, json.dumps(value, indent=2, default=str))


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (`replacing`; creating the directory); return it."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(path: str | Path, df) -> Path:
    """Write DataFrame `df` as CSV (without its index) to `path` atomically (`replacing`); return it."""
    with replacing(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


@contextmanager
def replacing(path: str | Path):
    """Yield a temp path beside `path` for any writer (`df.to_csv(tmp)`, `fig.savefig(tmp)`); when the block ends,
    fsync it and rename it onto `path`. On a failure (a full disk) the temp file is removed, `path` is left as it
    was, and an OSError names `path`: a reader sees the previous file or the new one, never a torn one.

    The temp name keeps the suffix (savefig and to_csv infer the format from it) and holds the pid and thread, so
    concurrent writers never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}; the previous file is left as it was",
                      str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_run_dir(parent: str | Path, name: str) -> Path:
    """Create and return parent/name, or parent/name-2, -3, … if taken: each mkdir either creates the directory
    or fails, so two runs started in the same second (one timestamp in `name`) never share a directory."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = parent / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent / name}: 10,000 run directories of that name already exist")


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
                write_text(self.path, "".join(_json_line(r) for r in kept))

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
    """An exclusive lock on a run directory: run_dir/run.lock, created with O_CREAT|O_EXCL, holding the writer's
    pid and host; its modification time is a heartbeat the holder refreshes every `heartbeat_s` seconds.

    Not `flock`: many Lustre and NFS mounts do not honour it (or honour it per node only). `acquire` refuses
    while another live writer holds the lock, naming it. A lock is stale, and reclaimed with a warning, when
    its holder's pid is gone on this host, or its heartbeat is older than `stale_after_s` (a holder on
    another host, or one whose host died): the heartbeat runs in a daemon thread, so a long checkpoint write
    or evaluation never lets it go stale while the writer lives.
    """

    def __init__(self, run_dir: str | Path, *, heartbeat_s: float = 30.0, stale_after_s: float = 600.0):
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s; got {heartbeat_s}, {stale_after_s}")
        self.path, self.heartbeat_s, self.stale_after_s = Path(run_dir) / LOCK, heartbeat_s, stale_after_s
        self.owner, self._stop = None, None

    def acquire(self) -> None:
        """Take the lock (creating the run directory); raise RuntimeError naming the holder if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = f"pid {os.getpid()} on {socket.gethostname()}"
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                self._reclaim_if_stale()  # raises if the holder is live; else the file is gone: try again
        try:
            os.write(fd, owner.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.owner, self._stop = owner, threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="rrt-run-lock").start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours (a no-op if not held)."""
        if self.owner is None:
            return
        self._stop.set()
        if self._holder()[0] == self.owner:
            self.path.unlink(missing_ok=True)
        self.owner = None

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            if self._holder()[0] != self.owner:
                warnings.warn(f"{self.path} no longer names this writer ({self.owner}): it was reclaimed as stale")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a transient error on a network mount: the next beat retries

    def _reclaim_if_stale(self) -> None:
        """Remove the lock file if its holder is dead or silent; else raise naming the holder."""
        holder, age, inode = self._holder()
        if inode is None:
            return  # released between our open and this read
        host, pid = _host_and_pid(holder)
        dead = host == socket.gethostname() and pid is not None and not _alive(pid)
        if not dead and age <= self.stale_after_s:
            raise RuntimeError(f"{self.path.parent} is in use by another writer ({holder or 'pid unknown'}, heartbeat "
                               f"{age:.0f} s ago; lock file {self.path}): wait for it to finish, or use another run "
                               f"directory")
        # two writers reclaiming one stale lock at once: the inode check keeps the later one from removing the
        # earlier one's fresh lock, except within the microseconds between this stat and the unlink
        try:
            if os.stat(self.path).st_ino != inode:
                return
            self.path.unlink()
        except FileNotFoundError:
            return
        why = "which is no longer running" if dead else f"whose heartbeat is {age:.0f} s old"
        warnings.warn(f"{self.path}: reclaimed the lock of {holder or 'pid unknown'}, {why}")

    def _holder(self) -> tuple[str | None, float, int | None]:
        """Return (the lock file's text, its heartbeat's age in seconds, its inode); (None, 0, None) if absent."""
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                return f.read(4096).decode(errors="replace").strip(), time.time() - stat.st_mtime, stat.st_ino
        except FileNotFoundError:
            return None, 0.0, None


def _host_and_pid(holder: str | None) -> tuple[str | None, int | None]:
    """Parse "pid N on HOST"; (None, None) for anything else (a torn or foreign file)."""
    words = (holder or "").split()
    if len(words) == 4 and words[0] == "pid" and words[1].isdigit() and words[2] == "on":
        return words[3], int(words[1])
    return None, None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
