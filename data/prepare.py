"""Writes this folder's vendored data from the gathered copies (../shared/data); run once, by hand.

    python3 data/prepare.py /path/to/shared/data

Text corpora are copied byte for byte (gzipped). Benchmarks are rewritten into the field layout
of their Hugging Face hub copies (the one lm-eval's task YAMLs read), gzipped, one JSON object a
line, in the original order; see README.md for what each conversion does. Standard library only.
"""
import gzip
import json
import shutil
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
DST = Path(__file__).resolve().parent


def read(path):
    """Returns the text of `path`, gunzipping when its name ends in .gz."""
    path = SRC / path
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8")


def jsonl(path):
    return [json.loads(line) for line in read(path).splitlines() if line.strip()]


def write_jsonl(rows, path):
    path = DST / path
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 so re-running gives byte-identical files
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{path.relative_to(DST)}: {len(rows)} rows")


def write_text(text_path, path):
    path = DST / path
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = (SRC / text_path).read_bytes()
    if text_path.endswith(".gz"):
        raw = gzip.decompress(raw)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(raw)
    print(f"{path.relative_to(DST)}: {len(raw)} bytes")


def labels(path):
    return [int(x) for x in read(path).split()]


def openbookqa(row):
    """AI2 layout {id, question: {stem, choices: [{text, label}]}, answerKey} -> hub 'main' layout."""
    q = row["question"]
    return {"id": row["id"], "question_stem": q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]],
                        "label": [c["label"] for c in q["choices"]]},
            "answerKey": row["answerKey"]}


def main():
    # --- text corpora: originals, gzipped ---
    write_text("wikitext-2/valid.txt.gz", "text/wikitext-2/valid.txt.gz")
    write_text("wikitext-2/test.txt.gz", "text/wikitext-2/test.txt.gz")
    write_text("wikitext-2/raw/wiki.test.raw.gz", "text/wikitext-2/wiki.test.raw.gz")
    write_text("lm_text/gutenberg/sherlock.txt", "text/sherlock/sherlock.txt.gz")
    write_text("lm_text/tinyshakespeare/input.txt.gz", "text/tinyshakespeare/input.txt.gz")
    write_text("lm_text/tinystories_sample/tinystories.txt", "text/tinystories/tinystories.txt.gz")
    for name in ["wikitext-2/README", "wikitext-2/raw/README.md"]:
        out = DST / "text" / name.replace("raw/README.md", "README.raw.md")
        shutil.copyfile(SRC / name, out)

    # --- benchmarks, in the hub layout ---
    write_jsonl(jsonl("lambada/lambada_test.jsonl.gz"), "tasks/lambada_openai/test.jsonl.gz")
    write_jsonl(jsonl("hellaswag/hellaswag_val_full.derived.jsonl.gz"), "tasks/hellaswag/validation.jsonl.gz")
    dev = jsonl("piqa/dev.jsonl")
    for row, label in zip(dev, labels("piqa/dev-labels.lst"), strict=True):
        del row["id"]  # the hub copy has no id
        row["label"] = label
    write_jsonl(dev, "tasks/piqa/validation.jsonl.gz")
    write_jsonl(jsonl("piqa/train.derived_from_olmo_oe_eval.jsonl.gz"), "tasks/piqa/train.jsonl.gz")
    write_jsonl(jsonl("winogrande/winogrande_xl_validation.derived.jsonl"), "tasks/winogrande/validation.jsonl.gz")
    write_jsonl(jsonl("winogrande/winogrande_xl_train.derived_from_olmo_oe_eval.jsonl.gz"), "tasks/winogrande/train.jsonl.gz")
    for level in ["Easy", "Challenge"]:
        for split in ["train", "validation", "test"]:
            write_jsonl(jsonl(f"arc/ARC-{level}-{split}.jsonl"), f"tasks/arc_{level.lower()}/{split}.jsonl.gz")
    for split, name in [("train", "train.jsonl.gz"), ("validation", "dev.jsonl"), ("test", "test.jsonl")]:
        write_jsonl([openbookqa(r) for r in jsonl(f"openbookqa/{name}")], f"tasks/openbookqa/{split}.jsonl.gz")

    shutil.copytree(SRC / "licenses", DST / "licenses", dirs_exist_ok=True)


if __name__ == "__main__":
    main()
