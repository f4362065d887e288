"""The fused CPU AdamW against torch.optim.AdamW, on fresh random inputs, for every SIMD path."""

import math

import pytest
import torch

from gmtier import adam as A
from gmtier import optim

PATHS = ["avx512", "avx2", "scalar"]


def _path(simd):
    if simd not in A.simd_available():
        pytest.skip(f"this CPU lacks {simd}")
    return simd


def _rel(a, b, floor):
    return ((a.double() - b.double()).abs() / (b.double().abs() + floor)).max().item()


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("fused", [True, False])
def test_matches_torch_adamw_100_steps(simd, fused):
    _path(simd)
    n = 3 * 16384 + 1234  # several chunks and a ragged tail
    lr, wd = 1e-3, 0.1
    p0 = torch.randn(n)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=lr, weight_decay=wd, fused=fused)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    step = torch.zeros(1, dtype=torch.int64)
    for _ in range(100):
        g = torch.randn(n) * 0.1
        ref.grad = g.clone()
        opt.step()
        assert A.adamw_step([A.AdamTensors(p, m, v, g, step)], lr=lr, weight_decay=wd, simd=simd) is False
    st = opt.state[ref]
    assert step.item() == 100
    # relative error, floored at a tenth of the weights' scale (values crossing zero)
    assert _rel(p, ref.detach(), 0.1) < 1e-6
    assert _rel(m, st["exp_avg"], 1e-2) < 1e-6
    assert _rel(v, st["exp_avg_sq"], 1e-4) < 1e-6
    if fused:  # same operation order as torch's fused kernel: (nearly) bit-identical
        assert (p != ref.detach()).sum().item() <= n // 1000


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("gdt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hdt", [None, torch.bfloat16, torch.float16])
def test_grad_dtypes_and_half_copy_exact(simd, gdt, hdt):
    _path(simd)
    n = 16384 + 77
    lr = 3e-4
    p0 = torch.randn(n)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, fused=True)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    step = torch.zeros(1, dtype=torch.int64)
    half = None if hdt is None else torch.zeros(n, dtype=hdt)
    for _ in range(10):
        g = (torch.randn(n) * 0.1).to(gdt)
        ref.grad = g.float()
        opt.step()
        A.adamw_step([(p, m, v, g, step, half)], lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, simd=simd)
    assert _rel(p, ref.detach(), 0.1) < 1e-6
    if half is not None:
        assert torch.equal(half.view(torch.int16), p.to(hdt).view(torch.int16))


@pytest.mark.parametrize("simd", PATHS)
def test_half_rounding_special_values(simd):
    _path(simd)
    # Weights at rounding ties, denormals, huge values, inf, NaN: with lr=0, wd=0 the weight is
    # unchanged (m/denom is finite), so the copy must equal torch's rounding of the input.
    bits = torch.randint(-(2**31), 2**31 - 1, (40000,), dtype=torch.int64).to(torch.int32)
    p = bits.view(torch.float32).clone()
    p[:8] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-40, -1e-42, 65520.0, float("inf"), float("-inf"), float("nan")])
    n = p.numel()
    for hdt in (torch.bfloat16, torch.float16):
        q = p.clone()
        half = torch.zeros(n, dtype=hdt)
        A.adamw_step([(q, torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(1, dtype=torch.int64), half)],
                     lr=0.0, weight_decay=0.0, simd=simd)
        want = q.to(hdt)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(half), nan)
        assert torch.equal(half[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("simd", PATHS)
def test_nonfinite_grad_skips_everything(simd):
    _path(simd)
    n = 5000
    p, m, v = torch.randn(n), torch.rand(n), torch.rand(n)
    half = torch.zeros(n, dtype=torch.bfloat16)
    step = torch.tensor([7])
    saved = [t.clone() for t in (p, m, v, half, step)]
    for bad in (float("nan"), float("inf")):
        for gdt in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.randn(n).to(gdt)
            g[4321] = bad
            other = A.AdamTensors(torch.randn(10), torch.zeros(10), torch.zeros(10), torch.randn(10), torch.tensor([1]))
            skipped = A.adamw_step([other, (p, m, v, g, step, half)], lr=1e-3, check_finite=True, simd=simd)
            assert skipped is True
            for a, b in zip((p, m, v, half, step), saved):
                assert torch.equal(a, b)
            assert other.step.item() == 1 and other.exp_avg.abs().sum() == 0


def test_grad_scale_and_clip_coef():
    n = 4096
    p0 = torch.randn(n)
    g = torch.randn(n) * 0.1
    scale, clip = 512.0, 0.25
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, fused=True)
    ref.grad = g * clip
    opt.step()
    p, m, v, s = p0.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(1, dtype=torch.int64)
    gh = (g * scale).half()
    A.adamw_step([(p, m, v, gh, s)], lr=1e-3, grad_scale=scale, clip_coef=clip)
    p2, m2, v2, s2 = p0.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(1, dtype=torch.int64)
    ref2 = torch.nn.Parameter(p0.clone())
    opt2 = torch.optim.AdamW([ref2], lr=1e-3, fused=True)
    ref2.grad = gh.float() / scale * clip
    opt2.step()
    assert _rel(p, ref2.detach(), 0.1) < 1e-6
    assert _rel(m, opt2.state[ref2]["exp_avg"], 1e-3) < 1e-6


def test_shared_step_and_sparse_updates():
    # Two experts; expert 1 has two tensors sharing its step; expert 0 gets no gradient.
    e0 = [torch.randn(100) for _ in range(2)]
    e0_state = [(torch.zeros(100), torch.zeros(100)) for _ in e0]
    step0 = torch.tensor([3])
    e1 = [torch.randn(100), torch.randn(300)]
    step1 = torch.tensor([3])
    items = [A.AdamTensors(w, torch.zeros_like(w), torch.zeros_like(w), torch.randn_like(w), step1) for w in e1]
    before = [w.clone() for w in e0]
    A.adamw_step(items, lr=1e-3)
    assert step1.item() == 4 and step0.item() == 3
    assert all(torch.equal(a, b) for a, b in zip(e0, before))
    assert all((s[0] == 0).all() for s in e0_state)


def test_async_handle_and_gil_release():
    n = 1 << 20
    p, m, v, s = torch.randn(n), torch.zeros(n), torch.zeros(n), torch.zeros(1, dtype=torch.int64)
    g = torch.randn(n).bfloat16()
    half = torch.empty(n, dtype=torch.bfloat16)
    p_ref = p.clone()
    h = A.adamw_step([(p, m, v, g, s, half)], lr=1e-3, async_=True)
    assert isinstance(h, A.AdamHandle)
    assert h.wait() is False and h.done()
    assert s.item() == 1 and not torch.equal(p, p_ref)
    assert torch.equal(half, p.bfloat16())
    # errors surface at wait() or earlier
    with pytest.raises((ValueError, RuntimeError)):
        A.adamw_step([(p, m, v, g, s)], lr=1e-3, betas=(1.5, 0.9), async_=True).wait()


def test_validation_messages():
    n = 10
    ok = dict(master=torch.zeros(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n), grad=torch.zeros(n),
              step=torch.zeros(1, dtype=torch.int64))
    A.adamw_step([ok], lr=1e-3)
    with pytest.raises(TypeError, match="master: dtype float64"):
        A.adamw_step([{**ok, "master": torch.zeros(n, dtype=torch.float64)}], lr=1e-3)
    with pytest.raises(ValueError, match="grad: has 9 elements"):
        A.adamw_step([{**ok, "grad": torch.zeros(n - 1)}], lr=1e-3)
    with pytest.raises(ValueError, match="contiguous"):
        A.adamw_step([{**ok, "exp_avg": torch.zeros(2 * n)[::2]}], lr=1e-3)
    with pytest.raises(TypeError, match="step: dtype int32"):
        A.adamw_step([{**ok, "step": torch.zeros(1, dtype=torch.int32)}], lr=1e-3)
    with pytest.raises(TypeError, match="grad: dtype int8"):
        A.adamw_step([{**ok, "grad": torch.zeros(n, dtype=torch.int8)}], lr=1e-3)
    with pytest.raises(ValueError, match="overlap"):
        A.adamw_step([{**ok, "exp_avg": ok["master"]}], lr=1e-3)
    with pytest.raises(ValueError, match="simd must be one of"):
        A.adamw_step([ok], lr=1e-3, simd="sse9")
    with pytest.raises(ValueError, match="beta1"):
        A.adamw_step([ok], lr=1e-3, betas=(1.0, 0.9))
    for simd in PATHS:
        if simd not in A.simd_available():
            with pytest.raises(RuntimeError, match="not available"):
                A.adamw_step([ok], lr=1e-3, simd=simd)


@pytest.mark.parametrize("simd", PATHS)
def test_grad_sumsq_and_clip_coef(simd):
    _path(simd)
    gs = [torch.randn(70000), torch.randn(3000).bfloat16(), torch.randn(5).half()]
    s, finite = A.grad_sumsq(gs, grad_scale=2.0, simd=simd)
    want = sum((g.double() ** 2).sum().item() for g in gs) / 4.0
    assert finite and abs(s - want) / want < 1e-5
    coef, norm = A.clip_coef(gs, max_norm=1.0, grad_scale=2.0, simd=simd)
    assert abs(norm - math.sqrt(want)) / math.sqrt(want) < 1e-5
    assert abs(coef - 1.0 / (norm + 1e-6)) < 1e-9
    gs[1][17] = float("inf")
    assert A.grad_sumsq(gs, simd=simd)[1] is False


@pytest.mark.parametrize("simd", ["auto", "scalar"])
def test_cpu_adamw_drop_in(simd):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(33, 64), torch.nn.GELU(), torch.nn.Linear(64, 7))
    ref = torch.nn.Sequential(torch.nn.Linear(33, 64), torch.nn.GELU(), torch.nn.Linear(64, 7))
    ref.load_state_dict(model.state_dict())
    params = list(model.parameters())
    halves = [torch.zeros_like(q, dtype=torch.bfloat16) for q in params]
    opt = optim.CpuAdamW([{"params": params, "half_copies": halves}], lr=1e-2, weight_decay=0.05, simd=simd)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    for it in range(20):
        x = torch.randn(16, 33)
        for mdl, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            mdl(x).pow(2).mean().backward()
            if it == 5:  # a parameter without grad keeps its state
                mdl[2].bias.grad = None
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert _rel(a.detach(), b.detach(), 0.1) < 1e-5
    for q, h in zip(params, halves):
        assert torch.equal(h, q.detach().bfloat16())
    assert opt.state[params[-1]]["step"].item() == 19
    assert opt.state[params[0]]["step"].item() == 20
    sd = opt.state_dict()
    opt2 = optim.CpuAdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.state[params[0]]["step"].item() == 20


def test_cpu_adamw_check_finite_and_async():
    w = torch.nn.Parameter(torch.randn(1000))
    opt = optim.CpuAdamW([w], lr=1e-3, check_finite=True)
    w.grad = torch.randn(1000)
    w.grad[3] = float("nan")
    before = w.detach().clone()
    opt.step()
    assert opt.last_step_skipped and torch.equal(w.detach(), before)
    w.grad[3] = 0.0
    h = opt.step_async()
    assert h.wait() is False and not opt.last_step_skipped
    assert not torch.equal(w.detach(), before)


def test_memory_bandwidth_runs():
    bw = A.memory_bandwidth(nbytes=8 << 20, threads=1, repeats=1)
    assert bw["copy_gbps"] > 0 and bw["triad_gbps"] > 0


def test_adamw_record_matches_store_reference():
    # A record as the store lays it out: bf16 weights, fp32 masters and moments, int64 step.
    torch.manual_seed(3)
    shapes = {"w1": (64, 32), "w2": (32, 64)}
    rec = {"step": torch.zeros(1, dtype=torch.int64)}
    for n, s in shapes.items():
        rec[f"{n}.master"] = torch.randn(s)
        rec[n] = rec[f"{n}.master"].bfloat16()
        rec[f"{n}.exp_avg"] = torch.zeros(s)
        rec[f"{n}.exp_avg_sq"] = torch.zeros(s)
    refs = {n: torch.nn.Parameter(rec[f"{n}.master"].clone()) for n in shapes}
    opt = torch.optim.AdamW(list(refs.values()), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for _ in range(5):
        grads = {n: torch.randn(s).bfloat16() for n, s in shapes.items()}
        for n in shapes:
            refs[n].grad = grads[n].float()
        opt.step()
        assert A.adamw_record(rec, grads, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1) is False
    assert rec["step"].item() == 5
    for n in shapes:
        assert _rel(rec[f"{n}.master"], refs[n].detach(), 0.1) < 1e-6
        assert torch.equal(rec[n], rec[f"{n}.master"].bfloat16())
    bad = {"w1": torch.full(shapes["w1"], float("nan")).bfloat16()}
    assert A.adamw_record(rec, bad, lr=1e-2) is True and rec["step"].item() == 5


def test_record_spec_cache_matches_uncached_and_revalidates_reused_memory():
    # Fixed gradient buffers (the store's dW ring): cached specs give the uncached update's bytes;
    # the same address seen with another dtype or size is validated again, not trusted.
    torch.manual_seed(4)
    shapes = {"w1": (64, 32), "w2": (32, 64)}

    def record():
        rec = {"step": torch.zeros(1, dtype=torch.int64)}
        for n, s in shapes.items():
            rec[f"{n}.master"] = torch.randn(s, generator=torch.Generator().manual_seed(len(n) + s[0]))
            rec[n] = rec[f"{n}.master"].bfloat16()
            rec[f"{n}.exp_avg"] = torch.zeros(s)
            rec[f"{n}.exp_avg_sq"] = torch.zeros(s)
        return rec

    cached_rec, plain_rec = record(), record()
    buf = torch.empty(2 * 64 * 32, dtype=torch.bfloat16)  # one buffer, two views, as the ring has
    grads = {"w1": buf[:2048].view(64, 32), "w2": buf[2048:].view(32, 64)}
    cache = A.RecordSpecCache()
    for _ in range(4):
        buf.copy_(torch.randn(buf.numel()).bfloat16())
        specs = cache.specs(0, cached_rec, grads)
        assert A.adamw_raw(specs, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, check_finite=True) is False
        assert A.adamw_record(plain_rec, grads, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1) is False
    assert len(cache._specs) == 1 and cached_rec["step"].item() == 4
    for n in cached_rec:
        assert torch.equal(cached_rec[n], plain_rec[n]), n
    as_fp16 = {"w1": buf[:2048].view(torch.float16).view(64, 32), "w2": grads["w2"]}
    assert len(cache.specs(0, cached_rec, as_fp16)) == 2 and len(cache._specs) == 2  # new dtype: its own entry
    wrong_size = {"w1": buf[:1024], "w2": grads["w2"]}
    with pytest.raises(ValueError, match="elements"):
        cache.specs(0, cached_rec, wrong_size)


def test_store_adam_step_uses_fused_kernel(tmp_path):
    # TieredExpertStore.adam_step finds gmtier.adam.adamw_record and updates the RAM record in place.
    store_mod = pytest.importorskip("gmtier.store")
    schema = [("w1", "bf16", [16, 32], "weights"), ("w1.master", "float32", [16, 32], "state"),
              ("w1.exp_avg", "float32", [16, 32], "state"), ("w1.exp_avg_sq", "float32", [16, 32], "state"),
              ("step", "i64", [1], "state")]
    masters = {}

    def init(layer, expert):
        g = torch.Generator().manual_seed(layer * 10 + expert)
        w = torch.randn(16, 32, generator=g)
        masters[(layer, expert)] = w
        return {"w1": w.bfloat16(), "w1.master": w, "w1.exp_avg": torch.zeros(16, 32),
                "w1.exp_avg_sq": torch.zeros(16, 32), "step": torch.zeros(1, dtype=torch.int64)}

    d = tmp_path / "store"
    store_mod.TieredExpertStore.create(d, 1, 2, schema, init=init)
    with store_mod.TieredExpertStore.open(d, ram_bytes=1 << 24) as s:
        s.acquire((0, 1))
        grad = torch.randn(16, 32).bfloat16()
        ref = torch.nn.Parameter(masters[(0, 1)].clone())
        opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        ref.grad = grad.float()
        opt.step()
        assert s.adam_step([(0, 1)], [{"w1": grad}], lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1) == [False]
        rec = s.record((0, 1))
        assert rec["step"].item() == 1
        assert _rel(rec["w1.master"], ref.detach(), 0.1) < 1e-6
        assert torch.equal(rec["w1"], rec["w1.master"].bfloat16())
        s.release([(0, 1)])
        # Several experts in one call: each skipped on its own; the others match torch.
        keys = [(0, 0), (0, 1)]
        s.acquire_many(keys)
        before = {k: {n: t.clone() for n, t in s.record(k).items()} for k in keys}
        good = torch.randn(16, 32).bfloat16()
        bad = good.clone()
        bad[3, 4] = float("nan")
        ref = torch.nn.Parameter(masters[(0, 0)].clone())
        opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        ref.grad = good.float()
        opt.step()
        assert s.adam_step(keys, [{"w1": good}, {"w1": bad}], lr=1e-2, beta1=0.9, beta2=0.95,
                           weight_decay=0.1) == [False, True]
        assert _rel(s.record((0, 0))["w1.master"], ref.detach(), 0.1) < 1e-6
        assert s.record((0, 0))["step"].item() == 1
        for n, t in s.record((0, 1)).items():
            assert torch.equal(t, before[(0, 1)][n]), f"skipped expert's {n} was written"
        s.release(keys)


def test_dropped_handle_finishes_before_freeing():
    n = 1 << 20
    for _ in range(3):
        p = torch.randn(n)
        A.adamw_step([(p, torch.zeros(n), torch.zeros(n), torch.randn(n), torch.zeros(1, dtype=torch.int64))],
                     lr=1e-3, async_=True)  # handle dropped at once: __del__ waits
        del p


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_works_in_forked_child():
    import os

    n = 1 << 20
    t = (torch.randn(n), torch.zeros(n), torch.zeros(n), torch.randn(n), torch.zeros(1, dtype=torch.int64))
    A.adamw_step([t], lr=1e-3)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child inherits no pool threads: must not hang
        try:
            A.adamw_step([t], lr=1e-3)
            os._exit(0 if t[4].item() == 2 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
