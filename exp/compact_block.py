"""The compact AdamW's block size: the quantization error of m and v on gradients shaped like a
transformer FFN's (rows of very different scale, heavy tails, a few outlier columns) against an
fp64 AdamW run on the same gradients, and the kernel's speed, for each block size.

    python exp/compact_block.py --steps 40 --threads 1

Error: the relative RMS error of the update direction m_hat / (sqrt(v_hat) + eps) after
`--steps` steps (the weights are not stepped: lr 0, so only the moments' quantization counts).
"""

import argparse
import json
import time

import numpy as np
import torch

from gmtier import compact_adam as ca


def gradients(rows: int, cols: int, steps: int, seed: int = 0):
    g = np.random.default_rng(seed)
    row_scale = np.exp(g.normal(0, 1.5, size=(rows, 1)))  # rows differ by orders of magnitude
    col_out = np.ones((1, cols))
    col_out[0, g.choice(cols, cols // 64, replace=False)] = 20.0  # outlier features
    for _ in range(steps):
        yield (g.standard_t(3, size=(rows, cols)) * row_scale * col_out * 1e-3).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    a = ap.parse_args()
    b1, b2, eps = 0.9, 0.95, 1e-8
    n = a.rows * a.cols
    for block in a.blocks:
        st = ca.compact_state(torch.zeros(n), block)
        m64, v64 = np.zeros(n), np.zeros(n)
        grad = torch.zeros(n)
        t = ca.CompactTensors(st["weight"], st["m_codes"], st["v_codes"], st["m_scales"], st["v_scales"], grad,
                              st["step"])
        for gr in gradients(a.rows, a.cols, a.steps):
            grad.copy_(torch.from_numpy(gr.reshape(-1)))
            ca.adamw_compact_step([[t]], lr=0.0, betas=(b1, b2), eps=eps, weight_decay=0.0, block=block,
                                  threads=a.threads)
            m64 = b1 * m64 + (1 - b1) * gr.reshape(-1)
            v64 = b2 * v64 + (1 - b2) * gr.reshape(-1).astype(np.float64) ** 2
        m = ca.dequantize(st["m_codes"], st["m_scales"], "m", block).double().numpy()
        v = ca.dequantize(st["v_codes"], st["v_scales"], "v", block).double().numpy()
        d64 = m64 / (np.sqrt(v64) + eps)
        d = m / (np.sqrt(v) + eps)
        err = float(np.sqrt(np.mean((d - d64) ** 2)) / np.sqrt(np.mean(d64 ** 2)))
        m_err = float(np.linalg.norm(m - m64) / np.linalg.norm(m64))
        v_err = float(np.linalg.norm(v - v64) / np.linalg.norm(v64))
        v_zero = float(np.mean((v == 0) & (v64 > 0)))
        big = 1 << 23
        sb = ca.compact_state(torch.randn(big), block)
        gb = (torch.randn(big) * 1e-3).bfloat16()
        tb = ca.CompactTensors(sb["weight"], sb["m_codes"], sb["v_codes"], sb["m_scales"], sb["v_scales"], gb,
                               sb["step"])
        ca.adamw_compact_step([[tb]], lr=1e-3, block=block, threads=a.threads)
        ts = []
        for _ in range(5):
            t0 = time.process_time()  # CPU time: steadier than wall time on a shared machine
            ca.adamw_compact_step([[tb]], lr=1e-3, block=block, threads=a.threads)
            ts.append(time.process_time() - t0)
        print(json.dumps({"block": block, "direction_rel_rms_err": round(err, 4), "m_rel_err": round(m_err, 4),
                          "v_rel_err": round(v_err, 4), "v_flushed_to_zero": v_zero,
                          "mparams_per_cpu_s": round(big / min(ts) / 1e6)}))


if __name__ == "__main__":
    main()
