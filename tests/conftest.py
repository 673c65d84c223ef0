"""Fixtures: tiny random models of every supported family (built once per session)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub (read at import time)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

import rrt  # noqa: E402
from rrt.models import TINY  # noqa: E402


@pytest.fixture(scope="session", params=TINY)
def tiny(request):
    """(name, model, tokenizer) for each tiny family; tests must not modify the model."""
    model, tok = rrt.load_model(request.param)
    return request.param, model, tok


@pytest.fixture(scope="session")
def tiny_ids(tiny):
    """A [2, 17] batch of token ids for the tiny models (odd length on purpose)."""
    _, _, tok = tiny
    texts = ["The quick brown fox jumps over!", "Loops share one block of layers."]
    return tok(texts, return_tensors="pt", padding=True).input_ids[:, :17]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (embedded GGUF), fp32."""
    return rrt.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is ~30x faster than two on a loaded 2-core machine (contention)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def char_tok():
    """The tiny models' character-level tokenizer (vocab 99, with EOS, no BOS added)."""
    return rrt.load_model("tiny-llama")[1]


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """The characters again, from a tokenizer that puts its BOS <s> (id 1) first as Llama's and Gemma's do."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = rrt.models.tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("bos_tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)

