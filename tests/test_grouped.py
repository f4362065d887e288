"""Grouped expert GEMMs (experts.gemm): the same numbers as the per-expert loop.

On the CPU torch._grouped_mm runs (as a loop of GEMMs inside torch), so these tests run the
grouped code path itself (row layout, offsets, the K-grouped dW, which experts get gradients) in
fp32 against the loop to 1e-6; the GPU tests at the end run torch's grouped kernel in bf16.
"""

import copy
import warnings

import pytest
import torch

import gmtier.experts.bank as bank
from gmtier import config
from gmtier.config import ModelConfig
from gmtier.experts.bank import (ResidentExperts, expert_ffn, expert_ffn_backward, from_gemm_rows, from_token_rows,
                                 gemm_row_layout, group_ends, grouped_ffn, grouped_ffn_dw, grouped_ffn_dx,
                                 resolve_gemm, to_gemm_rows, to_token_rows, token_rows)
from gmtier.model import GPT, SwitchFFN, capacity, route

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
pytestmark = needs_grouped_mm


def _weights(n_experts, d, f, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(n_experts, f, d, generator=g) / d**0.5
    w2 = torch.randn(n_experts, d, f, generator=g) / f**0.5
    return w1.to(device, dtype), w2.to(device, dtype)


def test_grouped_ffn_matches_the_loop_with_empty_and_padded_experts():
    d, f, counts = 16, 32, [5, 0, 12, 0, 3]
    counts_p, rows = gemm_row_layout(counts, 4, "cpu")  # padded to 4 rows: [8, 0, 12, 0, 4]
    n = sum(counts)
    g = torch.Generator().manual_seed(1)
    x = to_gemm_rows(torch.randn(n, d, generator=g), rows, sum(counts_p))
    dy = to_gemm_rows(torch.randn(n, d, generator=g), rows, sum(counts_p))
    w1, w2 = _weights(len(counts), d, f)
    offs = group_ends(counts_p, "cpu")
    y, a, h = grouped_ffn(x, w1, w2, offs)
    dx, h2, da = grouped_ffn_dx(x, a, w1, w2, dy, offs)
    assert torch.equal(h, h2) and torch.equal(grouped_ffn_dx(x, a, w1, w2, dy, offs, h)[0], dx)
    used = [e for e, c in enumerate(counts_p) if c]
    dw1, dw2 = grouped_ffn_dw(x, h, da, dy, group_ends([counts_p[e] for e in used], "cpu"))
    s = 0
    for e, c in enumerate(counts_p):
        if c:
            i = used.index(e)
            ref_dx, ref_dw = expert_ffn_backward(x[s:s + c], w1[e], w2[e], dy[s:s + c])
            torch.testing.assert_close(y[s:s + c], expert_ffn(x[s:s + c], w1[e], w2[e]), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(dx[s:s + c], ref_dx, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(dw1[i], ref_dw["w1"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(dw2[i], ref_dw["w2"], atol=1e-6, rtol=1e-6)
        s += c
    assert from_gemm_rows(y, rows).shape == (n, d)


@pytest.mark.parametrize("factor,multiple", [(0.0, 1), (1.0, 4), (1.25, 8)])
def test_token_rows_are_the_host_layout_made_on_the_device(factor, multiple):
    """token_rows puts every kept token where dispatch + gemm_row_layout put it, without the
    counts on the host; dropped tokens go to the spare last row, out of every expert's rows."""
    T, N = 40, 5
    logits = torch.randn(T, N, generator=torch.Generator().manual_seed(2))
    logits[:12, 1] += 5  # expert 1 over capacity
    logits[:, 3] -= 50  # expert 3 gets nothing
    r = route(logits, factor)
    kept = r.keep.nonzero().squeeze(1)
    order = kept[torch.argsort(r.expert[kept], stable=True)]
    counts = torch.bincount(r.expert[order], minlength=N).tolist()
    counts_p, rows = gemm_row_layout(counts, multiple, "cpu")
    rows = torch.arange(len(order)) if rows is None else rows
    t = token_rows(r.expert, r.rank, r.keep, N, min(T, N * capacity(T, N, factor)), multiple)
    assert t.counts.tolist() == counts and t.padded_counts() == counts_p
    assert t.offs.tolist() == list(torch.tensor(counts_p).cumsum(0))
    assert torch.equal(t.rows[order], rows)  # the kept tokens' rows
    assert (t.rows[~r.keep] == t.n_rows - 1).all() and t.n_rows - 1 >= sum(counts_p)
    for d in (3, 4):  # rows of 12 bytes are copied as floats, rows of 16 as 8-byte words
        h = torch.randn(T, d, requires_grad=True)
        x = to_token_rows(h, t)
        others = torch.ones(t.n_rows, dtype=torch.bool)
        others[rows] = False
        others[-1] = False  # the spare row (the dropped tokens') is unspecified
        assert torch.equal(x[rows], h[order]) and not x[others].any()  # zeros in the padding rows
        gx = torch.randn(t.n_rows, d)
        gx[-1] = float("nan")  # nothing of the spare row reaches a token's gradient
        x.backward(gx)
        assert torch.equal(h.grad[order], gx[rows]) and not h.grad[~r.keep].any()
    h, x = h.detach()[:, :3].contiguous(), x.detach()[:, :3].contiguous()
    x[-1] = float("nan")  # the spare row is unspecified: nothing of it reaches a token
    gate = torch.rand(T, dtype=torch.float64).requires_grad_()
    xg = x.double().requires_grad_()
    back = from_token_rows(xg, t, gate)
    assert torch.equal(back[r.keep], h[r.keep].double() * gate[r.keep, None]) and (back[~r.keep] == 0).all()
    # Its gradients against index_select's: the token rows' gradient and the gates'.
    g = torch.randn(T, 3, dtype=torch.float64)
    back.backward(g)
    ref_x = x.double().detach().requires_grad_()
    ref_gate = gate.detach().clone().requires_grad_()
    ref = torch.where(r.keep.unsqueeze(1), ref_x[t.rows], 0) * ref_gate.unsqueeze(1)
    ref.backward(g)
    torch.testing.assert_close(xg.grad, torch.nan_to_num(ref_x.grad), rtol=0, atol=0)
    torch.testing.assert_close(gate.grad, ref_gate.grad, rtol=1e-12, atol=1e-12)


def _switch(n_experts=6, gemm="loop", pad_rows=0, d=16, f=32):
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=d, d_ff=f, seq_len=8, n_experts=n_experts,
                      switch_every=1, capacity_factor=1.25)
    torch.manual_seed(0)
    layer = SwitchFFN(cfg, 0, ResidentExperts(cfg, 0, 0, pad_rows, gemm))
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        layer.router.weight[n_experts - 1] -= 100  # the last expert gets no token: no gradient, as in the loop
    return layer


@pytest.mark.parametrize("pad_rows", [0, 4])
def test_resident_grouped_matches_loop_forward_and_backward(pad_rows):
    loop = _switch(gemm="loop", pad_rows=pad_rows)
    grouped = _switch(gemm="grouped", pad_rows=pad_rows)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(3)).abs()  # > 0: the last expert loses
    outs = []
    for layer in (loop, grouped):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y.square().sum() + layer.aux_loss).backward()
        outs.append((y, xi.grad))
    assert grouped.experts.gemm_used == "grouped" and loop.experts.gemm_used == "loop"
    assert loop.last_experts == grouped.last_experts and 5 not in loop.last_experts
    assert loop.last_drop_frac == grouped.last_drop_frac > 0
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(loop.named_parameters(), grouped.parameters()):
        if p.grad is None:
            assert q.grad is None, name  # unused experts: no gradient, so AdamW skips them
        else:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-6, msg=name)
    assert loop.experts.w1[5].grad is None


def test_grouped_backward_accumulates_like_the_loop_when_an_expert_has_rows_in_one_pass_only():
    """dW of every expert, the empty ones' taken back at the end of the pass: an expert with
    rows in the first backward only keeps that gradient through the second (as in the loop)."""
    loop = _switch(gemm="loop", pad_rows=4)
    grouped = _switch(gemm="grouped", pad_rows=4)
    grouped.load_state_dict(loop.state_dict())
    gen = torch.Generator().manual_seed(4)
    first = torch.randn(2, 20, 16, generator=gen)
    second = torch.randn(2, 20, 16, generator=gen).abs()  # > 0: fewer experts than the first
    used = []
    for layer in (loop, grouped):
        for x in (first, second):
            layer(x).square().sum().backward()
            used.append(layer.last_experts)
    assert used[:2] == used[2:] and 5 in used[0] and 5 not in used[1]  # expert 5: rows in the first pass only
    assert grouped.experts.w1[5].grad is not None
    for (name, p), q in zip(loop.named_parameters(), grouped.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_resident_weights_stay_side_by_side_through_moves_and_loads():
    layer = _switch(gemm="grouped")
    ex = layer.experts
    assert bank._side_by_side([p.detach() for p in ex.w1])
    layer.to(torch.float64).to(torch.float32)  # each move gives every parameter its own tensor; laid out again
    assert bank._side_by_side([p.detach() for p in ex.w1]) and bank._side_by_side([p.detach() for p in ex.w2])
    view = bank.stacked(list(ex.w2))
    assert view.data_ptr() == ex.w2[0].data_ptr() and torch.equal(view[3], ex.w2[3])
    other = _switch(gemm="grouped")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    layer.load_state_dict(other.state_dict())  # copies in place: still one tensor
    assert bank._side_by_side([p.detach() for p in ex.w1]) and torch.equal(bank.stacked(list(ex.w1))[2], other.experts.w1[2])


def test_gemm_choice_is_validated_and_resolved():
    with pytest.raises(config.ConfigError, match="experts.gemm"):
        config.from_dict({"experts": {"gemm": "fast"}})
    assert config.from_dict({}).experts.gemm == "auto"
    assert resolve_gemm("auto", "cpu", torch.float32, 16, 32) == "loop"  # no grouped kernel on the CPU
    assert resolve_gemm("grouped", "cpu", torch.float32, 16, 32) == "grouped"
    assert resolve_gemm("loop", "cpu", torch.float32, 16, 32) == "loop"
    with pytest.raises(ValueError, match="experts.gemm"):
        ResidentExperts(ModelConfig(), 0, 0, gemm="fast")
    with pytest.raises(config.ConfigError, match="experts.graphs"):
        config.from_dict({"experts": {"graphs": "on"}})
    assert config.from_dict({}).experts.graphs == "auto"


def test_grouped_gemms_that_fail_at_first_use_fall_back_to_the_loop(monkeypatch):
    """Where torch._grouped_mm raises (or gives other numbers), the loop runs, with a warning."""
    monkeypatch.setattr(bank, "_grouped_mm", lambda a, b, offs: (_ for _ in ()).throw(RuntimeError("no kernel here")))
    resolve_gemm.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no kernel here"):
            assert resolve_gemm("grouped", "cpu", torch.float32, 16, 24) == "loop"
        layer = _switch(gemm="grouped", d=16, f=24)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = layer(torch.randn(2, 8, 16))
        assert layer.experts.gemm_used == "loop" and torch.isfinite(y).all()
        monkeypatch.setattr(bank, "_grouped_mm", lambda a, b, offs: torch._grouped_mm(a, b, offs=offs) * 1.01)
        resolve_gemm.cache_clear()
        with pytest.warns(RuntimeWarning, match="differs from the per-expert loop"):
            assert resolve_gemm("grouped", "cpu", torch.float32, 16, 24) == "loop"
    finally:
        resolve_gemm.cache_clear()


def test_gpt_step_grouped_equals_loop():
    """A whole model (two Switch layers, AdamW) trained three steps: the same losses and weights."""
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=16, d_ff=32, seq_len=16, n_experts=4,
                      switch_every=1, capacity_factor=1.0)
    runs = []
    for gemm in ("loop", "grouped"):
        model = GPT(cfg, 0, expert_bank=lambda layer: ResidentExperts(cfg, layer, 0, 0, gemm))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(4)
        losses = []
        for _ in range(3):
            idx = torch.randint(0, 64, (4, 16), generator=g)
            _, loss, aux = model(idx, idx)
            (loss + aux).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs.append((losses, copy.deepcopy(model.state_dict())))
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-6)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, atol=1e-6, rtol=1e-5, msg=k)



def test_what_a_cuda_graph_captures_is_the_eager_layer():
    """What `SwitchGraphs` captures (the layer as a function of its input and parameters, every
    expert's dW taken by autograd.grad as in the backward capture) and then does with it (the
    dW handed to the experts with tokens at the end of backward): the eager layer's output,
    losses and gradients, and no gradient for the expert without tokens. The capture itself
    needs a GPU (see the GPU tests below)."""
    from gmtier.experts.bank import HostCopy
    from gmtier.experts.graphed import _hand_over_expert_grads, _layer_callable, _params

    eager = _switch(6, "grouped", 4)
    graphed = copy.deepcopy(eager)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)).abs()  # the last expert gets no token
    xe, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = eager(xe)
    (y.square().sum() + eager.aux_loss + eager.z_loss).backward()
    params = _params(graphed)
    yg, aux, z, kept = _layer_callable(graphed, torch.float32)(xg, *params)
    grads = torch.autograd.grad([yg, aux, z], [xg, *params], [2 * yg, torch.ones(()), torch.ones(())])
    graphed.router.weight.grad = grads[1]
    _hand_over_expert_grads(graphed.experts.weights(), grads[2:], HostCopy(kept), aliased := [])
    torch.testing.assert_close(yg, y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(aux, eager.aux_loss)
    torch.testing.assert_close(z, eager.z_loss)
    torch.testing.assert_close(grads[0], xe.grad, atol=1e-6, rtol=1e-6)
    assert kept.tolist() == eager._last[0].tolist() and kept[5] == 0 < kept.sum()
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert graphed.experts.w1[5].grad is None and graphed.experts.w2[5].grad is None
    assert len(aliased) == 2 * 5  # the buffers handed over as they are, to be copied out before a second pass
    _hand_over_expert_grads(graphed.experts.weights(), grads[2:], HostCopy(kept), [])  # a second pass adds
    torch.testing.assert_close(graphed.experts.w1[0].grad, 2 * eager.experts.w1[0].grad, atol=1e-6, rtol=1e-5)


def test_switch_layers_run_eagerly_where_no_graph_applies():
    """On the CPU, in evaluation and without autograd, a layer with `SwitchGraphs` runs eagerly."""
    from gmtier.experts.graphed import SwitchGraphs

    layer = _switch(6, "grouped", 4)
    layer.graphs = SwitchGraphs([layer])
    x = torch.randn(40, 16, requires_grad=True)
    y = layer(x)
    assert layer.graphs.captures == 0 and layer.graphs.replays == 0 and y.requires_grad
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer.graphs.captures == 0


# ---- the tiered runtime: experts already on the device run grouped, paged ones in the loop ----

from test_train import data_dir, needs_store, tiny  # noqa: E402,F401  (data_dir is a fixture)


def _train(cfg):
    from gmtier.train import train

    return train(cfg, log=lambda s: None)


def _count_grouped(monkeypatch):
    calls = []
    real = bank.grouped_ffn_dx
    monkeypatch.setattr(bank, "grouped_ffn_dx", lambda x, *a: (calls.append(x.shape[0]), real(x, *a))[1])
    real_fwd = bank.grouped_ffn
    monkeypatch.setattr(bank, "grouped_ffn", lambda x, *a: (calls.append(-x.shape[0]), real_fwd(x, *a))[1])
    return calls


# (GPU tier emulated, its budget, RAM budget, forward grouped, backward grouped): every expert on
# the "GPU" (forward and backward grouped); 12 weight slots for 16 experts x 2 layers (forward:
# runs of the experts it holds grouped, the others paged in the loop; backward pages them all);
# no GPU tier with every record in RAM (backward grouped).
TIERED = [("1", "8MiB", "16MiB", True, True), ("1", 12 * 2 * 64 * 128 * 4, "16MiB", True, False),
          ("0", "8MiB", "16MiB", False, True)]


@needs_store
@pytest.mark.parametrize("emulate,gpu_budget,ram_budget,fwd,bwd", TIERED)
def test_tiered_grouped_matches_loop(data_dir, tmp_path, monkeypatch, emulate, gpu_budget, ram_budget, fwd, bwd):
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", emulate)
    model, train = dict(n_layer=2, switch_every=1, n_experts=16), dict(steps=3)
    experts = dict(gpu_budget=gpu_budget, ram_budget=ram_budget, async_adam=True)
    loop = _train(tiny(data_dir, tmp_path / "loop", model=model, train=train, experts=dict(experts, gemm="loop")))
    calls = _count_grouped(monkeypatch)
    grouped = _train(tiny(data_dir, tmp_path / "grouped", model=model, train=train,
                          experts=dict(experts, gemm="grouped")))
    assert any(n > 0 for n in calls) == bwd and any(n < 0 for n in calls) == fwd
    assert grouped == pytest.approx(loop, abs=1e-5)
    if fwd and bwd:
        res = _train(tiny(data_dir, tmp_path / "res", model=model, train=train, experts=dict(mode="resident")))
        assert grouped == pytest.approx(res, abs=2e-4)


@needs_store
def test_layer_major_resident_and_tiered_grouped_match_loop(data_dir, tmp_path, monkeypatch):
    """The layer-major step hands the banks rows in the GEMM layout with host counts: the grouped
    resident bank and the grouped tiered runtime give the loop's losses."""
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    model = dict(n_layer=2, switch_every=1, n_experts=8)
    train = dict(steps=3, micro_batches=2, batch_size=4)
    runs = {}
    for mode in ("resident", "tiered"):
        for gemm in ("loop", "grouped"):
            experts = dict(mode=mode, gemm=gemm, gpu_budget="8MiB", ram_budget="16MiB", pad_rows=8)
            runs[mode, gemm] = _train(tiny(data_dir, tmp_path / f"{mode}-{gemm}", model=model, train=train,
                                           experts=experts))
    assert runs["resident", "grouped"] == pytest.approx(runs["resident", "loop"], abs=1e-5)
    assert runs["tiered", "grouped"] == pytest.approx(runs["tiered", "loop"], abs=1e-5)
    assert runs["tiered", "grouped"] == pytest.approx(runs["resident", "loop"], abs=2e-4)


# ---- on the GPU: torch's grouped kernel in bf16 -------------------------------------------------

def _has_kernel() -> bool:
    major, minor = torch.cuda.get_device_capability()
    return (major, minor) == (9, 0) or major == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_experts", [16, 64])
def test_grouped_kernel_matches_loop_in_bf16_on_gpu(n_experts):
    d, f = 512, 2048  # small's shapes
    want = "grouped" if _has_kernel() else "loop"
    assert resolve_gemm("auto", "cuda:0", torch.bfloat16, d, f) == want, bank.GEMM_FALLBACKS
    layers = [_switch(n_experts, gemm, 128, d, f).cuda() for gemm in ("loop", "auto")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(4, 1024, d, device="cuda").abs()
    outs = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            y = layer(xi)
        y.float().square().mean().backward()
        outs.append((y.float(), xi.grad))
    assert layers[1].experts.gemm_used == want
    for got, ref in zip(outs[1], outs[0]):
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-2
    for (name, p), q in zip(layers[0].named_parameters(), layers[1].parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None and p.grad.abs().max() > 0:
            assert ((q.grad - p.grad).abs().max() / p.grad.abs().max()).item() < 3e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_switch_layer_forward_has_no_host_sync():
    """Routing, the row layout, the grouped GEMMs and the way back: no host sync in forward."""
    if not _has_kernel():
        pytest.skip("no grouped GEMM kernel on this GPU")
    layer = _switch(16, "grouped", 128, 512, 2048).cuda()
    x = torch.randn(2048, 512, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        layer(x)  # first use: the probe (it syncs) and the caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(y).all() and layer.last_experts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["resident", "tiered"])
def test_gpu_training_grouped_matches_loop(data_dir, tmp_path, mode):
    """bf16 on the GPU: resident (every expert grouped) and tiered with every expert on the GPU
    (grouped; the GPU tier refreshed after each AdamW) give the loop's losses to bf16 noise."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    model = dict(n_experts=8)
    train = dict(device="cuda", precision="bf16")
    experts = dict(mode=mode, ram_budget="64MiB", gpu_budget="16MiB")
    loop = _train(tiny(data_dir, tmp_path / "loop", model=model, train=train, experts=dict(experts, gemm="loop")))
    auto = _train(tiny(data_dir, tmp_path / "auto", model=model, train=train, experts=experts))
    assert auto[-1] < auto[0] - 0.4
    assert auto == pytest.approx(loop, abs=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_with_cuda_graphs_equals_eager(data_dir, tmp_path):
    """Resident bf16 training on the GPU, the Switch layers replayed as CUDA graphs
    (experts.graphs = "auto") against every kernel launched eagerly ("off"): the same losses and
    weights (the same kernels run), one capture, a replay every layer and step."""
    if not (_has_kernel() and torch.cuda.is_bf16_supported()):
        pytest.skip("no grouped GEMM kernel on this GPU")
    from gmtier.experts.graphed import CAPTURE_FAILURES
    from gmtier.train import Trainer

    model = dict(n_experts=8, n_layer=4, switch_every=2)
    train = dict(device="cuda", precision="bf16", steps=12)
    runs = {}
    for graphs in ("off", "auto"):
        cfg = tiny(data_dir, tmp_path / graphs, model=model, train=train, experts=dict(mode="resident", graphs=graphs))
        tr = Trainer(cfg, fresh=True, log=lambda s: None)
        try:
            losses = tr.fit()
            g = tr.model.switch_blocks()[0].graphs
            runs[graphs] = (losses, {k: v.float().cpu() for k, v in tr.model.state_dict().items()},
                            None if g is None else (g.captures, g.replays))
        finally:
            tr.close()
    assert not CAPTURE_FAILURES, CAPTURE_FAILURES
    assert runs["off"][2] is None and runs["auto"][2] == (1, 12 * 2)
    assert runs["auto"][0] == pytest.approx(runs["off"][0], abs=1e-5)
    for k, v in runs["off"][1].items():
        torch.testing.assert_close(runs["auto"][1][k], v, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphed_layer_accumulates_two_passes_like_the_eager_one():
    """Two forward/backward passes before a step (the second on other tokens): the graphed layer's
    gradients add up as the eager layer's do, though its first pass handed over the graph's own
    buffers (copied out before the next replay, forward or backward: both reuse the pool)."""
    if not (_has_kernel() and torch.cuda.is_bf16_supported()):
        pytest.skip("no grouped GEMM kernel on this GPU")
    from gmtier.experts.graphed import CAPTURE_FAILURES, SwitchGraphs

    eager = _switch(16, "auto", 128, 512, 2048).cuda()
    with torch.no_grad():  # logits of order 1, so the router has gradients (the last expert still gets no token)
        eager.router.weight.mul_(0.02)
    graphed = copy.deepcopy(eager)
    graphed.graphs = SwitchGraphs([graphed])
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(2048, 512, device="cuda", generator=g).abs() for _ in range(2)]
    for layer in (eager, graphed):
        for x in xs:
            with torch.autocast("cuda", torch.bfloat16):
                y = layer(x.clone().requires_grad_())
            (y.float().square().mean() + layer.aux_loss + layer.z_loss).backward()
    assert not CAPTURE_FAILURES and graphed.graphs.replays == 2
    # Within fp32 rounding of the sum of the two passes (the captured cuBLAS calls may pick other
    # algorithms than the eager ones): a gradient overwritten by the second replay would be off
    # by about the whole first pass.
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            err = ((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
            assert err < 1e-3, (name, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_switch_layers_that_fail_to_capture_run_eagerly(monkeypatch):
    """A capture that raises: a warning names why, and the layer runs eagerly from then on."""
    if not (_has_kernel() and torch.cuda.is_bf16_supported()):
        pytest.skip("no grouped GEMM kernel on this GPU")
    import gmtier.experts.graphed as graphed_mod

    monkeypatch.setattr(graphed_mod, "_capture", lambda *a: (_ for _ in ()).throw(RuntimeError("capture refused")))
    monkeypatch.setattr(graphed_mod, "CAPTURE_FAILURES", {})
    layer = _switch(16, "auto", 128, 512, 2048).cuda()
    layer.graphs = graphed_mod.SwitchGraphs([layer])
    x = torch.randn(2048, 512, device="cuda").abs().requires_grad_()
    with pytest.warns(RuntimeWarning, match="capture refused"), torch.autocast("cuda", torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    assert layer.graphs.replays == 0 and "capture refused" in graphed_mod.CAPTURE_FAILURES["cuda:0"]
    assert x.grad is not None and any(w.grad is not None for w in layer.experts.weights())
