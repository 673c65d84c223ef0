"""Evaluation: token-weighted perplexity (`perplexity`, `token_nll`, per loop: `per_loop_perplexity`), lm-eval
few-shot accuracy (`few_shot`, per loop: `loop_idx` or `per_loop_few_shot`) with the gold answer's log-likelihood
beside it (`gold_score`, `gold_summary`), tidy results on disk (`save_results`).

Loops are counted from 0 (`loop_idx`); exiting every token at loop_idx b is the paper's static
exiting (§3.7): loop b's hidden state through the final norm and the shared LM head.
"""
import contextlib
import io
import json
import logging
import math
import numbers
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from rrt import rundir
from rrt.data import SOURCES
from rrt.recursive import loop_logits
from rrt.spec import num_loops

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# The paper's seven tasks (§3.1) with its metric: length-normalised accuracy except LAMBADA and
# WinoGrande. Keys are lm-eval's own task names (source="hub"); the embedded YAMLs add "rrt_".
TASKS = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
         "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
# Where an embedded task's requests may differ from lm-eval's built-in task on hub data: every other task's
# are identical (tests/test_evaluation.py builds both over the vendored files).
EMBEDDED_DIFFERENCES = {
    "hellaswag": "the vendored rows lack activity_label, ctx_a and ctx_b, so the prompts are rebuilt from `query` "
                 "by a heuristic that cannot restore every case (data/README.md), and there is no train split, so "
                 "few-shot examples come from validation (lm-eval: train)"}
# Accuracy of a uniform guess: 1 / choices (LAMBADA is open-vocabulary: 0).
CHANCE = {"lambada_openai": 0.0, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "openbookqa": 0.25}


def chance_level(tasks) -> float:
    """The mean chance accuracy of `tasks` (the chance line of an "average accuracy" axis)."""
    return sum(CHANCE[t] for t in tasks) / len(tasks)


def perplexity(model, sequences, *, batch_size=8, loop_idx=None, stride=None, bos_token_id=None):
    """Returns exp(mean NLL per predicted token) of `model` over packed `sequences` (Dataset of `input_ids`, or a tensor).

    Token-weighted: every predicted token counts once, whatever sequence it is in. loop_idx=None scores
    model(x).logits; an int scores loop loop_idx's exit (`rrt.loop_logits`). With `stride`, the
    sequences are joined into one stream and scored by a sliding window of the sequence length moving by
    `stride` tokens, each token scored once with up to seq_len - 1 tokens of context.
    bos_token_id: the BOS every sequence starts with (`rrt.data.packed_bos`; checked), or None. A BOS is
    context only; with `stride`, the BOSes are taken out of the stream and every window starts with one.
    """
    out = token_nll(model, sequences, batch_size=batch_size, loop_idx=loop_idx, stride=stride,
                    bos_token_id=bos_token_id)
    return math.exp(out["nll"] / out["tokens"])


def token_nll(model, sequences, *, batch_size=8, loop_idx=None, stride=None, bos_token_id=None):
    """Returns {"nll": summed NLL in nats, "tokens": scored tokens}, counted as `perplexity` counts them (to pool sets)."""
    nll, tokens = _nll(model, sequences, batch_size=batch_size, loop_idxs=[loop_idx], stride=stride,
                       bos_token_id=bos_token_id)
    return {"nll": nll[0], "tokens": tokens}


def per_loop_perplexity(model, sequences, *, batch_size=8, stride=None, bos_token_id=None):
    """Returns a DataFrame (loop_idx, perplexity, nll, tokens), one row per loop exit, from one forward per batch."""
    nll, tokens = _nll(model, sequences, batch_size=batch_size, loop_idxs=None, stride=stride,
                       bos_token_id=bos_token_id)
    return pd.DataFrame({"loop_idx": range(len(nll)), "perplexity": [math.exp(n / tokens) for n in nll],
                         "nll": nll, "tokens": tokens})


@torch.no_grad()
def _nll(model, sequences, *, batch_size, loop_idxs, stride, bos_token_id):
    """Returns ([summed NLL per requested exit], number of scored tokens); loop_idxs=None means every loop."""
    ids = sequences if torch.is_tensor(sequences) else torch.tensor(sequences["input_ids"])  # [n_seqs, seq_len]
    ids = ids.long()
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"sequences must be [n_seqs >= 1, seq_len >= 2] token ids, got shape {tuple(ids.shape)}")
    if not _is_positive_int(batch_size):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if stride is not None and not _is_positive_int(stride):
        raise ValueError(f"stride must be None or an int >= 1, got {stride!r}")
    if bos_token_id is not None and not (ids[:, 0] == bos_token_id).all():
        raise ValueError(f"bos_token_id={bos_token_id} but not every sequence starts with it (first tokens "
                         f"{ids[:5, 0].tolist()}...): pack with load_packed(bos=True), or pass bos_token_id=None")
    windows = _windows(ids, stride, bos_token_id)
    device = next(model.parameters()).device
    sums, tokens = None, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        x = torch.stack([w for w, _ in batch]).to(device)       # [batch, seq_len]
        n_score = torch.tensor([n for _, n in batch], device=device)
        logits = _exits(model, x, loop_idxs)
        targets = x[:, 1:]
        # score only each window's last n_score targets: the earlier ones were scored by the previous window
        pos = torch.arange(targets.shape[1], device=device)
        mask = pos[None, :] >= targets.shape[1] - n_score[:, None]  # [batch, seq_len - 1]
        # at least fp32 for the log-softmax (bf16 logits lose the tail); fp64 stays fp64
        batch_sums = [(F.cross_entropy(lg[:, :-1].to(torch.promote_types(lg.dtype, torch.float32)).transpose(1, 2),
                                       targets, reduction="none") * mask).sum().item() for lg in logits]
        sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
        tokens += int(mask.sum())
    return sums, tokens


def _is_positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _exits(model, x, loop_idxs):
    """Returns the list of logits [batch, seq, vocab] asked for: ordinary, one loop, or every loop."""
    if loop_idxs == [None]:
        return [model(input_ids=x).logits]
    exits = loop_logits(model, x)
    if loop_idxs is None:
        return exits
    for b in loop_idxs:
        if not -len(exits) <= b < len(exits):
            raise ValueError(f"loop_idx={b} out of range for a model with {len(exits)} loops (0..{len(exits) - 1})")
    return [exits[b] for b in loop_idxs]


def _windows(ids, stride, bos_token_id=None):
    """Returns [(window [seq_len], how many of its last targets to score)]: the sequences as they are, or sliding.

    With bos_token_id (every sequence starts with it), a sliding window is that BOS then the
    seq_len - 1 stream tokens ending where the window ends: the model always sees text as it was
    trained to, and the BOS is context only (it is never a target).
    """
    seq_len = ids.shape[1]
    if stride is None:
        return [(row, seq_len - 1) for row in ids]
    if not 1 <= stride <= seq_len - 1:
        raise ValueError(f"stride={stride} must be in 1..seq_len-1={seq_len - 1}")
    prefix = ids[0, :0] if bos_token_id is None else ids[0, :1]  # [] or [BOS]
    body = seq_len - len(prefix)  # stream tokens per window
    stream = ids[:, len(prefix):].reshape(-1)  # the corpus tokens, without the packed BOSes
    # Windows end at body, body + stride, ...; the first scores all its targets, later
    # ones only the `stride` new tokens. A tail shorter than `stride` is dropped (equal lengths batch).
    out = [(torch.cat([prefix, stream[:body]]), seq_len - 1)]
    for end in range(body + stride, len(stream) + 1, stride):
        out.append((torch.cat([prefix, stream[end - body:end]]), stride))
    return out


def few_shot(model, tokenizer, *, tasks=tuple(TASKS), limit=None, loop_idx=None, source="embedded",
             num_fewshot=None, batch_size=8, model_name="model", seed=1234):
    """Returns a DataFrame, one row per task: (model, task, loop_idx, metric, value, stderr, n, num_fewshot, source,
    gold_ll, gold_ll_stderr, gold_margin): accuracy, and the gold answer's log-likelihood (`gold_summary`).

    Runs lm-eval's HFLM on the in-memory model. source (`rrt.data.SOURCES`, a study's data_source):
    "embedded" uses the task YAMLs in rrt/tasks over the vendored benchmarks (no network; warns where
    they may differ from lm-eval's: EMBEDDED_DIFFERENCES); "hub" uses lm-eval's built-in tasks on their
    hub datasets, as the paper ran them (§3.1; offline once `download_tasks` has cached them).
    num_fewshot=None keeps each task's default (zero-shot for all seven). With loop_idx, lm-eval
    sees loop loop_idx's logits for every token (static exiting, §3.7).
    """
    if loop_idx is not None and not -num_loops(model) <= loop_idx < num_loops(model):
        raise ValueError(f"loop_idx={loop_idx} out of range for a model with {num_loops(model)} loops")
    if not (_is_positive_int(batch_size) or isinstance(batch_size, str) and batch_size.startswith("auto")):
        raise ValueError(f"batch_size must be an int >= 1 or lm-eval's 'auto' / 'auto:N', got {batch_size!r}")
    with quiet_lm_eval():  # HFLM warns on every in-memory model
        lm = _loop_lm(model, tokenizer, loop_idx=loop_idx, batch_size=batch_size)
    return pd.DataFrame(few_shot_rows(lm, tasks=tasks, limit=limit, source=source, num_fewshot=num_fewshot,
                                      seed=seed, model_name=model_name, loop_idx=loop_idx))


def few_shot_rows(lm, *, tasks, limit, source, num_fewshot, seed, model_name, loop_idx=None):
    """Returns `few_shot`'s rows (one dict per task) from lm-eval's simple_evaluate on the lm-eval LM `lm`.

    Shared by `few_shot` (HFLM over the model) and `rrt.serving.scoring.served_few_shot` (the engine);
    checks tasks, source and limit before lm-eval runs anything.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    _check_task_args(tasks=tasks, source=source, limit=limit)
    if source == "embedded":
        for task in set(tasks) & set(EMBEDDED_DIFFERENCES):
            warnings.warn(f"{task} (source='embedded') may score differently from lm-eval's {task}: "
                          f"{EMBEDDED_DIFFERENCES[task]}; source='hub' runs lm-eval's own task", stacklevel=2)
    prefix = "rrt_" if source == "embedded" else ""
    # include_defaults=False: indexing lm-eval's thousands of built-in YAMLs costs seconds per call
    manager = (TaskManager(include_path=str(TASKS_DIR), include_defaults=False) if source == "embedded"
               else TaskManager())
    with quiet_lm_eval():
        out = lm_eval.simple_evaluate(model=lm, tasks=[prefix + t for t in tasks], task_manager=manager,
                                      num_fewshot=num_fewshot, limit=limit, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=True)
    rows = []
    for task in tasks:
        result, metric = out["results"][prefix + task], TASKS[task]
        rows.append({"model": model_name, "task": task, "loop_idx": loop_idx, "metric": metric,
                     "value": result[f"{metric},none"], "stderr": result.get(f"{metric}_stderr,none"),
                     "n": out["n-samples"][prefix + task]["effective"],
                     "num_fewshot": out["n-shot"][prefix + task], "source": source,
                     **gold_summary(out["samples"][prefix + task], task=task)})
    return rows


def gold_summary(samples, *, task) -> dict:
    """Returns {gold_ll, gold_ll_stderr, gold_margin} over lm-eval's logged `samples` of `task` (`gold_score` each).

    gold_ll: the mean over examples of the gold answer's log-likelihood (nats; per character where the task's
    metric is acc_norm), the quantity whose per-example argmax is the accuracy; stderr = std / sqrt(n).
    Below the paper's scale every model is at chance, but this still separates them (issue 30).
    gold_margin: the mean of gold minus the best wrong choice (> 0 on the examples counted correct; NaN on
    LAMBADA, which has no choices)."""
    scores = [gold_score(s, task=task) for s in samples]
    if not scores:
        return {"gold_ll": math.nan, "gold_ll_stderr": math.nan, "gold_margin": math.nan}
    gold, margin = (torch.tensor(x, dtype=torch.float64) for x in zip(*scores))
    stderr = gold.std().item() / math.sqrt(len(gold)) if len(gold) > 1 else math.nan
    return {"gold_ll": gold.mean().item(), "gold_ll_stderr": stderr, "gold_margin": margin.mean().item()}


def gold_score(sample, *, task) -> tuple[float, float]:
    """Returns (log-likelihood of the gold answer, it minus the best wrong choice's) for one lm-eval logged sample.

    A sample (lm_eval.evaluator, log_samples=True) holds "filtered_resps": one (loglikelihood, is_greedy) per
    choice, "arguments": one (context, continuation) per choice, "target" and "doc". As lm-eval scores
    acc_norm (TASKS[task]), each choice's log-likelihood is divided by its length in characters (without
    the space lm-eval puts before it). A loglikelihood task (LAMBADA) has one response: the target's own,
    margin NaN.
    """
    lls = [float(resp[0]) for resp in sample["filtered_resps"]]
    if len(lls) == 1:
        return lls[0], math.nan
    if TASKS[task] == "acc_norm":
        lls = [ll / max(1, len(_choice_text(args[1]))) for ll, args in zip(lls, sample["arguments"])]
    gold = _gold_index(sample, task)
    if not 0 <= gold < len(lls):
        raise ValueError(f"{task}: gold answer {gold} is not one of the {len(lls)} choices (doc {sample.get('doc_id')})")
    return lls[gold], lls[gold] - max(ll for i, ll in enumerate(lls) if i != gold)


def _choice_text(continuation: str) -> str:
    """The choice as doc_to_choice gives it: lm-eval sends it after target_delimiter (" " in all seven tasks)."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def _gold_index(sample, task) -> int:
    """The gold choice's index: the target (an index, or the choice's text); WinoGrande's choices are contexts
    (lm-eval's multiple_input) and its target the shared continuation, so its gold is doc["answer"] ("1" | "2")."""
    if task == "winogrande":
        return int(sample["doc"]["answer"]) - 1
    target = sample["target"]
    if isinstance(target, numbers.Integral):  # lm-eval turns a digit-string target into an int itself
        return int(target)
    choices = [_choice_text(args[1]) for args in sample["arguments"]]
    if target not in choices:
        raise ValueError(f"{task}: target {target!r} is neither an index nor one of the choices {choices}")
    return choices.index(target)


def download_tasks(tasks=tuple(TASKS)):
    """Loads lm-eval's built-in `tasks` once, so that their hub datasets are in the HF cache for offline jobs."""
    from lm_eval.tasks import TaskManager

    _check_task_args(tasks=tasks, source="hub", limit=None)
    with quiet_lm_eval():
        TaskManager().load(list(tasks))  # building a task downloads its dataset


@contextlib.contextmanager
def quiet_lm_eval():
    """Hide lm-eval's warnings and progress bars within the block (what it wrote is shown if it raises).

    lm-eval warns on every call about what we do on purpose (an in-memory model: "`pretrained` model
    kwarg is not of type `str`"; our offline tasks: "Custom kwargs can be passed to `--metadata`") and
    draws three bars per task with plain tqdm on stderr, which it has no switch to turn off (its
    `Task.build_all_requests` bar): in a notebook each is a block of output per evaluation.
    """
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    written = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(written):
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    except BaseException:
        sys.stderr.write(written.getvalue())
        raise
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_task_args(*, tasks, source, limit):
    """Raises ValueError naming a bad task, source or limit (before any compute)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown task source {source!r}; known: {list(SOURCES)}")
    if limit is not None and not (_is_positive_int(limit) or isinstance(limit, float) and 0 < limit < 1):
        raise ValueError(f"limit must be None, an int >= 1 (documents per task) or a float in (0, 1) "
                         f"(lm-eval's fraction of each task), got {limit!r}")


def per_loop_few_shot(model, tokenizer, **kwargs):
    """Returns `few_shot`'s DataFrame for every loop exit of a recursive model, stacked (one row per task x loop_idx)."""
    return pd.concat([few_shot(model, tokenizer, loop_idx=b, **kwargs) for b in range(num_loops(model))],
                     ignore_index=True)


def _loop_lm(model, tokenizer, *, loop_idx, batch_size):
    """Returns lm-eval's HFLM over `model`, reading loop loop_idx's logits when loop_idx is set."""
    from lm_eval.models.huggingface import HFLM

    class LoopLM(HFLM):
        # HFLM scores through _model_call(inps) -> logits; swapping that one call is the whole change.
        def _model_call(self, inps, attn_mask=None, labels=None):
            if loop_idx is None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            with torch.no_grad():
                return loop_logits(self.model, inps)[loop_idx]

    return LoopLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def save_results(df, out_dir, *, params, name="results", versions=None):
    """Writes `name`.csv and `name`.json (rows + the params that produced them + package versions, taken now
    unless given); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, js = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    rundir.write_csv(csv, df)
    record = {"params": params, "versions": versions or rundir.versions(),
              "rows": json.loads(df.to_json(orient="records"))}
    rundir.write_json(js, record)
    return csv, js
