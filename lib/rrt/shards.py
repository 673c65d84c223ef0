"""Packing as its own step (`python -m rrt pack`): a corpus tokenized once into shard files, read memory-mapped.

A corpus is cut into fixed units of whole documents (embedded: `docs_per_shard` documents each; hub: the
streamed dataset's own files). Each unit's documents are tokenized alone, each followed by EOS, exactly as
`rrt.data.pack` reads them, into `tokens-00012.npy` (the smallest unsigned dtype that holds the vocabulary)
with a sidecar `tokens-00012.json` (tokens, bytes, content hash); both are written under a temporary name and
renamed, so a finished unit is never redone and a killed (or full-disk) one is. The packed sequences are the units'
token stream, in unit order, cut as `pack` cuts it (an optional BOS, then seq_len - 1 corpus tokens; the tail
dropped): the same sequences as `rrt.data.load_packed`, whatever the number of workers. `index.json`, written last,
lists the units used, their hashes and an embedded corpus' text's hash: `PackedShards` verifies them, refusing a
damaged or stale set naming the file and `make pack`, which packs again what is (training never packs)."""
import gzip
import json
import math
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from rrt.caches import digest_of, file_hash, new_hash, writing
from rrt.data import DATA_DIR, EMBEDDED, _cache_key, _check_packable, _documents, load_corpus, packed_bos, source_hash
from rrt.rundir import read_json, write_json

PACKED_DIR = DATA_DIR.parent / "outputs" / "packed"  # default root: one directory per packed set below it
INDEX = "index.json"
DOCS_PER_SHARD = 1000  # documents per unit of an embedded corpus (a hub corpus: one unit per file)
PACK_COMMAND = "make pack NB=<notebook> SCALE=<scale> (python -m rrt pack)"
KEPT = f"the finished shards are kept: free space and run {PACK_COMMAND} again"  # after a failed write
# Tokens per second per worker: 89,574 measured 2026-12-04 on this repository's 2-core CPU machine (shared with
# other jobs), SmolLM2's tokenizer (rrt.models' embedded default), one worker, TOKENIZERS_PARALLELISM=false, over
# the five embedded corpora (1,121,712 tokens in 12.5 s; 59-126k tok/s per corpus), timed around
#   pack_shards(PackSet(name, split, "embedded", 128, None), rrt.models.load_tokenizer("smollm2-135m"), out=DIR)
# after one warm-up pack of each (datasets' cache). 60B tokens: ~186 CPU hours, ~12 h on 16 workers.
PACK_RATE = 9.0e4
# Tokens per byte of text, the same tokenizer over the same corpora (0.2617; `estimate` of a whole corpus only).
TOKENS_PER_BYTE = 0.26


@dataclass(frozen=True)
class PackSet:
    """One corpus split to pack: what `load_packed` takes, less the tokenizer."""
    name: str
    split: str
    source: str
    seq_len: int
    max_seqs: int | None


@dataclass(frozen=True)
class PackEstimate:
    """What packing one set costs, before any tokenizer is loaded (`make plan`)."""
    set: str                    # "corpus/split"
    sequences: int | None       # packed sequences (None: a hub corpus packed whole, size unknown here)
    tokens: int | None          # about sequences × seq_len
    dtype: str                  # uint16 | uint32
    disk_bytes: int | None
    shards: int | None          # units (None: a hub corpus' file count is known only once streamed)
    cpu_hours: float | None     # tokens / PACK_RATE, one worker


def pack_sets(spec) -> list[PackSet]:
    """Return the sets a `rrt.runs.DataSpec` reads: its training set, then each held-out set."""
    sets = [PackSet(spec.train_corpus, spec.train_split, spec.data_source, spec.seq_len, spec.max_train_seqs)]
    for name in spec.eval_corpora:
        corpus, _, split = name.partition("/")
        sets.append(PackSet(corpus, split or "test", spec.data_source, spec.seq_len, spec.max_eval_seqs))
    return sets


def pack_spec(spec, tokenizer, *, root=None, bos=None, **kwargs) -> dict[str, Path | None]:
    """Pack every set of a `rrt.runs.DataSpec` (`pack_shards`, kwargs its options) under root (default the spec's
    packed_dir, else PACKED_DIR), printing one line on each; return {"corpus/split": its directory or None}."""
    written = {}
    for s in pack_sets(spec):
        out = packed_path(s, tokenizer, root=root or spec.packed_dir or None, bos=bos)
        written[f"{s.name}/{s.split}"] = pack_shards(s, tokenizer, out=out, bos=bos, **kwargs)
        print(summary(s, out))
    return written


def packed_path(pack_set: PackSet, tokenizer, *, root=None, bos=None) -> Path:
    """Return the directory of a packed set: <root>/<corpus>-<split>-<seq_len>-<key>, a function of the set and
    the tokenizer (the key as `rrt.data.load_packed`'s cache key)."""
    s = pack_set
    key = _cache_key(tokenizer=tokenizer, source=s.source, name=s.name, split=s.split, seq_len=s.seq_len,
                     max_seqs=s.max_seqs, bos=packed_bos(tokenizer, bos=bos))
    return Path(root or PACKED_DIR) / f"{s.name}-{s.split}-{s.seq_len}-{key}"


def parse_part(text: str) -> tuple[int, int]:
    """Return (K, N) of "K/N" (task K of an N-task SLURM array), 0 <= K < N."""
    k, _, n = str(text).partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise ValueError(f"part {text!r} must be K/N with 0 <= K < N, e.g. 3/16")
    return int(k), int(n)


def summary(pack_set: PackSet, directory) -> str:
    """One line on a packed set: sequences, tokens, shards, dtype and where; or that other parts are missing."""
    index = read_json(Path(directory) / INDEX)
    what = (f"{index['sequences']:,} sequences of {pack_set.seq_len} tokens, {index['tokens']:,} tokens in "
            f"{len(index['units'])} shards ({index['dtype']})" if index else "this part done, other parts to come")
    return f"{pack_set.name}/{pack_set.split}: {what} -> {directory}"


def token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype holding ids below vocab_size: uint16 up to 65536, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def pack_shards(pack_set: PackSet, tokenizer, *, out=None, bos=None, workers=1, part=(0, 1),
                docs_per_shard=DOCS_PER_SHARD, on_unit=None, progress=True) -> Path | None:
    """Pack one set into shard files under `out` (default `packed_path`); return the directory once `index.json`
    is written, or None when this part is done but units of other parts are still missing.

    part=(K, N): handle only units u ≡ K (mod N) (one task of a SLURM array). workers: processes tokenizing
    this part's units. With max_seqs, units are taken in order until the finished prefix covers max_seqs
    sequences; finished units past that prefix are removed, so the files never depend on workers or parts.
    on_unit(u): called after each unit this call writes (progress hooks; tests stop a pack with it).
    """
    _check_packable(tokenizer, pack_set.seq_len)
    k, n = part
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers={workers!r} must be an int >= 1")
    if not (isinstance(n, int) and isinstance(k, int) and n >= 1 and 0 <= k < n):
        raise ValueError(f"part={part!r} must be (K, N) with 0 <= K < N")
    if not (isinstance(docs_per_shard, int) and docs_per_shard >= 1):
        raise ValueError(f"docs_per_shard={docs_per_shard!r} must be an int >= 1")
    directory = Path(out) if out else packed_path(pack_set, tokenizer, bos=bos)
    bos_id = packed_bos(tokenizer, bos=bos)
    vocab = max(tokenizer.get_vocab().values()) + 1
    packer = _Packer(pack_set, tokenizer, token_dtype(vocab), docs_per_shard, directory)
    if _already_packed(directory, packer, bos_id):
        return directory
    total = packer.num_units()
    need = None if pack_set.max_seqs is None else pack_set.max_seqs * (pack_set.seq_len - (bos_id is not None))
    directory.mkdir(parents=True, exist_ok=True)
    done = _finished(directory)
    packer.check_units(done)
    todo = list(range(k, total, n))
    pending = {u for u in todo if u not in done}
    bar = tqdm(total=len(todo), desc=f"packing {pack_set.name}/{pack_set.split}", unit="shard", disable=not progress)
    with _pool(workers, packer) as pool:
        fresh = pool.imap(_pack_unit, sorted(pending)) if pool else None  # results in unit order
        for u in todo:
            if n > 1 and need is not None:  # other parts' finished units count towards the prefix too
                done.update(_finished(directory, known=done))
            if need is not None and sum(t for v, t in done.items() if v < u) >= need:
                break  # the units before u hold enough tokens, whichever of them are still missing
            if u in pending:
                done[u] = next(fresh) if pool else packer.write(u)
                if on_unit is not None:
                    on_unit(u)
            bar.update(1)
            bar.set_postfix(tokens=f"{sum(done.values()):,}")
    bar.close()
    return _finalize(directory, packer, total, need, bos_id)


class PackedShards:
    """A finished packing read memory-mapped, row by row: reads like a packed `datasets.Dataset` of `input_ids`
    (what `rrt.train.train` and `rrt.evaluation.perplexity` take), and `rows(idx)` gives int32 [n, seq_len].

    verify: hash every file against index.json when opened (reads the whole set: see `rrt.caches` for the cost;
    the processes of one launch share the files, so one of them verifies). Sizes are always checked.
    """

    def __init__(self, directory, *, verify=True):
        self.directory = Path(directory)
        index = read_json(self.directory / INDEX)
        if index is None:
            raise ValueError(f"{self.directory / INDEX} is missing: the set is not packed (or its packing did not "
                             f"finish); write it with {PACK_COMMAND}")
        if index.get("text_hash") != source_hash(index["corpus"], index["split"], source=index["source"]):
            raise ValueError(f"{index['corpus']}/{index['split']}'s text changed since {self.directory} was packed (or "
                             f"it was packed before its text's hash was kept): run {PACK_COMMAND} again to repack it")
        if any("hash" not in unit for unit in index["units"]):
            raise ValueError(f"{self.directory / INDEX} records no content hash of its shards (packed before hashes "
                             f"were kept): run {PACK_COMMAND} again to record them (nothing is re-tokenized)")
        for file, why in _damaged(self.directory, index, verify=verify).items():
            raise ValueError(f"shard {self.directory / file} {why}; run {PACK_COMMAND} again, which packs it again")
        self.index = index
        self.seq_len, self.bos = index["seq_len"], index["bos"]
        self._body = self.seq_len - (self.bos is not None)  # corpus tokens per sequence
        self._files = [np.load(self.directory / unit["file"], mmap_mode="r") for unit in index["units"]]
        self._starts = np.cumsum([0] + [len(f) for f in self._files])  # stream offset of each file
        self.shape = (index["sequences"], self.seq_len)

    def __len__(self):
        return self.shape[0]

    def content_hash(self) -> str:
        """Return a hash of every token the rows read: the files' hashes in index.json (verified when opened), with
        how rows are cut from them (`rrt.train`'s fingerprint of the training sequences)."""
        units = [u["hash"] for u in self.index["units"]]
        return digest_of(new_hash(json.dumps([self.seq_len, self.bos, len(self), units]).encode()))

    def rows(self, idx) -> np.ndarray:
        """Return sequences `idx` (ints, a slice or an int array) as int32 [n, seq_len]."""
        idx = range(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx).reshape(-1)
        out = np.empty((len(idx), self.seq_len), np.int32)
        for r, i in enumerate(idx):
            if not -len(self) <= i < len(self):
                raise IndexError(f"sequence {i} out of range for {len(self)} packed sequences in {self.directory}")
            out[r, -self._body:] = self._span(int(i) % len(self) * self._body, self._body)
        if self.bos is not None:
            out[:, 0] = self.bos
        return out

    def __getitem__(self, key):
        if isinstance(key, str):
            if key != "input_ids":
                raise KeyError(f"{key!r}: packed shards have one column, 'input_ids'")
            return self.rows(slice(None))
        rows = self.rows(key)
        return {"input_ids": rows[0] if np.ndim(key) == 0 and not isinstance(key, slice) else rows}

    def with_format(self, type=None, columns=None):
        """Return self: rows are numpy already (the `datasets.Dataset` call `rrt.train` makes)."""
        if type not in (None, "numpy") or columns not in (None, ["input_ids"]):
            raise ValueError(f"packed shards give numpy input_ids only; got type={type!r} columns={columns!r}")
        return self

    def _span(self, start: int, length: int) -> np.ndarray:
        """The stream's tokens [start, start + length), joined across files."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, f = [], first
        while length > 0:
            a = start - self._starts[f]
            piece = self._files[f][a:a + length]
            parts.append(piece)
            start, length, f = start + len(piece), length - len(piece), f + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def estimate(spec, vocab_size: int, *, docs_per_shard=DOCS_PER_SHARD) -> list[PackEstimate]:
    """Return what packing each set of a `rrt.runs.DataSpec` costs, from the spec and the vocabulary size alone.

    Sequences are max_seqs, or (an embedded corpus packed whole) its text's bytes × TOKENS_PER_BYTE / seq_len;
    CPU hours are tokens / PACK_RATE (one worker).
    """
    dtype = token_dtype(vocab_size)
    out = []
    for s in pack_sets(spec):
        docs = _embedded_documents(s) if s.source == "embedded" else None
        total = _embedded_bytes(s) * TOKENS_PER_BYTE if docs is not None else None
        seqs = s.max_seqs if s.max_seqs is not None else (int(total // s.seq_len) if total else None)
        tokens = None if seqs is None else seqs * s.seq_len
        shards = None
        if docs is not None:
            share = 1.0 if tokens is None or not total else min(1.0, tokens / total)
            shards = max(1, math.ceil(docs * share / docs_per_shard))
        out.append(PackEstimate(set=f"{s.name}/{s.split}", sequences=seqs, tokens=tokens, dtype=dtype.name,
                                disk_bytes=None if tokens is None else tokens * dtype.itemsize, shards=shards,
                                cpu_hours=None if tokens is None else tokens / PACK_RATE / 3600))
    return out


def estimate_text(spec, vocab_size: int) -> str:
    """Return `estimate` as the lines `make plan` prints: each packed set's sequences, dtype, shards, disk, CPU hours."""
    rows = [f"  {e.set}: " + ("all of an unbounded corpus: set max_train_seqs" if e.tokens is None else
                              f"{e.sequences:,} sequences, {e.tokens:,} tokens as {e.dtype}, "
                              f"{e.disk_bytes / 1e9:,.3f} GB on disk, shards: {e.shards or 'one per corpus file'}, "
                              f"~{e.cpu_hours:,.2f} CPU hours (one worker at {PACK_RATE:,.0f} tokens/s)")
            for e in estimate(spec, vocab_size)]
    return "data shards (`make pack` first; training never packs):\n" + "\n".join(rows)


class _Packer:
    """Tokenizes one unit into its files; handed to each worker process once (pool initializer)."""

    def __init__(self, pack_set, tokenizer, dtype, docs_per_shard, directory):
        self.pack_set, self.tokenizer, self.dtype = pack_set, tokenizer, dtype
        self.docs_per_shard, self.directory = docs_per_shard, Path(directory)
        self.text_hash = source_hash(pack_set.name, pack_set.split, source=pack_set.source)
        self._corpus = None

    def corpus(self):
        if self._corpus is None:
            self._corpus = load_corpus(self.pack_set.name, self.pack_set.split, source=self.pack_set.source)
        return self._corpus

    def num_units(self) -> int:
        ds = self.corpus()
        if isinstance(ds, datasets.IterableDataset):
            return ds.num_shards
        return max(1, math.ceil(len(ds) / self.docs_per_shard))

    def documents(self, u: int):
        """Unit u's documents: a file of a streamed corpus, or a fixed range of an embedded one."""
        ds = self.corpus()
        if isinstance(ds, datasets.IterableDataset):
            return ds.shard(num_shards=ds.num_shards, index=u, contiguous=True), {"file": u}
        a, b = u * self.docs_per_shard, min(len(ds), (u + 1) * self.docs_per_shard)
        return ds.select(range(a, b)), {"documents": [a, b]}

    def check_units(self, done) -> None:
        """Refuse finished units cut otherwise (another docs_per_shard): their documents would be packed twice."""
        for u in done:
            side = read_json(self.directory / _name(u, "json"))
            docs, want = self.documents(u)
            if side.get("documents", side.get("file")) != want.get("documents", want.get("file")):
                raise ValueError(f"{self.directory / _name(u, 'json')} holds {side}, but unit {u} is {want} here "
                                 f"(docs_per_shard={self.docs_per_shard}): pack with the directory's own "
                                 f"docs_per_shard, or into another --out")

    def index_fields(self, bos_id) -> dict:
        """What index.json says of how the set was packed (a second pack into the directory must agree)."""
        s = self.pack_set
        return {"corpus": s.name, "split": s.split, "source": s.source, "seq_len": s.seq_len, "bos": bos_id,
                "max_seqs": s.max_seqs, "dtype": self.dtype.name, "tokenizer": _cache_key(tokenizer=self.tokenizer),
                "docs_per_shard": self.docs_per_shard, "text_hash": self.text_hash}

    def write(self, u: int) -> int:
        """Tokenize unit u into tokens-<u>.npy and its sidecar (each renamed into place); return its token count."""
        docs, where = self.documents(u)
        eos = self.tokenizer.eos_token_id
        parts = []
        for batch in docs.iter(batch_size=64):
            # as rrt.data._packed_sequences: each document alone, no specials, then EOS
            for ids in self.tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]:
                parts.append(np.asarray(ids + [eos], self.dtype))
        tokens = np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        path = self.directory / _name(u, "npy")
        partial = path.with_name(path.name + ".partial")  # one writer per unit: a fixed name, stale ones overwritten
        with writing(path, partial, need=tokens.nbytes + 128, then=KEPT), partial.open("wb") as f:  # 128: npy header
            np.save(f, tokens)
            f.flush()
            os.fsync(f.fileno())
        digest = {"bytes": partial.stat().st_size, "hash": file_hash(partial)}
        try:
            os.replace(partial, path)
        except FileNotFoundError:
            if (self.directory / INDEX).exists():  # another part finished the set and removed this unneeded unit
                return len(tokens)
            raise
        side = self.directory / _name(u, "json")
        with writing(side, then=KEPT):  # a unit without its sidecar is not finished: the next pack redoes it
            write_json(side, {"unit": u, **where, "tokens": len(tokens), "dtype": self.dtype.name, **digest})
        return len(tokens)


_WORKER: _Packer | None = None  # the packer of this worker process (multiprocessing's initializer idiom)


def _init_worker(packer):
    global _WORKER
    # one core per worker: N workers use N cores, not N × the tokenizer's own thread pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = packer


def _pack_unit(u: int) -> int:
    return _WORKER.write(u)


class _pool:
    """A process pool of `workers` packers, or None for one worker (packing in this process).

    Fork where the platform has it: spawn re-imports rrt (torch, transformers) in every worker, 22 s against
    1.9 s for 2 workers on wikitext2/validation here. The tokenizers library guards itself across a fork (it
    turns its thread pool off in the child), and each worker is told to use one core anyway (`_init_worker`).
    """

    def __init__(self, workers, packer):
        self.workers, self.packer, self.pool = workers, packer, None

    def __enter__(self):
        if self.workers > 1:
            self.pool = multiprocessing.get_context(_START).Pool(self.workers, _init_worker, (self.packer,))
        return self.pool

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()  # units still in flight are not needed (or the pack is failing)
            self.pool.join()


_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _name(u: int, ext: str) -> str:
    return f"tokens-{u:05d}.{ext}"


def _finished(directory: Path, known=None) -> dict[int, int]:
    """Return {unit: tokens} of the finished units in directory (sidecar and token file both in place)."""
    known = known or {}
    found = {}
    for side in directory.glob("tokens-*.json"):
        u = int(side.stem.split("-")[1])
        if u in known:
            continue
        if (directory / _name(u, "npy")).exists():
            found[u] = read_json(side)["tokens"]
    return found


def _finalize(directory: Path, packer: _Packer, total: int, need, bos_id) -> Path | None:
    """Write index.json once the units needed are finished, removing every file past them; else return None."""
    done = _finished(directory)
    used, tokens = [], 0
    for u in range(total):
        if need is not None and tokens >= need:
            break
        if u not in done:
            missing = [v for v in range(u, total) if v not in done]
            print(f"{directory}: {len(done)} of {total} units packed; still missing {missing[:8]}"
                  f"{' …' if len(missing) > 8 else ''} (other parts)")
            return None
        used.append(u)
        tokens += done[u]
    sides = {u: read_json(directory / _name(u, "json")) for u in used}  # a sidecar from before hashes: the file's
    units = [{"unit": u, "file": _name(u, "npy"), "tokens": done[u],
              "bytes": sides[u].get("bytes") or (directory / _name(u, "npy")).stat().st_size,
              "hash": sides[u].get("hash") or file_hash(directory / _name(u, "npy"))} for u in used]
    keep = {_name(u, ext) for u in used for ext in ("npy", "json")}
    # the rest: units past the prefix, partial files, and write_json's temporary files of a killed worker
    for path in [*directory.glob("tokens-*"), *directory.glob(".tokens-*")]:
        if path.name not in keep:
            path.unlink(missing_ok=True)
    max_seqs, body = packer.pack_set.max_seqs, packer.pack_set.seq_len - (bos_id is not None)
    sequences = tokens // body if max_seqs is None else min(max_seqs, tokens // body)
    with writing(directory / INDEX, then=KEPT):
        write_json(directory / INDEX, {**packer.index_fields(bos_id), "sequences": sequences, "tokens": tokens,
                                       "units": units})
    return directory


def _already_packed(directory: Path, packer: _Packer, bos_id) -> bool:
    """Whether directory holds this set's finished packing, each file as index.json records it; refuse one packed
    otherwise. With a warning: a packing of text since changed, or damaged units, are removed to be packed again;
    an index without hashes (packed before they were kept) is written again with them."""
    index = read_json(directory / INDEX)
    if index is None:
        return False
    s, want = packer.pack_set, packer.index_fields(bos_id)
    differ = {k: (index.get(k), v) for k, v in want.items() if index.get(k) != v}
    if set(differ) == {"text_hash"}:
        warnings.warn(f"{directory}: {s.name}/{s.split}'s text changed since it was packed (or it was packed before "
                      f"its text's hash was kept): packing it again")
        _remove(directory, [u["unit"] for u in index["units"]])
        return False
    if differ:
        raise ValueError(f"{directory} holds another packing ({{field: (there, asked)}}: {differ}); "
                         f"pack into another --out, or remove it")
    damaged = _damaged(directory, index)
    if damaged:
        warnings.warn("; ".join(f"shard {directory / f} {why}" for f, why in damaged.items()) + ": packing it again")
        _remove(directory, [u["unit"] for u in index["units"] if u["file"] in damaged])
        return False
    if any("hash" not in u for u in index["units"]):
        warnings.warn(f"{directory / INDEX} was written before content hashes were kept: recorded the content hashes "
                      f"of its shards as they are now")
        return False  # every unit is finished: _finalize writes index.json again, with the hashes
    return True


def _damaged(directory: Path, index: dict, verify=True) -> dict[str, str]:
    """{file: what is wrong} for each unit in index.json whose file is missing, truncated, or (verify) altered."""
    bad = {}
    for unit in index["units"]:
        path = directory / unit["file"]
        try:
            tokens, size = np.load(path, mmap_mode="r").shape, path.stat().st_size
        except (OSError, ValueError) as err:
            bad[unit["file"]] = f"is missing or unreadable ({err})"
        else:
            if tokens != (unit["tokens"],) or size != unit.get("bytes", size):
                bad[unit["file"]] = f"holds {tokens} tokens in {size:,} bytes, index.json says {unit['tokens']} in " \
                                    f"{unit.get('bytes')}: a partial shard"
            elif verify and "hash" in unit and file_hash(path) != unit["hash"]:
                bad[unit["file"]] = "differs from its hash in index.json (edited or damaged)"
    return bad


def _remove(directory: Path, units: list[int]) -> None:
    """Remove index.json, then the files of units (index first: a kill in between leaves a set still to finish)."""
    (directory / INDEX).unlink(missing_ok=True)
    for u in units:
        for ext in ("json", "npy"):
            (directory / _name(u, ext)).unlink(missing_ok=True)


def _embedded_documents(s: PackSet) -> int | None:
    if s.name not in EMBEDDED or s.split not in EMBEDDED[s.name]["splits"]:
        return None
    with gzip.open(DATA_DIR / "text" / EMBEDDED[s.name]["splits"][s.split], "rt") as f:
        return len(_documents({"text": [f.read()]}, how=EMBEDDED[s.name]["documents"])["text"])


def _embedded_bytes(s: PackSet) -> int:
    with gzip.open(DATA_DIR / "text" / EMBEDDED[s.name]["splits"][s.split], "rb") as f:
        return len(f.read())
