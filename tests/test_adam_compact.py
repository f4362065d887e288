"""The compact-state AdamW through its binding: against a numpy float64 reference of the same
algorithm, and a short regression run against torch.optim.AdamW."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmtier import _core, compact_adam as ca

PATHS = _core.adam_simd_available()
M_MAP, V_MAP = (np.array(x, dtype=np.float64) for x in _core.adam_compact_maps())
M_VALID = np.r_[M_MAP[:121], M_MAP[128:249]]  # the codes encode produces (m: 0..120 and signs)
V_VALID = V_MAP[:249]
U32 = np.uint64(0xFFFFFFFF)


def _mix32(x: np.ndarray) -> np.ndarray:
    # the kernel's 32-bit hash, in uint64 lanes masked to 32 bits
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & U32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & U32
    return x ^ (x >> np.uint64(16))


def _sr_bits(key: int, n: int) -> np.ndarray:
    k1, k2 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)  # n < 2**32: no high index bits
    return (_mix32(np.arange(n, dtype=np.uint64) ^ k1) ^ k2) >> np.uint64(16)


def _sr(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    a = np.abs(p)
    ulp = np.exp2(np.floor(np.log2(a)) - 7)
    lo = np.floor(a / ulp) * ulp
    up = (a - lo) / ulp * 65536 + r >= 65536
    return np.copysign(np.where(up, lo + ulp, lo), p)


def _nearest_err(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.abs(table[None, :] - x[:, None]).min(axis=1)


def _reference(st, g64, lr, b1, b2, eps, wd, gs, block, seed, stream):
    """float64: weights (before bf16), new m, v, their block scales, and the fp32 slack of each
    new weight, m and v (a few fp32 ulps of the magnitudes of the terms that make it: where they
    cancel, that is many ulps of the result)."""
    n = st["weight"].numel()
    t = int(st["step"]) + 1
    per = lambda s: np.repeat(s.numpy().astype(np.float64), block)[:n]  # noqa: E731
    m = M_MAP[st["m_codes"].numpy()] * per(st["m_scales"])
    v = V_MAP[st["v_codes"].numpy()] * per(st["v_scales"])
    p = st["weight"].float().numpy().astype(np.float64) * (1 - lr * wd)
    g = g64 * gs
    slack = lambda terms: 16 * np.finfo(np.float32).eps * terms  # noqa: E731
    m_slack = slack(np.abs(b1 * m) + np.abs((1 - b1) * g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    v_slack = slack(v)
    update = lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    w_slack = slack(np.abs(p) + np.abs(update))
    p = p - update
    w = _sr(p, _sr_bits(_core.adam_compact_sr_key(seed, stream, t), n).astype(np.float64))
    nb = -(-n // block)
    pad = lambda x: np.pad(x, (0, nb * block - n)).reshape(nb, block)  # noqa: E731
    return (w, m, v, np.abs(pad(m)).max(axis=1), pad(v).max(axis=1),
            {"w": w_slack, "m": m_slack, "v": v_slack, "ms": pad(m_slack).max(axis=1), "vs": pad(v_slack).max(axis=1)})


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,block", [(1, 256), (3000, 256), (5000, 2048), (70001, 1024)])
def test_matches_numpy_float64_reference(simd, gdtype, n, block):
    rng = np.random.default_rng()
    st = ca.compact_state(torch.randn(n), block)
    nb = st["m_scales"].numel()
    mag = torch.from_numpy(rng.integers(0, 121, n).astype(np.uint8))
    sign = torch.from_numpy((rng.integers(0, 2, n) * 0x80).astype(np.uint8))
    st["m_codes"].copy_(torch.where(mag > 0, mag | sign, mag))
    st["v_codes"].copy_(torch.from_numpy(rng.integers(0, 249, n).astype(np.uint8)))
    st["m_scales"].copy_(torch.rand(nb) * 0.1)
    st["v_scales"].copy_(torch.rand(nb) * 0.01)
    st["step"].fill_(int(rng.integers(0, 50)))
    grad = (torch.randn(n) * 0.1).to(gdtype)
    hp = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, gs=0.5 / 4.0)
    stream, seed = int(rng.integers(0, 2**63)), 11
    w, m, v, ms, vs, slack = _reference(st, grad.double().numpy(), **hp, block=block, seed=seed, stream=stream)
    step0 = int(st["step"])
    t = ca.CompactTensors(st["weight"], st["m_codes"], st["v_codes"], st["m_scales"], st["v_scales"], grad,
                          st["step"], stream)
    skipped = ca.adamw_compact_step([[t]], lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                                    weight_decay=hp["wd"], grad_scale=4.0, clip_coef=0.5, check_finite=True,
                                    block=block, seed=seed, simd=simd, threads=2)
    assert skipped == [False] and int(st["step"]) == step0 + 1
    assert np.all(np.abs(st["m_scales"].numpy() - ms) <= 1e-5 * ms + slack["ms"])
    assert np.all(np.abs(st["v_scales"].numpy() - vs) <= 1e-5 * vs + slack["vs"])
    got_w = st["weight"].float().numpy().astype(np.float64)
    ref_w = torch.from_numpy(w).float().bfloat16().float().numpy()  # exact: w is bf16-representable
    differ = got_w != ref_w
    assert differ.sum() <= max(1, n // 1000)
    ulp = np.exp2(np.floor(np.log2(np.abs(ref_w[differ]))) - 7)
    assert np.all(np.abs(got_w[differ] - ref_w[differ]) <= ulp + slack["w"][differ])
    # codes: the nearest ones of the float64 moments, up to fp32's last bits
    per = lambda s: np.repeat(s, block)[:n]  # noqa: E731
    xm, xv = m / per(ms), v / per(vs)
    for codes, table, valid, x, sl in ((st["m_codes"], M_MAP, M_VALID, xm, slack["m"] / per(ms)),
                                       (st["v_codes"], V_MAP, V_VALID, xv, slack["v"] / per(vs))):
        err = np.abs(table[codes.numpy()] - x)
        assert np.all(err <= _nearest_err(x, valid) + 1e-5 * np.abs(x) + sl)


def test_skips_a_group_with_a_nonfinite_gradient_and_refuses_bad_arguments():
    a, b = ca.compact_state(torch.randn(5000), 256), ca.compact_state(torch.randn(300), 256)
    ga, gb = torch.randn(5000), torch.randn(300)
    ga[17] = float("nan")
    before = {k: v.clone() for k, v in a.items()}
    ta = ca.CompactTensors(*(a[k] for k in ("weight", "m_codes", "v_codes", "m_scales", "v_scales")), ga, a["step"])
    tb = ca.CompactTensors(*(b[k] for k in ("weight", "m_codes", "v_codes", "m_scales", "v_scales")), gb, b["step"], 1)
    assert ca.adamw_compact_step([[ta], [tb]], lr=1e-3, block=256, check_finite=True) == [True, False]
    assert all(torch.equal(a[k], before[k]) for k in a)
    assert int(b["step"]) == 1
    with pytest.raises(ValueError, match="power of two"):
        ca.adamw_compact_step([[tb]], lr=1e-3, block=300)
    with pytest.raises(ValueError, match="m_scales"):
        ca.adamw_compact_step([[tb]], lr=1e-3, block=512)  # the state was made with 256
    with pytest.raises(TypeError, match="weight"):
        ca.adamw_compact_step([[tb._replace(weight=b["weight"].float())]], lr=1e-3, block=256)


def test_same_bits_for_any_thread_count():
    outs = []
    for threads in (1, 2):
        torch.manual_seed(0)
        st = ca.compact_state(torch.randn(100_003), 1024)
        g = torch.randn(100_003).bfloat16()
        t = ca.CompactTensors(*(st[k] for k in ("weight", "m_codes", "v_codes", "m_scales", "v_scales")), g,
                              st["step"], 3)
        for _ in range(3):
            ca.adamw_compact_step([[t]], lr=1e-2, block=1024, seed=5, threads=threads)
        outs.append(st)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_regression_tracks_torch_adamw():
    """Linear regression y = X w*: compact AdamW (bf16 weights, 8-bit moments) vs torch's fp32
    AdamW from the same start: the loss curves stay close while the loss falls ~5000x, and the
    weights end close to torch's."""
    torch.manual_seed(0)
    d, n_samples, steps = 512, 2048, 300
    x = torch.randn(n_samples, d)
    w_true = torch.randn(d, 1)
    y = x @ w_true + 0.01 * torch.randn(n_samples, 1)
    w0 = torch.zeros(d, 1)
    ref = w0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    st = ca.compact_state(w0, 256)
    grad = torch.zeros(d)
    t = ca.CompactTensors(*(st[k] for k in ("weight", "m_codes", "v_codes", "m_scales", "v_scales")), grad, st["step"])
    loss = lambda w: ((x @ w - y) ** 2).mean()  # noqa: E731
    start = float(loss(w0))
    for i in range(steps):
        opt.zero_grad()
        lr_ = loss(ref)
        lr_.backward()
        opt.step()
        wc = st["weight"].float().reshape(d, 1).requires_grad_(True)
        lc = loss(wc)
        lc.backward()
        grad.copy_(wc.grad.reshape(-1))
        ca.adamw_compact_step([[t]], lr=2e-2, weight_decay=0.0, block=256, seed=1)
        if i % 50 == 49 and i < 250:
            a, b = float(lr_.detach()), float(lc.detach())
            # the loss falls ~5000x over the run; the curves stay within 20 % of each other until
            # the bf16 weights' rounding noise sets the floor: at step 300 the ratio is 0.79-1.46
            # over rounding seeds 1-4 (either rounding RNG), so the end is checked below instead
            assert abs(a - b) <= 0.2 * a, (i, a, b)
    final_ref = float(loss(ref.detach()))
    final_c = float(loss(st["weight"].float().reshape(d, 1)))
    assert final_ref < 1e-3 * start and final_c < 1e-3 * start
    gap = (st["weight"].float() - ref.detach().reshape(-1)).norm() / w_true.norm()
    assert gap < 0.05, float(gap)
