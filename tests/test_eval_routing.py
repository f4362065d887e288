"""Evaluation routing: outside training a Switch layer routes at model.eval_capacity_factor
(0 = dropless), so a sequence's loss does not depend on what else is in its batch."""

import pytest
import torch
import torch.nn.functional as F

from gmtier.config import ModelConfig
from gmtier.model import GPT


def _row_losses(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _, _ = model(x[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)


@pytest.mark.parametrize("eval_capacity_factor", [0.0, 8.0])
def test_a_sequences_eval_loss_does_not_depend_on_its_batch(eval_capacity_factor):
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=2, d_model=32, d_ff=64, seq_len=24, n_experts=4,
                      switch_every=1, capacity_factor=1.0, eval_capacity_factor=eval_capacity_factor)
    model = GPT(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    mates = torch.randint(0, 97, (7, 25), generator=g)
    seq = torch.randint(0, 97, (1, 25), generator=g)
    batch = torch.cat([mates, seq])  # the sequence last: its batch-mates come first in every expert's queue

    model.eval()
    alone, together = _row_losses(model, seq)[0], _row_losses(model, batch)[-1]
    assert together == pytest.approx(alone.item(), abs=1e-5)

    # The control: at the training capacity (1.0) the batch-mates take the experts' places and
    # the same sequence scores differently.
    model.train()
    assert abs(_row_losses(model, batch)[-1] - _row_losses(model, seq)[0]) > 1e-3
    switch = model.switch_blocks()[0]
    assert switch.last_drop_frac > 0
    model.eval()
    _row_losses(model, batch)
    assert switch.last_drop_frac == 0.0  # 8.0 x T / 4 experts is more than any expert can get


def test_a_resume_may_change_the_eval_capacity_factor_also_of_a_run_from_before_it(tmp_path):
    import json

    from gmtier import config
    from gmtier.checkpoint import RunDir

    run = RunDir(tmp_path)
    run.path.mkdir(exist_ok=True)
    saved = config.from_dict({})
    run.write_config(saved)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["model"]["eval_capacity_factor"]  # a run trained before the key existed
    (tmp_path / "config.json").write_text(json.dumps(raw))
    run.check_resumable(config.from_dict({"model": {"eval_capacity_factor": 2.0}}))
    with pytest.raises(config.ConfigError, match="model.capacity_factor = 1.25 but the config says 2.0"):
        run.check_resumable(config.from_dict({"model": {"capacity_factor": 2.0}}))
