"""Caches verified on use: each carries a small JSON sidecar beside it (`<cache>.json`) holding the hash of its
source and its own content hash, checked before it is read, so an edited, truncated or stale cache is never
used silently (`cache_problem`). The packed shards keep the same hashes in their own index (`rrt.shards`).

The hash is xxh3_128 (xxhash, which `datasets` already needs), not the checkpoints' sha256: a packed set
reaches ~120 GB and is verified each time it is opened, and xxh3 streams a file at 0.05-0.09 s/GB here against
sha256's 0.77-1.12 s/GB (LOG.md, 2026-12-05), so the disk's read speed (0.42 s/GB here), not the hash, sets the
cost. It guards against accidents (a torn copy, an edit, bit rot), not an adversary.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

import xxhash

from rrt.rundir import read_json, write_json

HASH = "xxh3_128"
CHUNK = 1 << 20  # bytes read at a time: never whole in memory; 1 MiB hashes ~2x faster than 16 MiB here (cache)


def new_hash(data: bytes = b""):
    """Return a streaming hash of data (`update(bytes)` adds more; `digest_of` gives its value)."""
    return xxhash.xxh3_128(data)


def digest_of(hasher) -> str:
    """Return a streaming hash's value, named by its algorithm: "xxh3_128:<hex>"."""
    return f"{HASH}:{hasher.hexdigest()}"


def file_hash(path: str | Path) -> str:
    """Return the content hash of a file, read in chunks."""
    hasher, buffer = new_hash(), bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])
    return digest_of(hasher)


def sidecar(path: str | Path) -> Path:
    """Return the sidecar of a cache file or directory: <path>.json beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_sidecar(path: str | Path, *, source: str | None) -> dict:
    """Write the sidecar of the cache at path (a file, or a directory of files): the source's hash and each
    file's bytes and content hash; return it."""
    record = {"source": source, "files": {name: {"bytes": file.stat().st_size, "hash": file_hash(file)}
                                          for name, file in _files(Path(path)).items()}}
    write_json(sidecar(path), record)
    return record


def cache_problem(path: str | Path, *, source: str | None) -> str | None:
    """Return why the cache at path must not be used, or None when it verifies against its sidecar.

    source: the hash of what the cache is built from now; None where that is unknown here (not compared).
    Sizes are compared before any content is hashed, so a truncated file is named at once.
    """
    path = Path(path)
    if not path.exists():
        return "it is missing"
    try:
        record = read_json(sidecar(path))
    except ValueError as e:
        return f"its sidecar is damaged ({e})"
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return f"it has no sidecar {sidecar(path)} (written before caches were verified, or its writer was killed)"
    if source is not None and record.get("source") != source:
        return f"its source changed since it was built (built from {record.get('source')}, now {source})"
    files = _files(path)
    if sorted(files) != sorted(record["files"]):
        return f"it holds files {sorted(files)}, its sidecar lists {sorted(record['files'])}"
    for name, want in record["files"].items():
        if files[name].stat().st_size != want.get("bytes"):
            return f"{files[name]} has {files[name].stat().st_size:,} bytes, its sidecar says {want.get('bytes')} " \
                   f"(truncated?)"
    for name, want in record["files"].items():
        if file_hash(files[name]) != want.get("hash"):
            return f"{files[name]}'s content differs from its sidecar's hash (edited or damaged)"
    return None


def temp_name(path: str | Path, suffix: str = "partial") -> Path:
    """Return a temporary name beside path for this process: <path>.<host>.<pid>.<suffix> (several processes,
    on several hosts sharing a filesystem, may build one cache at once)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{suffix}")


def remove_stale_temps(path: str | Path, suffix: str = "partial") -> list[Path]:
    """Remove the `temp_name`s of path left by killed processes of this host; return them. Those of other hosts
    are left (their writer may be alive) and are never read. A name without a host (<path>.<pid>.<suffix>, written
    before hosts were named) is taken as this host's."""
    path, removed = Path(path), []
    for temp in path.parent.glob(f"{path.name}.*.{suffix}"):
        host, _, pid = temp.name[len(path.name) + 1:-len(suffix) - 1].rpartition(".")
        if host in ("", socket.gethostname()) and pid.isdigit() and not _alive(int(pid)):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


@contextlib.contextmanager
def writing(path: str | Path, temp: str | Path | None = None, *, need: int | None = None, then: str = ""):
    """Run the write of path, through temp (a file or directory) if given: on any error (a full disk, a kill) temp
    is removed, and an OSError is raised again as `write_error`'s, naming path."""
    try:
        yield
    except BaseException as err:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True) if Path(temp).is_dir() else Path(temp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err, need=need, then=then) from err
        raise


def write_error(path: str | Path, err: OSError, *, need: int | None = None, then: str = "") -> OSError:
    """Return an OSError (err's errno) for a failed write of path that names it, the bytes it needs when known,
    the space free on its filesystem, and `then` (what is kept and what to do)."""
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free on its filesystem"
    except OSError:
        free = "free space unknown"
    needs = f"it needs {need:,} bytes, " if need is not None else ""
    then = f"; {then}" if then else ""
    return OSError(err.errno, f"writing {path} failed ({err.strerror or err}): {needs}{free}{then}")


def _files(path: Path) -> dict[str, Path]:
    """{name: file} of a cache: the file itself, or a directory's files."""
    if path.is_dir():
        return {p.name: p for p in sorted(path.iterdir()) if p.is_file()}
    return {path.name: path}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
