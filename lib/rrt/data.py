"""Corpora for uptraining and perplexity (`load_corpus`), packed into fixed-length sequences (`pack`, `load_packed`).

Two sources give the same `datasets` objects with a `text` column, one document a row:
"embedded" reads the real text vendored in the repository's `data/text` (offline, CPU scale);
"hub" streams the paper's corpora by name (SlimPajama, RedPajama, PG19; cluster scale, §3).
At cluster scale packing is its own step before training (`rrt.shards`, `make pack`): the same sequences,
written once as resumable shard files that every training job reads memory-mapped.
A packed cache carries a sidecar with its source text's hash and its own (`rrt.caches`), verified whenever it is
loaded: an edited, truncated or stale one is packed again, with a warning naming it.
"""
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import datasets
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from rrt.caches import cache_problem, file_hash, remove_stale_temps, sidecar, temp_name, write_sidecar, writing

# The library is installed editable from lib/rrt, so the repository root is two levels up.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"

# name -> split -> vendored file (under data/text), and how its text is cut into documents.
EMBEDDED = {
    # WikiText-2's train split could not be vendored (data/README.md): uptrain on validation.
    "wikitext2": {"splits": {"validation": "wikitext-2/valid.txt.gz", "test": "wikitext-2/test.txt.gz"},
                  "documents": "wiki_articles"},
    "wikitext2-raw": {"splits": {"test": "wikitext-2/wiki.test.raw.gz"}, "documents": "wiki_articles"},
    # Stand-ins for the paper's held-out sets (SlimPajama, RedPajama, PG19): books and stories.
    "sherlock": {"splits": {"test": "sherlock/sherlock.txt.gz"}, "documents": "gutenberg_body"},
    "tinyshakespeare": {"splits": {"test": "tinyshakespeare/input.txt.gz"}, "documents": "whole"},
    "tinystories": {"splits": {"test": "tinystories/tinystories.txt.gz"}, "documents": "whole"},
}

# name -> load_dataset arguments and our split -> the hub split. Never fetched in tests.
HUB = {
    "slimpajama": {"args": {"path": "cerebras/SlimPajama-627B"},
                   "splits": {"train": "train", "validation": "validation", "test": "test"}},
    # RedPajama publishes no test split: the paper's "RedPajama test" is not public. We score its 1B-token
    # sample, whose one split is a sample of the 1T train split (named "sample" here for that); we never
    # train on it. It ships a loading script (unsupported by datasets >= 4): read its JSON lines directly.
    "redpajama": {"args": {"path": "json", "data_files":
                           "hf://datasets/togethercomputer/RedPajama-Data-1T-Sample/*.jsonl"},
                  "splits": {"sample": "train"}},
    # deepmind/pg19 is script-based too; emozilla/pg19 is its Parquet copy with the same splits.
    "pg19": {"args": {"path": "emozilla/pg19"},
             "splits": {"train": "train", "validation": "validation", "test": "test"}},
}
SOURCES = ("embedded", "hub")
# Former names, still read (run files written before a rename run as they did): (name, old split) -> split.
RENAMED_SPLITS = {("redpajama", "test"): "sample"}


def load_corpus(name, split, *, source="embedded", streaming=None, cache_dir=None):
    """Returns corpus `name`'s `split` as a datasets Dataset (IterableDataset when streaming), column `text`.

    streaming defaults to False for "embedded" and True for "hub" (SlimPajama is 627B tokens).
    """
    if split not in _splits(name, source) and (name, split) in RENAMED_SPLITS:
        warnings.warn(f"{name}/{split} is now {name}/{RENAMED_SPLITS[name, split]}: reading that", stacklevel=2)
        split = RENAMED_SPLITS[name, split]
    check_corpus(name, split, source=source)
    splits = _table(source)[name]["splits"]
    if source == "hub":
        ds = datasets.load_dataset(**HUB[name]["args"], split=splits[split],
                                   streaming=True if streaming is None else streaming, cache_dir=cache_dir)
        return ds.select_columns(["text"])
    # The "text" builder reads the gzipped file whole (one row) like any local file; cutting it into
    # documents is a map, so the result is the same kind of object as the hub path's.
    path = DATA_DIR / "text" / splits[split]
    ds = datasets.load_dataset("text", data_files={split: str(path)}, sample_by="document", split=split,
                               streaming=bool(streaming), cache_dir=cache_dir)
    return ds.map(_documents, batched=True, fn_kwargs={"how": EMBEDDED[name]["documents"]})


def check_corpus(name, split, *, source="embedded"):
    """Raise ValueError naming the known corpora (or the corpus' splits) unless `name`/`split` is one of `source`'s
    (a former split name, RENAMED_SPLITS, counts: it is read under its new name)."""
    splits = _splits(name, source)
    if split not in splits and (name, split) not in RENAMED_SPLITS:
        raise ValueError(f"corpus {name!r} ({source}) has no split {split!r}; known: {sorted(splits)}")


def _splits(name, source):
    table = _table(source)
    if name not in table:
        raise ValueError(f"unknown {source} corpus {name!r}; known: {sorted(table)}")
    return table[name]["splits"]


def corpora(source="embedded"):
    """Returns {name: [splits]} of the corpora known for `source`."""
    return {name: sorted(spec["splits"]) for name, spec in _table(source).items()}


PACKED = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
PACKED_CACHE = Path.home() / ".cache" / "rrt" / "packed"  # the notebooks' and the hub CLI's default cache_dir


def train_seqs_to_pack(max_seqs, source, *, steps, batch_size, grad_accum, processes=1):
    """Return max_seqs; for a hub corpus with no cap, the sequences `steps` steps read over all processes
    (SlimPajama is 627B tokens: packing all of it is never what a run needs)."""
    if max_seqs is None and source == "hub":
        return steps * batch_size * grad_accum * processes
    return max_seqs


def load_packed(name, split, *, tokenizer, seq_len, source="embedded", cache_dir=None, max_seqs=None,
                streaming=None, bos=None):
    """Returns corpus `name`/`split` packed into `seq_len`-token sequences (`pack`), cached under cache_dir.

    bos as in `pack` (None: the tokenizer's own default, `packed_bos`). The cache key is the
    tokenizer's vocabulary and special tokens, the source, name, split, seq_len, max_seqs and the
    BOS the sequences start with; a second call with the same key loads the sequences from disk.
    With a cache_dir the sequences are written to an Arrow file as they are packed and read back
    memory-mapped, so a cluster-scale corpus never has to fit in memory.
    """
    if cache_dir is None:
        ds = load_corpus(name, split, source=source, streaming=streaming)
        return pack(ds, tokenizer, seq_len, max_seqs=max_seqs, bos=bos, desc=f"packing {name}/{split}")
    bos_id = packed_bos(tokenizer, bos=bos)
    key = _cache_key(tokenizer=tokenizer, source=source, name=name, split=split, seq_len=seq_len, max_seqs=max_seqs,
                     bos=bos_id)
    path = Path(cache_dir) / f"{name}-{split}-{seq_len}-{key}.arrow"
    text_hash = source_hash(name, split, source=source)
    problem = cache_problem(path, source=text_hash)
    if problem is not None:
        if path.exists() or sidecar(path).exists():
            warnings.warn(f"packed cache {path}: {problem}; packing it again", stacklevel=2)
        _check_packable(tokenizer, seq_len)
        ds = load_corpus(name, split, source=source, streaming=streaming, cache_dir=cache_dir)
        seqs = _packed_sequences(ds, tokenizer, seq_len, max_seqs, bos_id, f"packing {name}/{split}")
        _write_packed(path, seqs, source=text_hash, need=None if max_seqs is None else max_seqs * (seq_len + 1) * 4)
        print(f"packed {name}/{split} into {path}")
    return datasets.Dataset.from_file(str(path))


def source_hash(name, split, *, source="embedded") -> str | None:
    """Return the content hash of an embedded corpus' vendored text file, what its packed caches are built from;
    None for a hub corpus (streamed: its name and split are all that is known of it here)."""
    splits = EMBEDDED.get(name, {}).get("splits", {}) if source == "embedded" else {}
    return file_hash(DATA_DIR / "text" / splits[split]) if split in splits else None


def _write_packed(path: Path, seqs, *, source: str | None, need: int | None) -> None:
    """Write packed sequences to the Arrow file path, then its sidecar. Written under a temporary name per process
    (ranks may pack at once) and renamed into place once complete, so an interrupted or failed packing never leaves
    a truncated cache behind, nor its temporary file; those of killed processes are removed first."""
    remove_stale_temps(path)
    partial = temp_name(path)
    with writing(path, partial, need=need, then="no partial file is kept: free space and load it again"):
        # datasets' own Arrow writer, flushed every 1000 rows
        with ArrowWriter(features=PACKED, path=str(partial), writer_batch_size=1000) as writer:
            for seq in seqs:
                writer.write({"input_ids": seq})
            writer.finalize()
        os.replace(partial, path)
        write_sidecar(path, source=source)


def pack(dataset, tokenizer, seq_len, *, max_seqs=None, bos=None, desc="packing"):
    """Returns a Dataset of `input_ids` sequences of exactly seq_len tokens: documents joined by EOS, the tail dropped.

    With a BOS (bos=None: when the tokenizer itself adds one, `packed_bos`; True/False: always/never),
    every sequence is BOS then seq_len - 1 corpus tokens, the way the model saw text in pretraining.
    Deterministic: documents are read in order, nothing is shuffled. Works on streamed datasets
    (stops once max_seqs sequences are full). Held in memory: `load_packed` with a cache_dir
    writes the same sequences to disk instead.
    """
    _check_packable(tokenizer, seq_len)
    seqs = _packed_sequences(dataset, tokenizer, seq_len, max_seqs, packed_bos(tokenizer, bos=bos), desc)
    return datasets.Dataset.from_dict({"input_ids": list(seqs)}, features=PACKED)


def packed_bos(tokenizer, *, bos=None):
    """Returns the BOS token id packed sequences start with, or None.

    bos=None follows the tokenizer's own default: a BOS when encoding text puts one first (Llama,
    Gemma; Gemma 3's says add_bos_token=False yet its post-processor adds <bos>, so we look at what
    it does), none otherwise (GPT-NeoX's bos is its eos and is never added; SmolLM2 adds none).
    """
    if bos is None:
        bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos not in (True, False):
        raise ValueError(f"bos={bos!r} must be None (the tokenizer's default), True or False")
    if bos and tokenizer.bos_token_id is None:
        raise ValueError(f"bos=True but tokenizer {tokenizer.name_or_path!r} has no BOS token")
    return tokenizer.bos_token_id if bos else None


def _check_packable(tokenizer, seq_len):
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (one input and one predicted token)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")


def _packed_sequences(dataset, tokenizer, seq_len, max_seqs, bos_id, desc):
    """Yields the packed sequences one by one: lists of seq_len token ids, [bos_id] + corpus tokens or corpus tokens."""
    prefix = [] if bos_id is None else [bos_id]
    body = seq_len - len(prefix)  # corpus tokens per sequence
    buffer, made = [], 0
    total = None if isinstance(dataset, datasets.IterableDataset) else len(dataset)
    with tqdm(total=total, desc=desc, unit="doc") as bar:
        for batch in dataset.iter(batch_size=64):
            # verbose=False: documents longer than the model's context are fine here, we cut them below
            for ids in tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]:
                buffer.extend(ids)
                buffer.append(tokenizer.eos_token_id)
            n = len(buffer) // body if max_seqs is None else min(len(buffer) // body, max_seqs - made)
            yield from (prefix + buffer[i * body:(i + 1) * body] for i in range(n))
            made += n
            buffer = buffer[n * body:]
            bar.update(len(batch["text"]))
            if max_seqs is not None and made >= max_seqs:
                break


def _table(source):
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {list(SOURCES)}")
    return EMBEDDED if source == "embedded" else HUB


_WIKI_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)  # " = Title = "; sections have "= =" or more
_GUTENBERG = re.compile(r"\*\*\* START OF .*?\*\*\*\n(.*)\n\*\*\* END OF ", re.DOTALL)


def _documents(batch, *, how):
    """Cuts each whole-file row into documents (batched map: a row may become many)."""
    docs = []
    for text in batch["text"]:
        text = text.replace("\r\n", "\n")
        if how == "wiki_articles":
            starts = [m.start() for m in _WIKI_TITLE.finditer(text)] or [0]
            docs += [text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)])]
        elif how == "gutenberg_body":
            # The Project Gutenberg header and licence footer are boilerplate, not the book.
            docs.append(_GUTENBERG.search(text).group(1).strip())
        else:
            docs.append(text.strip())
    return {"text": [d for d in docs if d]}


def _cache_key(*, tokenizer, **fields):
    """Returns a short hash of the tokenizer's vocabulary and special tokens and of the other fields."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab, tokenizer.all_special_tokens, fields], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
