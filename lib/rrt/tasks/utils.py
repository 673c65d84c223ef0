"""Helpers for the offline lm-eval task YAMLs here: the vendored datasets (`load_vendored`) and per-task doc functions.

The doc functions reproduce lm-evaluation-harness 0.4.13 (EleutherAI, MIT licence):
lm_eval/tasks/hellaswag/utils.py and lm_eval/tasks/winogrande/preprocess_winogrande.py.
"""
import re
from pathlib import Path

import datasets

# lib/rrt/tasks/utils.py -> the repository root is three levels up; never ../shared at run time.
TASK_DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "tasks"


def load_vendored(folder, **metadata):
    """Returns a DatasetDict of data/tasks/<folder>/<split>.jsonl.gz, read with datasets' json builder.

    lm-eval calls this (`custom_dataset`) with the task's metadata and dataset_kwargs as keywords.
    """
    files = {p.name.removesuffix(".jsonl.gz"): str(p) for p in sorted((TASK_DATA_DIR / folder).glob("*.jsonl.gz"))}
    if not files:
        raise ValueError(f"no vendored data for task folder {folder!r} under {TASK_DATA_DIR}")
    return datasets.load_dataset("json", data_files=files)


# --- HellaSwag (lm_eval/tasks/hellaswag/utils.py) ---
def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset):
    """lm-eval's process_docs over the vendored layout {query, endings, label}.

    The vendored query is already activity_label + ": " + ctx_a + " " + ctx_b, with ctx_b as in the
    data (lower-case); lm-eval capitalises ctx_b. ctx_b is the trailing noun phrase after the last
    sentence of ctx_a, so we capitalise what follows the last ". " when it starts lower-case.
    """
    def _process_doc(doc):
        return {"query": preprocess(_capitalise_last_fragment(doc["query"])),
                "choices": [preprocess(ending) for ending in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(_process_doc)


def _capitalise_last_fragment(query):
    head, sep, tail = query.rpartition(". ")
    if sep and tail[:1].islower():
        # str.capitalize also lower-cases the rest, as lm-eval does to ctx_b
        return head + sep + tail.capitalize()
    return query


# --- WinoGrande (lm_eval/tasks/winogrande/preprocess_winogrande.py) ---
def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
