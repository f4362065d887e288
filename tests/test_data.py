import gzip
import json

import numpy as np
import pytest

from gmtier.data import DataError, TokenData, iter_documents, load_tokenizer, prepare

CORPUS = "Мой дядя самых честных правил, когда не в шутку занемог.\nОн уважать себя заставил и лучше выдумать не мог.\n"


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    with gzip.open(src / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"id": i, "text": CORPUS * (i % 5 + 1)}, ensure_ascii=False) + "\n")
    (src / "val.jsonl").write_text(json.dumps({"text": CORPUS}, ensure_ascii=False) + "\n", encoding="utf-8")
    return src


def test_prepare_round_trips_text(corpus, tmp_path):
    out = tmp_path / "prepared"
    meta = prepare(corpus, out, vocab_size=300)
    assert meta["vocab_size"] <= 300 and meta["dtype"] == "uint16"
    tok = load_tokenizer(out)
    val = TokenData(out, "val")
    ids = np.asarray(val.tokens)
    assert ids[-1] == meta["eot_id"]
    assert tok.decode(ids[:-1].tolist()) == CORPUS  # byte-level BPE is lossless
    assert len(TokenData(out, "train")) == meta["n_tokens"]["train"]


def test_batches_are_shifted_windows(corpus, tmp_path):
    out = tmp_path / "prepared"
    prepare(corpus, out, vocab_size=300)
    data = TokenData(out, "train")
    x, y = data.batch(4, 8, np.random.default_rng(1))
    assert x.shape == y.shape == (4, 8)
    assert (x[:, 1:] == y[:, :-1]).all()
    x2, _ = data.batch(4, 8, np.random.default_rng(1))
    assert (x == x2).all()  # the caller's generator decides the windows: resumable
    first = next(data.eval_batches(2, 8))
    assert (first[0][0] == torch_tensor(data.tokens[:8])).all()


def torch_tensor(a):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=np.int64))


def test_errors_name_the_problem(corpus, tmp_path):
    with pytest.raises(DataError, match="gmtier prepare"):
        TokenData(tmp_path / "nothing", "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: no string field 'text'"):
        list(iter_documents(bad))
    out = tmp_path / "prepared"
    prepare(corpus, out, vocab_size=300)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="damaged"):
        TokenData(out, "train")
    with pytest.raises(DataError, match="too small"):
        prepare(corpus, tmp_path / "p2", vocab_size=100)
