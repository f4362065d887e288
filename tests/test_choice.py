"""Zero-shot choice evaluation: prompt format, scores against log-probabilities by hand, a model
whose right answers are known, a trained run (tiered) through `gmtier eval --choice`, bad lines."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from gmtier import choice
from gmtier.cli import main
from gmtier.config import ModelConfig
from gmtier.data import DataError, train_tokenizer
from gmtier.model import GPT
from test_train import _write_toml, needs_store, tiny

DATA = Path(__file__).parent / "data"
COPA, MC = DATA / "choice_copa.jsonl", DATA / "choice_mc.jsonl"


def test_prompt_format():
    items = choice.load_items(COPA)
    assert [i.kind for i in items] == ["copa"] * 6
    first, second = items[0], items[1]
    assert first.prompt == "Девочка уронила стакан, поэтому"
    assert first.continuations == [" стакан разбился.", " стакан наполнился водой."] and first.label == 0
    assert second.prompt == "Мужчина открыл зонт, потому что" and second.label == 1
    assert choice.copa_continuation("СССР распался.") == " СССР распался."  # an abbreviation keeps its capitals
    mc = choice.load_items(MC)
    assert mc[0].prompt == "Чтобы сварить кашу, нужно налить в кастрюлю"
    assert mc[1].continuations == [" санках.", " лодке.", " верблюде.", " качелях в саду."]  # `context` also works
    assert [i.kind for i in mc] == ["mc"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    items = choice.load_items(COPA) + choice.load_items(MC)
    return train_tokenizer([i.prompt + c for i in items for c in i.continuations] * 5, 1000)


def _by_hand(model, tokenizer, prompt: str, cont: str, seq_len: int) -> float:
    """The alternative's log-probability, one sequence at a time, in float64 from the logits."""
    ids = ([0] + tokenizer.encode(prompt).ids + tokenizer.encode(cont).ids)[-(seq_len + 1):]
    n = len(tokenizer.encode(cont).ids)
    logits, _, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))


@pytest.mark.parametrize("seq_len", [64, 8])  # 8: the longer prompts lose their first tokens
def test_scores_are_the_log_probabilities_of_the_logits(tokenizer, seq_len):
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, d_model=32, d_ff=64,
                      seq_len=seq_len, n_experts=4, switch_every=1, capacity_factor=1.0)
    model = GPT(cfg, seed=3).eval()
    items = choice.load_items(COPA) + choice.load_items(MC)
    seqs = choice.sequences(items, tokenizer, 0, seq_len)
    with torch.no_grad():
        # Batches of mixed length (padded), with capacity 1.0 in training: eval routes dropless.
        scores = choice.continuation_logprobs(model, seqs, 3 * seq_len, "cpu", torch.no_grad)
        for s, (total, n) in zip(seqs, scores):
            item = items[s.item]
            assert n == len(tokenizer.encode(item.continuations[s.choice]).ids)
            assert total == pytest.approx(_by_hand(model, tokenizer, item.prompt, item.continuations[s.choice], seq_len),
                                          abs=1e-4)
    assert any(len(s.ids) == seq_len + 1 for s in seqs) == (seq_len == 8)


class WordTokenizer:
    """One token per space-separated word (the leading space belongs to the word)."""

    def __init__(self, words):
        self.ids = {w: i + 1 for i, w in enumerate(words)}

    def encode_batch(self, texts):
        return [SimpleNamespace(ids=[self.ids[w] for w in t.split()]) for t in texts]


class UnigramLM(nn.Module):
    """Every position predicts the same distribution: log p(token) = `logp[token]`."""

    def __init__(self, logp):
        super().__init__()
        self.logits = torch.tensor(logp)

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1), None, None


def test_a_model_whose_right_answers_are_known(tmp_path):
    words = ["Кот", "спал,", "поэтому", "мышь", "убежала.", "пришла", "в", "дом."]
    q = 0.24  # the four likely words; the probabilities sum to 1, so the logits are exactly log p
    p = {"мышь": q, "убежала.": q, "в": q, "дом.": q, "пришла": 0.01}
    logp = [math.log(p.get(w, 0.0075)) for w in ["<eot>"] + words]
    f = tmp_path / "items.jsonl"
    # Picks (by sum, by mean): 1. two likely words against four with "пришла": (0, 0). 2. one likely
    # word against two: the sum prefers the shorter, the means tie (the first wins): (0, 0).
    # 3, 4. "пришла" (0.01) against three likely words (q^3 = 0.014): (1, 1), right for 3, wrong
    # for 4. 5. "пришла" against four likely words (q^4 = 0.0033): the sum picks 0, the mean 1.
    rows = [
        {"premise": "Кот спал.", "choice1": "мышь убежала.", "choice2": "мышь пришла в дом.", "question": "effect", "label": 0},
        {"context": "Кот спал,", "choices": ["убежала.", "в дом."], "label": 0},
        {"context": "Кот спал,", "choices": ["пришла", "мышь в дом."], "label": 1},
        {"context": "Кот спал,", "choices": ["пришла", "мышь в дом."], "label": 0},
        {"context": "Кот спал,", "choices": ["пришла", "мышь убежала. в дом."], "label": 1},
    ]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    items = choice.load_items(f)
    seqs = choice.sequences(items, WordTokenizer(words), 0, 16, str(f))
    scores = choice.continuation_logprobs(UnigramLM(logp), seqs, 64, "cpu", torch.no_grad)
    out = choice.accuracy(items, seqs, scores)
    assert [(pred[2], pred[3]) for pred in out["predictions"]] == [(0, 0), (0, 0), (1, 1), (1, 1), (0, 1)]
    assert out["accuracy_sum"] == pytest.approx(3 / 5) and out["accuracy_mean"] == pytest.approx(4 / 5)
    lo, hi = out["ci95_sum"]
    assert lo < 0.6 < hi and (lo, hi) == pytest.approx(choice.wilson(3, 5))
    assert choice.wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook figure
    assert out["kinds"] == {"copa": 1, "mc": 4}


@pytest.mark.parametrize("line, message", [
    ('{"premise": "a", "choice1": "b", "choice2": "c", "question": "why", "label": 0}', r":2: 'question' = 'why'"),
    ('{"premise": "a", "choice1": "b", "question": "cause", "label": 0}', ":2: no text field 'choice2'"),
    ('{"premise": "a", "choice1": "b", "choice2": "c", "question": "cause", "label": 2}', ":2: 'label' = 2"),
    ('{"premise": "a", "choice1": "b", "choice2": "c", "question": "cause"}', ":2: 'label' = None"),
    ('{"context": "a", "choices": ["b"], "label": 0}', ":2: 'choices' must be a list of two or more"),
    ('{"premise": "a", "answer": "b"}', ":2: neither a PARus/COPA item"),
    ('{"premise": "a", ', ":2: not valid JSON"),
])
def test_a_bad_line_is_named(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(COPA.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        choice.load_items(f)


@needs_store
def test_a_run_that_read_the_answers_picks_them_tiered(tmp_path):
    """A run trained (tiered) on text made of the prompts followed by their right alternatives
    knows the answers: `gmtier eval --choice` must find all of them."""
    from gmtier.data import prepare

    items = choice.load_items(COPA) + choice.load_items(MC)
    right = [i.prompt + i.continuations[i.label] for i in items]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, copies in (("train", 40), ("val", 2)):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                       for _ in range(copies) for t in right))
    prepare(corpus, tmp_path / "data", vocab_size=400)
    cfg = tiny(tmp_path / "data", tmp_path / "run",
               train=dict(steps=60, lr=2e-2, min_lr=2e-3, warmup_steps=5, log_every=20, checkpoint_every=60),
               model=dict(seq_len=48))
    runner = CliRunner()
    toml = _write_toml(tmp_path / "c.toml", cfg)
    assert runner.invoke(main, ["train", "--config", str(toml)]).exit_code == 0
    for f, n in ((COPA, 6), (MC, 3)):
        r = runner.invoke(main, ["eval", "--run", str(tmp_path / "run"), "--choice", str(f), "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        assert out["items"] == n and out["step"] == 60
        assert out["accuracy_sum"] == 1.0 and out["accuracy_mean"] == 1.0, out["predictions"]
    r = runner.invoke(main, ["eval", "--run", str(tmp_path / "run"), "--choice", str(COPA)])
    assert "6 items (6 copa); accuracy by sum log-prob 1.000 [0.610, 1.000]" in r.output, r.output
