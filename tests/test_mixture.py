"""Data mixtures: several corpora, one tokenizer, train rows drawn by weight, one val split each."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gmtier import config
from gmtier.config import ConfigError, CorpusConfig
from gmtier.data import (DataError, Mixture, TokenData, check_prepared, ensure_data, load_tokenizer, prepare,
                         prepare_mixture, tokenizer_shares)
from test_train import RUSLIT, tiny

RU_DOCS = RUSLIT.parent / "ru-docs"
POEM = "Мой дядя самых честных правил, когда не в шутку занемог.\nОн уважать себя заставил и лучше выдумать не мог.\n"
DOCS = "Чтобы открыть файл конфигурации, выберите пункт меню Параметры и нажмите кнопку Сохранить.\n"


def _write(path: Path, texts: list[str]) -> None:
    with (gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else open(path, "w", encoding="utf-8")) as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


@pytest.fixture
def corpora(tmp_path):
    """Two corpora: `poems` (train.jsonl.gz) and `docs` (two shards, as ../shared/data/ru-docs)."""
    poems, docs = tmp_path / "poems", tmp_path / "docs"
    poems.mkdir(), docs.mkdir()
    _write(poems / "train.jsonl.gz", [POEM * (i % 4 + 1) for i in range(30)])
    _write(poems / "val.jsonl", [POEM * 3])
    _write(docs / "train-00.jsonl.gz", [DOCS * (i % 3 + 1) for i in range(30)])
    _write(docs / "train-01.jsonl.gz", [DOCS * 2 for _ in range(30)])
    _write(docs / "val.jsonl.gz", [DOCS * 4])
    return [CorpusConfig(source=str(poems), weight=1.0, name="poems"), CorpusConfig(source=str(docs), weight=3.0, name="docs")]


def test_tokenizer_shares_follow_the_weights_within_the_scarcest_corpus():
    assert tokenizer_shares([100, 1000], [1, 1]) == [100, 100]  # the first corpus limits the sample
    assert tokenizer_shares([100, 1000], [1, 3]) == [100, 300]
    assert tokenizer_shares([1000, 90], [3, 1]) == [270, 90]
    assert tokenizer_shares([57], [0.3]) == [57]  # one corpus: all of it


def test_prepare_mixture_layout_and_splits(corpora, tmp_path):
    out = tmp_path / "mix"
    meta = prepare_mixture(corpora, out, vocab_size=300, max_train_chars=6000)
    assert sorted(p.name for p in out.iterdir()) == ["docs", "meta.json", "poems", "tokenizer.json"]
    entries = {e["name"]: e for e in meta["corpora"]}
    # max_train_chars is the total, split by weight: poems 1/4 of it, docs 3/4 (shards read in order).
    tok = load_tokenizer(out)
    for name, text, limit in (("poems", POEM, 1500), ("docs", DOCS, 4500)):
        train = TokenData(out, "train", name)
        assert len(train) == entries[name]["n_tokens"]["train"] and train.corpus == name
        assert len(tok.decode(np.asarray(train.tokens).tolist()).replace("<|endoftext|>", "")) <= limit
        val = np.asarray(TokenData(out, "val", name).tokens)
        assert val[-1] == meta["eot_id"] and text in tok.decode(val[:-1].tolist())
    # The tokenizer learnt from 1:3 of the two corpora's (limited) train text.
    assert entries["docs"]["tokenizer_chars"] == pytest.approx(3 * entries["poems"]["tokenizer_chars"], rel=0.01)
    with pytest.raises(DataError, match="holds a mixture"):
        TokenData(out, "train")
    with pytest.raises(DataError, match="no corpus 'other'"):
        TokenData(out, "train", "other")


def _which_corpus(row: np.ndarray, tokens: dict[str, np.ndarray]) -> list[str]:
    windows = {n: np.lib.stride_tricks.sliding_window_view(t, len(row)) for n, t in tokens.items()}
    return [n for n, w in windows.items() if (w == row).all(1).any()]


def test_rows_are_drawn_by_weight_from_the_callers_rng(corpora, tmp_path):
    out = tmp_path / "mix"
    prepare_mixture(corpora, out, vocab_size=300)
    train = Mixture(out, "train")
    assert train.names == ["poems", "docs"] and train.weights.tolist() == [0.25, 0.75]
    x, y = train.batch(400, 8, np.random.default_rng(3))
    assert (x[:, 1:] == y[:, :-1]).all()
    tokens = {n: np.asarray(d.tokens) for n, _, d in train.parts}
    rng = np.random.default_rng(3)
    expected = rng.choice(2, size=400, p=[0.25, 0.75])  # the row's corpus comes first from the same rng
    for row, c in zip(x[:40].numpy(), expected[:40]):
        assert train.names[c] in _which_corpus(row, tokens)
    assert 0.18 < (expected == 0).mean() < 0.32
    x2, _ = train.batch(400, 8, np.random.default_rng(3))
    assert (x == x2).all()  # reproducible from the run's rng (and so resumable)


def test_one_corpus_draws_the_batches_of_before_mixtures(corpora, tmp_path):
    out = tmp_path / "one"
    prepare(corpora[0].source, out, vocab_size=300)
    a = Mixture(out, "train").batch(16, 8, np.random.default_rng(5))
    b = TokenData(out, "train").batch(16, 8, np.random.default_rng(5))
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert Mixture(out, "val").names == ["poems"]


def _mix_cfg(data_dir, corpora, run_dir, **data):
    return tiny(data_dir, run_dir, data=dict(corpora=[vars(c) for c in corpora], vocab_size=300, **data))


def test_a_changed_mixture_is_refused(corpora, tmp_path):
    out = tmp_path / "mix"
    cfg = _mix_cfg(out, corpora, tmp_path / "run")
    train, val = ensure_data(cfg, log=lambda s: None)  # prepares on first use
    assert train.names == ["poems", "docs"] and len(val.parts) == 2
    ensure_data(cfg, log=lambda s: None)  # the same mixture again: taken as prepared
    corpora[1].weight = 1.0
    with pytest.raises(DataError, match=r"another mixture \(corpora: .*delete .*mix to prepare it again"):
        check_prepared(_mix_cfg(out, corpora, tmp_path / "run"))
    with pytest.raises(DataError, match="max_train_chars: None -> 1000"):
        check_prepared(_mix_cfg(out, corpora[:1] + [CorpusConfig(corpora[1].source, 3.0, "docs")], tmp_path / "r",
                                max_train_chars=1000))
    with pytest.raises(DataError, match="holds a mixture .* config names one source"):
        check_prepared(tiny(out, tmp_path / "run"))
    single = tmp_path / "single"
    prepare(corpora[0].source, single, vocab_size=300)
    with pytest.raises(DataError, match="prepared from one source"):
        check_prepared(_mix_cfg(single, corpora, tmp_path / "run"))


def test_mixture_config_errors(corpora, tmp_path):
    raw = lambda **d: {"data": {"corpora": [vars(c) for c in corpora], **d}}  # noqa: E731
    assert config.from_dict(raw()).data.source == ""  # the mixture is data.corpora alone
    with pytest.raises(ConfigError, match="data.source = 'x' and data.corpora are both given"):
        config.from_dict(raw(source="x"))
    with pytest.raises(ConfigError, match=r"data.corpora\[0\].weight = 0.0: must be a positive"):
        config.from_dict({"data": {"corpora": [{"source": "a", "weight": 0}]}})
    with pytest.raises(ConfigError, match="two corpora are named 'a'"):
        config.from_dict({"data": {"corpora": [{"source": "x/a"}, {"source": "y/a"}]}})
    with pytest.raises(ConfigError, match=r"unknown key data.corpora\[0\].path"):
        config.from_dict({"data": {"corpora": [{"path": "a"}]}})
    with pytest.raises(ConfigError, match="must be a list of tables"):
        config.from_dict({"data": {"corpora": "ruslit"}})
    cfg = config.from_dict({"data": {"corpora": [{"source": "../shared/data/ru-docs", "weight": 2}]}})
    assert cfg.data.corpora[0].name == "ru-docs"
    assert config.from_dict(cfg.to_dict()).data == cfg.data  # a saved config.json loads back as it was


def test_the_shipped_mixture_config_loads():
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "small-mix.toml")
    assert [c.name for c in cfg.data.mixture()] == ["ruslit", "ru-docs"]


@pytest.mark.skipif(not RU_DOCS.is_dir(), reason="../shared/data/ru-docs not here")
def test_training_on_ruslit_and_ru_docs_logs_each_corpus(tmp_path):
    from gmtier.train import train

    corpora = [CorpusConfig(str(RUSLIT), 0.5, "ruslit"), CorpusConfig(str(RU_DOCS), 0.5, "ru-docs")]
    cfg = _mix_cfg(tmp_path / "data", corpora, tmp_path / "run", max_train_chars=300_000, max_val_chars=20_000)
    cfg.data.vocab_size = 512
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 6, 3, 6
    cfg.experts.mode = "resident"
    lines = []
    train(cfg, log=lines.append)
    val = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert [r["step"] for r in val] == [3, 6]
    for r in val:
        assert r["val_loss"] == pytest.approx(0.5 * r["val_loss/ruslit"] + 0.5 * r["val_loss/ru-docs"])
        assert r["val_ppl/ru-docs"] == pytest.approx(np.exp(r["val_loss/ru-docs"]))
    assert any("ruslit" in l and "ru-docs" in l and "each corpus's val" in l for l in lines), lines
    # gmtier eval reads each corpus's val split and weights their losses as the log does.
    from click.testing import CliRunner

    from gmtier.cli import main

    r = CliRunner().invoke(main, ["eval", "--run", str(tmp_path / "run"), "--batches", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    per = out["corpora"]
    assert set(per) == {"ruslit", "ru-docs"} and per["ruslit"]["tokens"] == per["ru-docs"]["tokens"] == 3 * 8 * 32
    assert out["loss"] == pytest.approx(0.5 * per["ruslit"]["loss"] + 0.5 * per["ru-docs"]["loss"])
    text = CliRunner().invoke(main, ["eval", "--run", str(tmp_path / "run"), "--batches", "1"]).output
    assert "(weighted mean of the corpora)" in text and "\n  ru-docs: " in text, text
    from gmtier import plot

    assert plot.load_curves(tmp_path / "run", "mix").corpora() == ["ruslit", "ru-docs"]
    pytest.importorskip("matplotlib")
    assert plot.plot_runs([str(tmp_path / "run")], tmp_path / "mix.png").stat().st_size > 10_000


def test_prepare_command_prepares_a_configs_mixture(corpora, tmp_path):
    from click.testing import CliRunner

    from gmtier.cli import main
    from test_train import _write_toml

    out = tmp_path / "mix"
    toml = _write_toml(tmp_path / "mix.toml", _mix_cfg(out, corpora, tmp_path / "run"))
    r = CliRunner().invoke(main, ["prepare", "--config", str(toml)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "meta.json").read_text())
    for e in meta["corpora"]:  # one line per corpus, with the counts that training will read
        assert f"prepared {out}/{e['name']}: vocab 300, train {e['n_tokens']['train']:,} tokens" in r.output
    assert ensure_data(config.load(toml), log=lambda s: None)[0].names == ["poems", "docs"]
    (tmp_path / "mix.toml").write_text((tmp_path / "mix.toml").read_text().replace("weight = 3.0", "weight = 2.0"))
    r = CliRunner().invoke(main, ["prepare", "--config", str(toml)])  # a prepared dir of another mixture: refused
    assert r.exit_code != 0 and "another mixture" in r.output
