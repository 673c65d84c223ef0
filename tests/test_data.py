"""Corpora and packing (rrt.data): the embedded path only; hub corpora are never fetched here."""
from pathlib import Path

import datasets
import pytest

from rrt import data


def char_stream(tok, texts):
    """The corpus tokens `pack` joins: each text's tokens, then EOS."""
    return [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


@pytest.mark.parametrize("name", sorted(data.EMBEDDED))
def test_embedded_corpora_load_as_datasets(name, tmp_path):
    for split in data.corpora()[name]:
        ds = data.load_corpus(name, split, cache_dir=tmp_path)
        assert isinstance(ds, datasets.Dataset) and ds.column_names == ["text"]
        assert len(ds) >= 1 and all(t.strip() for t in ds["text"])


def test_wikitext_is_cut_into_articles(tmp_path):
    test = data.load_corpus("wikitext2", "test", cache_dir=tmp_path)
    assert len(test) == 62  # top-level " = Title = " headings in the test split
    assert test[0]["text"].startswith("= Robert <unk> =")
    raw = data.load_corpus("wikitext2-raw", "test", cache_dir=tmp_path)
    assert len(raw) == 62 and raw[0]["text"].startswith("= Robert Boulter =") and "\r" not in raw[0]["text"]


def test_gutenberg_boilerplate_is_cut(tmp_path):
    text = data.load_corpus("sherlock", "test", cache_dir=tmp_path)[0]["text"]
    assert text.startswith("The Adventures of Sherlock Holmes") and "Project Gutenberg" not in text[-2000:]


def test_streaming_gives_the_same_documents(tmp_path):
    streamed = data.load_corpus("wikitext2", "validation", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert next(iter(streamed))["text"] == data.load_corpus("wikitext2", "validation", cache_dir=tmp_path)[0]["text"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: .*'tinystories'.*'wikitext2'"):
        data.load_corpus("wikitext103", "test")
    with pytest.raises(ValueError, match="known: \\['test', 'validation'\\]"):
        data.load_corpus("wikitext2", "train")
    with pytest.raises(ValueError, match="known: \\['embedded', 'hub'\\]"):
        data.load_corpus("wikitext2", "test", source="web")
    # hub names are checked before anything is fetched
    with pytest.raises(ValueError, match="known: .*'pg19'.*'slimpajama'"):
        data.load_corpus("c4", "test", source="hub")
    with pytest.raises(ValueError, match="known: \\['sample'\\]"):
        data.load_corpus("redpajama", "train", source="hub")


def test_redpajama_is_named_for_the_sample_of_its_train_split_and_its_old_name_still_reads(monkeypatch):
    loaded = []
    monkeypatch.setattr(datasets, "load_dataset", lambda **kwargs: loaded.append(kwargs) or
                        datasets.Dataset.from_dict({"text": ["a"], "meta": ["m"]}))
    assert data.corpora("hub")["redpajama"] == ["sample"]
    data.load_corpus("redpajama", "sample", source="hub")
    with pytest.warns(UserWarning, match="redpajama/test is now redpajama/sample"):
        data.load_corpus("redpajama", "test", source="hub")  # run files written before the rename
    assert loaded[0] == loaded[1] and loaded[0]["split"] == "train"
    assert loaded[0]["data_files"] == "hf://datasets/togethercomputer/RedPajama-Data-1T-Sample/*.jsonl"


def test_pack_joins_documents_with_eos_into_exact_sequences(char_tok):
    docs = datasets.Dataset.from_dict({"text": ["abc", "de", "fghij", "k"]})
    out = data.pack(docs, char_tok, 4)
    eos = char_tok.eos_token_id
    stream = []
    for t in ["abc", "de", "fghij", "k"]:
        stream += char_tok(t, add_special_tokens=False)["input_ids"] + [eos]
    assert len(stream) == 15
    assert out["input_ids"] == [stream[0:4], stream[4:8], stream[8:12]]  # the 3-token tail is dropped
    assert data.pack(docs, char_tok, 4, max_seqs=2)["input_ids"] == [stream[0:4], stream[4:8]]
    with pytest.raises(ValueError, match="seq_len=1"):
        data.pack(docs, char_tok, 1)


def test_packing_is_deterministic_and_cached(char_tok, tmp_path):
    first = data.load_packed("tinystories", "test", tokenizer=char_tok, seq_len=64, max_seqs=50, cache_dir=tmp_path)
    again = data.load_packed("tinystories", "test", tokenizer=char_tok, seq_len=64, max_seqs=50, cache_dir=tmp_path)
    fresh = data.load_packed("tinystories", "test", tokenizer=char_tok, seq_len=64, max_seqs=50)  # no cache
    assert len(first) == 50 and all(len(b) == 64 for b in first["input_ids"])
    assert first["input_ids"] == again["input_ids"] == fresh["input_ids"]
    cached = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tinystories-"))
    assert cached == [cached[0], cached[0] + ".json"]  # the Arrow file and its sidecar (rrt.caches)
    # another sequence length is another cache entry
    data.load_packed("tinystories", "test", tokenizer=char_tok, seq_len=32, max_seqs=50, cache_dir=tmp_path)
    assert len([p for p in tmp_path.glob("tinystories-*.arrow")]) == 2


def test_cached_packing_is_written_to_disk_and_read_memory_mapped(char_tok, tmp_path):
    packed = data.load_packed("wikitext2", "test", tokenizer=char_tok, seq_len=128, cache_dir=tmp_path)
    in_memory = data.pack(data.load_corpus("wikitext2", "test"), char_tok, 128)
    assert packed["input_ids"] == in_memory["input_ids"] and len(packed) > 1000
    # an Arrow file on disk, not a table in memory; nothing half-written left beside it
    assert [Path(f["filename"]).parent for f in packed.cache_files] == [tmp_path]
    assert not list(tmp_path.glob("*.partial"))


def test_a_hub_corpus_is_packed_to_the_studys_fixed_count_that_covers_every_run(monkeypatch, tmp_path, char_tok):
    """Never all of SlimPajama; the same set for every notebook of a scale, so a shared run is the same run."""
    import rrt.runs.execute
    from rrt.plans import Distillation, EarlyExit
    from rrt.shards import PackSet, packed_path
    calls = []
    monkeypatch.setattr(rrt.runs.execute, "load_packed", lambda name, split, **kw: calls.append((name, split, kw)))
    monkeypatch.setattr(rrt.runs.execute, "PackedShards", lambda path, **kw: calls.append(path))  # `make pack` wrote them
    hub = dict(model="tiny-llama", seq_len=2048, data_source="hub", train_corpus="slimpajama", train_split="train",
               eval_corpora=["pg19/test"], max_eval_seqs=4, steps=100, global_batch_size=16, batch_size=8)
    # Table 12's 75B full-size model reads post_steps past long_steps (App. M: new tokens): the count covers both
    study = Distillation(**hub, long_steps=300, post_steps=15, max_train_seqs=315 * 16)
    rrt.runs.execute.load_data(study.data_spec(), tokenizer=char_tok, cache_dir=tmp_path)
    assert calls == [packed_path(PackSet("slimpajama", "train", "hub", 2048, 315 * 16), char_tok),
                     packed_path(PackSet("pg19", "test", "hub", 2048, 4), char_tok)]
    with pytest.raises(ValueError, match=r"a hub corpus needs an explicit number of packed sequences, at least the 5040"):
        Distillation(**hub, long_steps=300, post_steps=15, max_train_seqs=300 * 16)
    # post-training on new tokens reads past the uptraining's: the count must cover both
    with pytest.raises(ValueError, match="at least the 3200 this plan reads"):
        EarlyExit(**hub, uptrain_steps=100, max_train_seqs=3199)
    # the vendored corpora are small: None means all of them
    calls.clear()
    study = Distillation(**{**hub, "data_source": "embedded", "train_corpus": "wikitext2", "train_split": "validation",
                            "eval_corpora": ["wikitext2/test"]}, long_steps=300)
    rrt.runs.execute.load_data(study.data_spec(), tokenizer=None, cache_dir=tmp_path)
    assert calls[0][2]["max_seqs"] is None


def test_packed_bos_is_what_the_tokenizer_itself_puts_first(char_tok, bos_tok):
    from transformers import PreTrainedTokenizerFast

    assert bos_tok("ab")["input_ids"] == [1] + char_tok("ab")["input_ids"]
    assert char_tok.bos_token_id == 1 and char_tok("ab")["input_ids"][0] != 1  # has a BOS, adds none
    assert data.packed_bos(bos_tok) == 1 and data.packed_bos(char_tok) is None
    # GPT-NeoX's kind: bos is eos and is never added
    neox = PreTrainedTokenizerFast(tokenizer_object=char_tok.backend_tokenizer, bos_token="</s>", eos_token="</s>")
    assert neox.bos_token_id == neox.eos_token_id and data.packed_bos(neox) is None
    # explicit: on or off whatever the tokenizer does
    assert data.packed_bos(bos_tok, bos=False) is None and data.packed_bos(char_tok, bos=True) == 1
    no_bos = PreTrainedTokenizerFast(tokenizer_object=char_tok.backend_tokenizer, eos_token="</s>")
    assert data.packed_bos(no_bos) is None
    with pytest.raises(ValueError, match="bos=True but tokenizer .* has no BOS"):
        data.packed_bos(no_bos, bos=True)
    with pytest.raises(ValueError, match="bos='yes' must be None"):
        data.packed_bos(char_tok, bos="yes")


def test_pack_starts_every_sequence_with_bos_when_the_tokenizer_adds_one(char_tok, bos_tok):
    texts = ["abc", "de", "fghij", "k", "lm"]
    docs = datasets.Dataset.from_dict({"text": texts})
    stream = char_stream(bos_tok, texts)
    assert stream == char_stream(char_tok, texts) and len(stream) == 18
    out = data.pack(docs, bos_tok, 4)["input_ids"]
    # BOS then 3 corpus tokens: 6 sequences, all of the stream in order, no tail left
    assert out == [[1] + stream[i:i + 3] for i in range(0, 18, 3)]
    assert data.pack(docs, bos_tok, 4, max_seqs=2)["input_ids"] == out[:2]
    # off: exactly what a tokenizer without a BOS gives
    assert data.pack(docs, bos_tok, 4, bos=False)["input_ids"] == data.pack(docs, char_tok, 4)["input_ids"] == [
        stream[0:4], stream[4:8], stream[8:12], stream[12:16]]
    assert data.pack(docs, char_tok, 4, bos=True)["input_ids"] == out


def test_packed_cache_keys_the_bos(bos_tok, tmp_path):
    kw = dict(tokenizer=bos_tok, seq_len=64, max_seqs=20, cache_dir=tmp_path)
    with_bos = data.load_packed("tinystories", "test", **kw)
    assert len(with_bos) == 20 and all(len(s) == 64 and s[0] == 1 and 1 not in s[1:] for s in with_bos["input_ids"])
    assert with_bos["input_ids"] == data.load_packed("tinystories", "test", **{**kw, "cache_dir": None})["input_ids"]
    assert data.load_packed("tinystories", "test", **kw, bos=True)["input_ids"] == with_bos["input_ids"]
    assert len(list(tmp_path.glob("tinystories-*.arrow"))) == 1  # None and True resolve to the same BOS
    without = data.load_packed("tinystories", "test", **kw, bos=False)
    assert len(list(tmp_path.glob("tinystories-*.arrow"))) == 2
    assert all(s[0] != 1 for s in without["input_ids"])
    # the same corpus tokens in the same order, 63 or 64 to a sequence
    body = [t for s in with_bos["input_ids"] for t in s[1:]]
    assert body == [t for s in without["input_ids"] for t in s][:len(body)]
    key = dict(tokenizer=bos_tok, source="embedded", name="tinystories", split="test", seq_len=64, max_seqs=20)
    assert data._cache_key(**key, bos=1) != data._cache_key(**key, bos=None)
