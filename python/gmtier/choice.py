"""Zero-shot choice evaluation: pick the alternative the language model finds most likely.

Two JSON-lines formats, told apart line by line:

* PARus / COPA: `premise`, `choice1`, `choice2`, `question` ("cause" or "effect"), `label`
  (0 or 1). As GPT-3 scored COPA ("because" / "so"), the premise becomes a prompt ending in a
  connective, "потому что" for a cause and "поэтому" for an effect, and each alternative is its
  continuation: the premise without its final punctuation, a comma, the connective; then a space
  and the alternative with its first letter lower-cased (unless it opens with an abbreviation
  such as "СССР"). "Мужчина сломал ногу." + cause + "Он упал с лестницы." is scored as the
  continuation " он упал с лестницы." of "Мужчина сломал ногу, потому что".
* Multiple choice: `premise` or `context`, `choices` (two or more strings), `label` (the index
  of the right one). The context as written (trailing spaces stripped) and each choice, stripped,
  after one space.

Every sequence starts with the end-of-text token (a document start, as in training). The
prompt and the continuation are tokenized separately (byte-level BPE splits before the
continuation's leading space anyway); where the two are longer than model.seq_len + 1 tokens,
the prompt loses its first tokens. Each alternative's score is the sum of its tokens'
log-probabilities given everything before them, and its mean per token; accuracy is reported
under both (the mean favours long alternatives less), with a 95 % Wilson interval. Sequences
are scored in batches of similar length, padded on the right (causal attention: padding never
reaches a real token; evaluation routes dropless by default, `model.eval_capacity_factor`, so
the padding takes no expert capacity either).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gmtier import progress
from gmtier.data import DataError, not_utf8

CONNECTIVES = {"cause": "потому что", "effect": "поэтому"}
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


@dataclass
class ChoiceItem:
    """One question: the prompt, the alternatives as they continue it, and the right one's index."""
    line: int
    kind: str  # "copa" or "mc"
    prompt: str
    continuations: list[str]
    label: int


def copa_prompt(premise: str, question: str) -> str:
    """The premise, its final punctuation replaced by ", " and the question's connective."""
    return premise.strip().rstrip(".!?…;:,").rstrip() + ", " + CONNECTIVES[question]


def copa_continuation(choice: str) -> str:
    """" " + the alternative, its first letter lower-cased (a capital would start a new sentence
    after the comma) unless its first word is an abbreviation (two capitals)."""
    c = choice.strip()
    return " " + (c if c[:2].isupper() else c[:1].lower() + c[1:])


def load_items(path: str | os.PathLike) -> list[ChoiceItem]:
    """The items of a JSON-lines file, or a DataError naming the line and what is wrong with it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    items = [_item(path, no, line) for no, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise DataError(f"{path}: no items; give one JSON object a line (PARus/COPA or multiple choice)")
    return items


def _item(path: Path, no: int, line: str) -> ChoiceItem:
    where = f"{path}:{no}"
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(r, dict):
        raise DataError(f"{where}: not a JSON object")

    def text(key: str) -> str:
        value = r.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: no text field '{key}'")
        return value

    def label(n: int) -> int:
        value = r.get("label")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise DataError(f"{where}: 'label' = {value!r}: expected the index of the right alternative, 0 to {n - 1}")
        return value

    if "choice1" in r or "choice2" in r:
        question = r.get("question")
        if question not in CONNECTIVES:
            raise DataError(f"{where}: 'question' = {question!r}: expected \"cause\" or \"effect\"")
        return ChoiceItem(no, "copa", copa_prompt(text("premise"), question),
                          [copa_continuation(text("choice1")), copa_continuation(text("choice2"))], label(2))
    if "choices" in r:
        context = text("premise" if "premise" in r else "context")
        choices = r["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of two or more non-empty strings")
        return ChoiceItem(no, "mc", context.rstrip(), [" " + c.strip() for c in choices], label(len(choices)))
    raise DataError(f"{where}: neither a PARus/COPA item (premise, choice1, choice2, question, label) nor a "
                    "multiple-choice item (premise or context, choices, label)")


@dataclass
class ChoiceSequence:
    """One (item, alternative) pair as tokens: `ids` (model input + the last target) and how many
    of the last targets are the alternative's."""
    item: int
    choice: int
    ids: list[int]
    n_cont: int


def sequences(items: list[ChoiceItem], tokenizer, eot_id: int, seq_len: int, path: str = "") -> list[ChoiceSequence]:
    prompts = [i.prompt for i in items]
    conts = [c for i in items for c in i.continuations]
    prompt_ids = [e.ids for e in tokenizer.encode_batch(prompts)]
    cont_ids = iter(e.ids for e in tokenizer.encode_batch(conts))
    out = []
    for k, item in enumerate(items):
        for j in range(len(item.continuations)):
            cont = next(cont_ids)
            if not 0 < len(cont) <= seq_len:
                raise DataError(f"{path}:{item.line}: alternative {j + 1} is {len(cont)} tokens; it must be 1 to "
                                f"model.seq_len = {seq_len}")
            ids = ([eot_id] + prompt_ids[k] + cont)[-(seq_len + 1):]  # the prompt's start goes first
            out.append(ChoiceSequence(k, j, ids, len(cont)))
    return out


@torch.no_grad()
def continuation_logprobs(model, seqs: list[ChoiceSequence], max_tokens: int, device: str, autocast) -> np.ndarray:
    """[len(seqs), 2]: each alternative's summed log-probability and its token count. Sequences
    go through the model longest first, padded on the right to the longest of their batch, as
    many a batch as fit `max_tokens` (a training batch's tokens: short items go many at once)."""
    out = np.zeros((len(seqs), 2))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    batches: list[list[int]] = []
    for i in order:
        if not batches or (len(batches[-1]) + 1) * (len(seqs[batches[-1][0]].ids) - 1) > max_tokens:
            batches.append([])
        batches[-1].append(i)
    for batch in progress.bar(batches, desc="scoring", unit="batch"):
        width = len(seqs[batch[0]].ids) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.zeros_like(x)
        for r, i in enumerate(batch):
            ids = torch.tensor(seqs[i].ids)
            x[r, :len(ids) - 1], y[r, :len(ids) - 1] = ids[:-1], ids[1:]
        with autocast():
            logits, _, _ = model(x.to(device))
        logp = F.log_softmax(logits.float(), -1).gather(-1, y.to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
        for r, i in enumerate(batch):
            end = len(seqs[i].ids) - 1
            out[i] = logp[r, end - seqs[i].n_cont:end].sum().item(), seqs[i].n_cont
    return out


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sound near 0 and 1 and for small n)."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(items: list[ChoiceItem], seqs: list[ChoiceSequence], scores: np.ndarray) -> dict:
    """Accuracy under the sum and the mean log-probability, their 95 % intervals, and each item's
    picks (`predictions`: [line, label, pick by sum, pick by mean])."""
    sums = [np.full(len(i.continuations), -np.inf) for i in items]
    means = [np.full(len(i.continuations), -np.inf) for i in items]
    for s, (total, n) in zip(seqs, scores):
        sums[s.item][s.choice], means[s.item][s.choice] = total, total / n
    picks = [(int(np.argmax(a)), int(np.argmax(b))) for a, b in zip(sums, means)]
    out: dict = {"items": len(items), "kinds": {k: sum(i.kind == k for i in items) for k in ("copa", "mc")}}
    for col, name in ((0, "sum"), (1, "mean")):
        correct = sum(p[col] == i.label for p, i in zip(picks, items))
        out[f"accuracy_{name}"] = correct / len(items)
        out[f"ci95_{name}"] = list(wilson(correct, len(items)))
    out["predictions"] = [[i.line, i.label, a, b] for i, (a, b) in zip(items, picks)]
    return out


def evaluate_choice(cfg, model, path: str | os.PathLike, max_tokens: int | None = None) -> dict:
    """Score a choice file with a loaded run's model (`gmtier.evaluate.load_run`), in batches of
    at most `max_tokens` tokens (default: a training batch's, train.batch_size x model.seq_len)."""
    from gmtier.build import autocast_dtype
    from gmtier.data import load_meta, load_tokenizer

    items = load_items(path)
    seqs = sequences(items, load_tokenizer(cfg.data.dir), load_meta(cfg.data.dir)["eot_id"], cfg.model.seq_len, str(path))
    device, amp = cfg.device(), autocast_dtype(cfg.precision())
    autocast = lambda: torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None)  # noqa: E731
    scores = continuation_logprobs(model, seqs, max_tokens or cfg.train.batch_size * cfg.model.seq_len, device, autocast)
    return accuracy(items, seqs, scores)
