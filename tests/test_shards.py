"""Packing as its own step (rrt.shards): byte-identical shards for any workers or parts, resumable, trimmed to
max_seqs, read back as the very sequences `load_packed` gives, refused when missing or partial."""
import json
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rrt import data, shards
from rrt.cli import main as cli_main
from rrt.data import load_corpus, load_packed
from rrt.evaluation import perplexity
from rrt.models import _tiny_model, tiny_tokenizer
from rrt.runs.execute import load_data
from rrt.runs.store import DataSpec
from rrt.shards import PackedShards, PackSet, pack_shards, token_dtype
from rrt.train.loop import _Sequences

WIKI = PackSet("wikitext2", "validation", "embedded", 97, None)  # 60 documents: 6 shards of 10
DOCS = 10


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def pack(tok, out, pack_set=WIKI, **kw):
    return pack_shards(pack_set, tok, out=out, docs_per_shard=DOCS, progress=False, **kw)


def files(directory):
    """{name: bytes} of every file in a directory."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def reference(tok, pack_set=WIKI, bos=None):
    """The sequences `load_packed` packs in-process, [n, seq_len]."""
    ds = load_packed(pack_set.name, pack_set.split, tokenizer=tok, seq_len=pack_set.seq_len, source=pack_set.source,
                     max_seqs=pack_set.max_seqs, bos=bos)
    return np.array(ds["input_ids"])


@pytest.fixture(scope="module")
def whole(tok, tmp_path_factory):
    """One worker, uninterrupted: the bytes every other way of packing must give."""
    return pack(tok, tmp_path_factory.mktemp("whole") / "p")


def test_one_and_two_workers_write_identical_bytes(tok, whole, tmp_path):
    two = pack(tok, tmp_path / "two", workers=2)
    assert files(two) == files(whole)
    assert sorted(files(whole)) == ["index.json"] + [f"tokens-{u:05d}.{e}" for u in range(6) for e in ("json", "npy")]


@pytest.mark.parametrize("bos", [None, True])
@pytest.mark.parametrize("max_seqs", [None, 50])
def test_reader_gives_load_packeds_sequences(tok, tmp_path, bos, max_seqs):
    pack_set = PackSet(WIKI.name, WIKI.split, WIKI.source, WIKI.seq_len, max_seqs)
    reader = PackedShards(pack_shards(pack_set, tok, out=tmp_path / "p", bos=bos, docs_per_shard=DOCS,
                                      progress=False))
    want = reference(tok, pack_set, bos=bos)
    assert len(reader) == len(want) and reader.shape == want.shape
    assert np.array_equal(reader["input_ids"], want)
    assert np.array_equal(reader.rows([5, 0, len(want) - 1]), want[[5, 0, len(want) - 1]])
    assert np.array_equal(reader[3]["input_ids"], want[3])
    if bos:
        assert (reader["input_ids"][:, 0] == tok.bos_token_id).all()


def test_train_and_perplexity_read_the_shards_as_load_packeds_dataset(tok, whole, tmp_path):
    """rrt.train's _Sequences (rows, fingerprint) and perplexity take the reader as they take the Dataset; the
    reader is fingerprinted by its files' hashes (verified when opened), not by reading every row again."""
    ds = load_packed(WIKI.name, WIKI.split, tokenizer=tok, seq_len=WIKI.seq_len, cache_dir=tmp_path)
    a, b = _Sequences(PackedShards(whole), "train_seqs"), _Sequences(ds, "train_seqs")
    assert a.shape == b.shape and a.fingerprint()["shape"] == b.fingerprint()["shape"]
    assert a.fingerprint()["hash"] == PackedShards(whole).content_hash()
    assert torch.equal(a[[7, 2, 9]], b[[7, 2, 9]])
    model = _tiny_model("tiny-llama")[0]
    head = PackSet(WIKI.name, WIKI.split, WIKI.source, WIKI.seq_len, 6)
    reader = PackedShards(pack(tok, tmp_path / "six", head))
    assert perplexity(model, reader) == perplexity(model, torch.tensor(reference(tok, head)))


def test_a_killed_pack_resumes_to_the_same_bytes_without_redoing_finished_shards(tok, whole, tmp_path):
    out = tmp_path / "p"

    def stop_after_two(u):
        if u == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        pack(tok, out, on_unit=stop_after_two)
    with pytest.raises(ValueError, match=r"index\.json is missing.*make pack"):
        PackedShards(out)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    assert sorted(finished) == ["tokens-00000.json", "tokens-00000.npy", "tokens-00001.json", "tokens-00001.npy"]
    # what a kill mid-unit leaves: a partial file, and a token file whose sidecar was never written
    (out / "tokens-00002.npy.partial").write_bytes(b"half")
    (out / "tokens-00003.npy").write_bytes(b"no sidecar")
    redone = []
    pack(tok, out, on_unit=redone.append)
    assert redone == [2, 3, 4, 5]
    assert files(out) == files(whole)
    assert {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in finished} == finished


def test_parts_cover_every_unit_exactly_once(tok, whole, tmp_path):
    out, seen = tmp_path / "p", []
    assert pack(tok, out, part=(1, 3), on_unit=seen.append) is None  # units of parts 0 and 2 still missing
    assert pack(tok, out, part=(0, 3), on_unit=seen.append) is None
    assert pack(tok, out, part=(2, 3), on_unit=seen.append) == out  # the last part writes index.json
    assert seen == [1, 4, 0, 3, 2, 5]
    assert files(out) == files(whole)
    assert shards.parse_part("2/3") == (2, 3)
    with pytest.raises(ValueError, match="K/N"):
        shards.parse_part("3/3")


def test_max_seqs_trims_to_the_exact_prefix_whatever_the_workers_or_parts(tok, tmp_path):
    full = pack(tok, tmp_path / "full")
    tokens = np.cumsum([u["tokens"] for u in PackedShards(full).index["units"]])
    max_seqs = int(tokens[2] // (WIKI.seq_len) - 3)  # ends inside unit 2 (no BOS: seq_len corpus tokens each)
    assert tokens[1] < max_seqs * WIKI.seq_len <= tokens[2]
    head = PackSet(WIKI.name, WIKI.split, WIKI.source, WIKI.seq_len, max_seqs)
    one = pack(tok, tmp_path / "one", head)
    assert [u["unit"] for u in PackedShards(one).index["units"]] == [0, 1, 2]
    assert sorted(files(one)) == ["index.json"] + [f"tokens-{u:05d}.{e}" for u in range(3) for e in ("json", "npy")]
    assert np.array_equal(PackedShards(one)["input_ids"], reference(tok, head))
    assert files(pack(tok, tmp_path / "two", head, workers=2)) == files(one)
    # part 1 alone runs past the prefix (units 1, 3, 5); part 0 then finishes it and removes what is not needed
    parts = tmp_path / "parts"
    assert pack(tok, parts, head, part=(1, 2)) is None and (parts / "tokens-00003.npy").exists()
    assert pack(tok, parts, head, part=(0, 2)) == parts
    assert files(parts) == files(one)


def test_the_smallest_dtype_holds_the_vocabulary(tok, whole, tmp_path):
    assert token_dtype(2 ** 16) == np.uint16 and token_dtype(2 ** 16 + 1) == np.uint32
    assert PackedShards(whole).index["dtype"] == "uint16" and np.load(whole / "tokens-00000.npy").dtype == np.uint16
    # a word-level vocabulary of 70,000: the corpus' words get ids above 65535
    words = sorted({w for t in load_corpus("tinystories", "test")["text"] for w in t.split()})
    vocab = {"<unk>": 0, "</s>": 1, **{f"filler{i}": 2 + i for i in range(70_000)}}
    vocab.update({w: len(vocab) + i for i, w in enumerate(words)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    stories = PackSet("tinystories", "test", "embedded", 33, None)
    reader = PackedShards(pack_shards(stories, big, out=tmp_path / "big", progress=False))
    assert reader.index["dtype"] == "uint32" and np.load(tmp_path / "big" / "tokens-00000.npy").dtype == np.uint32
    want = reference(big, stories)
    assert want.max() > 2 ** 16 and np.array_equal(reader["input_ids"], want)


def test_a_missing_or_partial_shard_is_an_error_naming_it_and_make_pack(tok, whole, tmp_path):
    broken = tmp_path / "p"
    broken.mkdir()
    for name, data in files(whole).items():
        (broken / name).write_bytes(data)
    np.save(broken / "tokens-00004.npy", np.load(whole / "tokens-00004.npy")[:-5])
    with pytest.raises(ValueError, match=r"tokens-00004\.npy holds .*partial.*make pack"):
        PackedShards(broken)
    (broken / "tokens-00002.npy").unlink()
    with pytest.raises(ValueError, match=r"tokens-00002\.npy is missing.*make pack"):
        PackedShards(broken)
    # training on a hub corpus reads only packed shards: nothing packed is an error, never a packing
    spec = DataSpec(train_corpus="slimpajama", train_split="train", data_source="hub", max_train_seqs=8,
                    eval_corpora=("pg19/test",), packed_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"slimpajama-train-128-\w+/index\.json is missing.*make pack"):
        load_data(spec, tok)


def test_a_directory_packed_otherwise_is_refused(tok, whole, tmp_path):
    with pytest.raises(ValueError, match="another packing.*seq_len"):
        pack(tok, whole, PackSet(WIKI.name, WIKI.split, WIKI.source, 65, None))
    out = tmp_path / "p"

    def kill(u):
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        pack(tok, out, on_unit=kill)
    with pytest.raises(ValueError, match="docs_per_shard=7"):
        pack_shards(WIKI, tok, out=out, docs_per_shard=7, progress=False)


def test_estimate_counts_what_packing_writes(tok, whole):
    spec = DataSpec(train_corpus="wikitext2", train_split="validation", seq_len=97, max_train_seqs=None,
                    eval_corpora=("wikitext2/test",), max_eval_seqs=32)
    train, held_out = shards.estimate(spec, vocab_size=99, docs_per_shard=DOCS)
    assert train.shards == len(PackedShards(whole).index["units"]) == 6
    assert train.dtype == "uint16" and train.disk_bytes == 2 * train.tokens
    assert held_out.sequences == 32 and held_out.tokens == 32 * 97
    assert held_out.cpu_hours == 32 * 97 / shards.PACK_RATE / 3600
    assert shards.estimate(spec, vocab_size=256_000)[0].dtype == "uint32"


def test_make_pack_writes_every_set_of_a_plan(tmp_path, capsys):
    assert cli_main(["pack", "01_init_ablation", "smoke", "--out", str(tmp_path), "--docs-per-shard", "25"]) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) >= 2 and all((tmp_path / d / "index.json").exists() for d in written)
    assert out.count(" -> ") == len(written) and "sequences of" in out


def test_a_streamed_corpus_is_packed_one_shard_per_file(tok, tmp_path, monkeypatch):
    """Hub units are the stream's own files (IterableDataset.shard): here four local JSON-lines files stand in."""
    docs = load_corpus("wikitext2", "test")["text"][:24]
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"part-{i}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": t, "meta": i}) + "\n" for t in docs[i::4]))
    monkeypatch.setitem(data.HUB, "local", {"args": {"path": "json", "data_files": [str(p) for p in paths]},
                                           "splits": {"test": "train"}})
    stream = PackSet("local", "test", "hub", 129, None)
    one = pack_shards(stream, tok, out=tmp_path / "one", progress=False)
    assert [u["tokens"] for u in PackedShards(one).index["units"]] == [
        sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs[i::4]) for i in range(4)]  # + EOS
    assert files(pack_shards(stream, tok, out=tmp_path / "two", workers=2, progress=False)) == files(one)
    assert np.array_equal(PackedShards(one)["input_ids"], reference(tok, stream))
