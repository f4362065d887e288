"""Training with compact expert records (experts.state = "compact") on CPU: it trains, stays
close to the fp32-state run, resumes exactly, and a store of the other kind, a small spare pool
and a corrupt block scale each behave as documented."""

import json

import pytest
import torch

from gmtier import config, record
from gmtier.store import StoreError, TieredExpertStore
from gmtier.train import Trainer, train
from test_train import data_dir, needs_store, tiny  # noqa: F401 (the fixture)

# 3 RAM records of 69632 B (bf16 w1, w2 + 8-bit moments and scales) for 8 experts: every step pages.
PAGING = dict(state="compact", ram_budget=3 * 69632)


def quiet(s):
    pass


@needs_store
def test_compact_state_trains_close_to_the_fp32_state(data_dir, tmp_path):
    """30 steps: the loss falls, and every step's loss is within 0.05 (the mean of the last 10
    within 1 %) of the fp32-state run with the same seed and data. Measured: 0.04 % apart."""
    fp32 = train(tiny(data_dir, tmp_path / "fp32", train=dict(steps=30)), log=quiet)
    compact = train(tiny(data_dir, tmp_path / "compact", train=dict(steps=30, checkpoint_every=30), experts=PAGING),
                    log=quiet)
    assert sum(compact[-5:]) / 5 < compact[0] - 0.5, compact
    assert max(abs(a - b) for a, b in zip(compact, fp32)) < 0.05, (compact, fp32)
    assert sum(compact[-10:]) == pytest.approx(sum(fp32[-10:]), rel=0.01)
    with TieredExpertStore.open(tmp_path / "compact" / "store", ram_bytes=2 * 69632) as s:
        names = [t.name for t in s.layout]
        assert record.state_of(names) == "compact" and s.record_bytes == 69632
        recs = [s.read_expert(0, e) for e in range(4)]
        assert recs[0]["w1"].dtype == torch.bfloat16 and recs[0]["w1.m_codes"].dtype == torch.uint8
        rec = max(recs, key=lambda r: r["step"].item())  # the checkpoint holds the trained experts
        assert rec["step"].item() > 0 and (rec["w1.v_scales"] > 0).all()


@needs_store
def test_compact_resume_equals_the_uninterrupted_run(data_dir, tmp_path):
    ref = train(tiny(data_dir, tmp_path / "full", train=dict(steps=10), experts=PAGING), log=quiet)

    def part():
        return tiny(data_dir, tmp_path / "part", train=dict(steps=10, checkpoint_every=4), experts=PAGING)

    t = Trainer(part(), log=quiet)
    t.fit(until=6)
    t.close()
    t = Trainer(part(), resume=True, log=quiet)
    assert t.step == 4
    assert t.fit() == pytest.approx(ref[4:], abs=1e-6)
    t.close()


@needs_store
def test_a_store_of_the_other_state_kind_is_refused(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "run", train=dict(steps=2, checkpoint_every=2), experts=PAGING), log=quiet)
    cfg = tiny(data_dir, tmp_path / "run", train=dict(steps=4, checkpoint_every=2))
    with pytest.raises(config.ConfigError, match=r"holds compact-state records.*experts.state = 'fp32'"):
        Trainer(cfg, resume=True, log=quiet)
    with pytest.raises(config.ConfigError, match="keeps bf16 weights"):
        tiny(data_dir, tmp_path / "x", experts=dict(state="compact", dtype="fp32"))
    with pytest.raises(config.ConfigError, match="experts.state = 'half'"):
        tiny(data_dir, tmp_path / "x", experts=dict(state="half"))


@needs_store
def test_few_spare_slots_train_and_an_unexact_resume_is_refused(data_dir, tmp_path):
    """One spare slot, 3 RAM records, 8 experts: the store commits on its own between
    checkpoints and training goes on; after a stop past such commits, resume is refused."""
    few = dict(PAGING, spare_slots=1)
    ref = train(tiny(data_dir, tmp_path / "ref", train=dict(steps=6), experts=PAGING), log=quiet)
    cfg = tiny(data_dir, tmp_path / "run", train=dict(steps=6, checkpoint_every=3), experts=few)
    t = Trainer(cfg, log=quiet)
    assert t.fit(until=5) == pytest.approx(ref[:5], abs=1e-6)  # the interim commits change no result
    assert t.runtime.store.spare_slots == 1 and t.runtime.store.ram_metrics()["interim_commits"] > 0
    t.runtime.store.core.flush()  # what a kill after the step's write-backs leaves: nothing committed
    t.close()
    with pytest.raises(StoreError, match=r"commits of its own.*1 spare record slots.*--fresh.*spare_slots"):
        Trainer(cfg, resume=True, log=quiet)


@needs_store
def test_a_corrupt_block_scale_stops_the_update_with_a_clear_error(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "run", train=dict(steps=2, checkpoint_every=2), experts=PAGING)
    train(cfg, log=quiet)
    with TieredExpertStore.open(tmp_path / "run" / "store", ram_bytes=2 * 69632) as s:
        scales = s.read_expert(1, 0)["w2.v_scales"]
        scales[0] = -1.0
        s.write_expert(1, 0, {"w2.v_scales": scales})
        s.commit(json.dumps({"step": 2}))
    t = Trainer(tiny(data_dir, tmp_path / "run", train=dict(steps=6, checkpoint_every=2), experts=PAGING),
                resume=True, log=quiet)
    with pytest.raises(Exception, match=r"v_scales\[0\] = -1 is not a finite non-negative block scale.*corrupt"):
        t.fit()


def test_info_of_gm30b_shows_the_compact_footprint_without_making_a_store(tmp_path):
    from pathlib import Path

    from click.testing import CliRunner

    from gmtier.cli import main

    root = Path(__file__).resolve().parents[1]
    cfg = root / "configs" / "gm30b.toml"
    run = tmp_path / "gm30b"
    r = CliRunner().invoke(main, ["info", "--config", str(cfg), "--json", "--set", f'train.run_dir="{run}"'])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert 29.5e9 < d["params_total"] < 31e9 and d["expert_state"] == "compact"
    assert d["record_bytes_per_param"] <= 4.3 and d["disk_bytes"] <= 145e9
    assert d["disk_bytes"] <= 1.1 * d["experts"] * d["expert_record_bytes"]
    # forward 2 (the weights), backward 2 (the state: the GPU copy gives the weights), written 4
    assert d["step_disk_bytes_per_param"] < 8.1  # fp32 state: 24 with a GPU tier, 28 without
    assert not run.exists()
    r = CliRunner().invoke(main, ["info", "--config", str(cfg), "--set", f'train.run_dir="{run}"'])
    assert "B/param" in r.output and "spare slots" in r.output and "GB)" in r.output, r.output
