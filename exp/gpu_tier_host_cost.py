"""Host time per acquire + release through the GPU tier, on the GPU (or emulated on CPU with
--device cpu), for hits (the tier holds every expert) and misses (each acquire copies): the
per-expert bookkeeping the paging loop pays a few hundred times a step. Works with any wheel
(public API only), so two wheels can be compared side by side:
    PYTHONPATH=/tmp/site_old python3 exp/gpu_tier_host_cost.py
    PYTHONPATH=/tmp/site_new python3 exp/gpu_tier_host_cost.py
Prints one JSON line."""

import argparse
import json
import os
import tempfile
import time

import torch

from gmtier.store import TieredExpertStore

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--experts", type=int, default=32)
ap.add_argument("--mib", type=float, default=1.0, help="weights per expert")
ap.add_argument("--iters", type=int, default=4000)
a = ap.parse_args()
if a.device == "cpu":
    os.environ["GMTIER_EMULATE_GPU_TIER"] = "1"
n = int(a.mib * 2**20) // 4 // 2
schema = [("w1", "f32", [n], "weights"), ("w2", "f32", [n], "weights"), ("m", "f32", [16], "state")]
d = tempfile.mkdtemp()
TieredExpertStore.create(d + "/s", 1, a.experts, schema)
probe = TieredExpertStore.open(d + "/s", ram_bytes=1 << 30)
rb, wb = probe.record_bytes, probe.weights_bytes
probe.close()
out = {"device": a.device, "weights_bytes": wb, "gmtier": os.path.dirname(__import__("gmtier").__file__)}
for name, slots in (("hit", a.experts), ("miss", a.experts // 4)):
    s = TieredExpertStore.open(d + "/s", ram_bytes=a.experts * rb, gpu_bytes=slots * wb, device=a.device)
    keys = [(0, e) for e in range(a.experts)]
    for k in keys:
        s.acquire(k)
        s.release([k])
    best = float("inf")
    for rep in range(5):
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(a.iters):
            k = keys[i % a.experts]
            s.acquire(k, sections="weights" if name == "hit" else "all")
            s.release([k])
        host = time.perf_counter() - t0
        if a.device == "cuda":
            torch.cuda.synchronize()
        best = min(best, host / a.iters)
        wall = time.perf_counter() - t0
    out[f"{name}_host_us"] = best * 1e6
    out[f"{name}_wall_us_last"] = wall / a.iters * 1e6
    s.close()
print(json.dumps(out))
