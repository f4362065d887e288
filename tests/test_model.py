"""The Switch layer's routing, losses and capacity on hand-checked cases; the model and configs."""

import math

import pytest
import torch

from gmtier import config
from gmtier.config import ConfigError, ModelConfig
from gmtier.model import GPT, SwitchFFN, capacity, count_params, route


def test_top1_routing_and_aux_loss_by_hand():
    # 4 tokens, 2 experts. Probabilities: softmax([ln 3, 0]) = [0.75, 0.25], softmax([0, ln 3]) = [0.25, 0.75].
    a = math.log(3.0)
    logits = torch.tensor([[a, 0.0], [a, 0.0], [a, 0.0], [0.0, a]])
    r = route(logits, capacity_factor=0.0)  # dropless
    assert r.expert.tolist() == [0, 0, 0, 1]
    assert torch.allclose(r.gate, torch.tensor([0.75, 0.75, 0.75, 0.75]))
    assert r.keep.all()
    # f = [3/4, 1/4], P = [(3*0.75 + 0.25)/4, (3*0.25 + 0.75)/4] = [0.625, 0.375]
    # aux = N * sum f_i P_i = 2 * (0.75*0.625 + 0.25*0.375) = 1.125
    assert r.aux_loss.item() == pytest.approx(1.125)
    # z = mean(logsumexp^2) = (ln 4)^2 for every token (logsumexp([ln 3, 0]) = ln 4)
    assert r.z_loss.item() == pytest.approx(math.log(4.0) ** 2)


def test_balanced_routing_gives_aux_loss_one():
    logits = torch.eye(4) * 5  # token i -> expert i
    r = route(logits, 1.0)
    p = torch.softmax(torch.tensor([5.0, 0, 0, 0]), 0)[0].item()
    assert r.expert.tolist() == [0, 1, 2, 3] and r.keep.all()
    assert r.aux_loss.item() == pytest.approx(4 * 4 * (0.25 * 0.25))  # f_i = P_i = 1/4 -> 1.0
    assert r.gate[0].item() == pytest.approx(p)


def test_capacity_drops_the_latest_tokens_of_a_full_expert():
    # 6 tokens, 3 experts, factor 1.0 -> capacity ceil(6/3) = 2. Expert 0 gets tokens 0, 1, 2, 4.
    logits = torch.full((6, 3), -5.0)
    for t, e in enumerate([0, 0, 0, 1, 0, 2]):
        logits[t, e] = 5.0
    r = route(logits, 1.0)
    assert capacity(6, 3, 1.0) == 2
    assert r.keep.tolist() == [True, True, False, True, False, True]
    assert capacity(6, 3, 1.5) == 3 and capacity(6, 3, 0) == 6
    assert route(logits, 1.5).keep.tolist() == [True, True, True, True, False, True]
    assert route(logits, 0).keep.all()


def test_dropped_tokens_pass_through_the_residual_only():
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=16, d_ff=32, seq_len=8, n_experts=2,
                      switch_every=1, capacity_factor=1.0)
    model = GPT(cfg, seed=0)
    layer: SwitchFFN = model.blocks[0].ffn
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 100.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 8, 16).abs()  # all positive -> all to expert 0, capacity 4 of 8
    y = layer(x)
    assert layer.last_drop_frac == pytest.approx(0.5)
    assert (y[0, 4:] == 0).all() and (y[0, :4] != 0).any()  # the FFN adds nothing for dropped tokens


def test_switch_output_is_gate_times_expert():
    from gmtier.model import expert_ffn

    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=8, d_ff=16, seq_len=8, n_experts=3,
                      switch_every=1, capacity_factor=0)
    layer: SwitchFFN = GPT(cfg, seed=0).blocks[0].ffn
    x = torch.randn(2, 5, 8)
    y = layer(x).view(-1, 8)
    probs = layer.router_logits(x.view(-1, 8)).softmax(-1)
    for t in range(10):
        e = probs[t].argmax().item()
        ref = probs[t, e] * expert_ffn(x.view(-1, 8)[t:t + 1], layer.experts.w1[e], layer.experts.w2[e])
        assert torch.allclose(y[t], ref[0], atol=1e-6)


def test_dense_baseline_and_active_params():
    cfg = ModelConfig(vocab_size=100, n_layer=4, d_model=32, d_ff=64, n_experts=8, switch_every=2)
    p = count_params(cfg)
    model = GPT(cfg, seed=0)
    assert sum(q.numel() for q in model.parameters()) == p["total"]
    dense = ModelConfig(vocab_size=100, n_layer=4, d_model=32, d_ff=64, n_experts=8, switch_every=0)
    pd = count_params(dense)
    assert sum(q.numel() for q in GPT(dense, seed=0).parameters()) == pd["total"]
    # equal FLOPs per token: the Switch model's active params differ from dense only by its routers
    assert p["active_per_token"] - pd["active_per_token"] == 2 * 8 * 32
    assert not GPT(dense, seed=0).switch_blocks()


def test_model_learns_a_tiny_sequence_and_generates():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, seq_len=16, n_experts=4,
                      switch_every=1, positions="learned", router_jitter=0.1)
    model = GPT(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.arange(16).repeat(4, 1) % 16
    seq = torch.cat([x, x[:, :1]], 1)
    first = None
    for _ in range(60):
        _, loss, aux = model(seq[:, :-1], seq[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
    assert loss.item() < first / 3
    out = model.eval().generate(torch.tensor([[0, 1, 2]]), 5, temperature=0)
    assert out.shape == (1, 8)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layers = 4\n")
    with pytest.raises(ConfigError, match="unknown key model.n_layers"):
        config.load(bad)
    bad.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(ConfigError, match="train.steps"):
        config.load(bad)
    bad.write_text("[model]\nd_model = 130\nn_head = 4\n")
    with pytest.raises(ConfigError, match="model.d_model"):
        config.load(bad)
    bad.write_text("[experts]\nram_budget = '1MB'\n")
    with pytest.raises(ConfigError, match="experts.ram_budget.*raise it to at least"):
        config.load(bad)
    with pytest.raises(ConfigError, match="train.precision"):
        config.load("configs/tiny.toml", ["train.precision=fp8"])
    cfg = config.load("configs/tiny.toml", ["train.steps=7", "experts.mode=resident"])
    assert cfg.train.steps == 7 and cfg.experts.mode == "resident"


@pytest.mark.parametrize("name", ["tiny", "small", "small-dense", "seed-envelope"])
def test_shipped_configs_load(name):
    import pathlib

    path = pathlib.Path(f"configs/{name}.toml")
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    cfg = config.load(path)
    assert cfg.model.n_layer > 0


def test_device_and_budget_errors_name_the_key():
    """Issue 14 items 6-7: one ConfigError line each, naming the key."""
    with pytest.raises(ConfigError, match=r"^train.device = 'tpu': choose one of 'auto', 'cpu', 'cuda'"):
        config.load("configs/tiny.toml", ["train.device=tpu"])
    for key in ("experts.gpu_budget", "experts.ram_budget"):
        with pytest.raises(ConfigError, match=rf"^{key} = -1: a budget cannot be negative"):
            config.load("configs/tiny.toml", [f"{key}=-1"])
        with pytest.raises(ConfigError, match=rf"^{key} = '-1GB'"):
            config.load("configs/tiny.toml", [f"{key}='-1GB'"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_missing_is_said_before_the_gpu_budget():
    cfg = config.load("configs/tiny.toml", ["train.device=cuda", "experts.gpu_budget=1"])  # a budget too small
    with pytest.raises(ConfigError, match=r"^train.device = 'cuda', but CUDA is not available"):
        cfg.device()
