"""The Switch GPT in one file: a causal decoder whose every k-th FFN is a top-1 Switch layer.

The dense part (embeddings, attention, norms, routers, dense FFNs) is an ordinary nn.Module.
A Switch layer routes every token of the step (fp32 router, load-balancing and z losses,
capacity with token dropping or dropless), sorts the kept tokens by expert and hands them to an
*expert bank*: either `ResidentExperts` (experts as nn.Parameters, the reference) or
`gmtier.experts.TieredExperts` (experts paged from the tiered store, updated by the CPU AdamW
during backward). Both compute `expert_ffn` on the same sorted tokens, so they agree to
floating point.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gmtier.config import ModelConfig


# ---- experts ------------------------------------------------------------------------------

def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert: x [n, d] -> gelu(x w1^T) w2^T, with w1 [d_ff, d] and w2 [d, d_ff] (bias-free);
    written into `out` (a slice of the layer's output, same dtype) when given."""
    h = F.gelu(F.linear(x, w1))
    return F.linear(h, w2) if out is None else torch.mm(h, w2.t(), out=out)


def expert_starts(counts: list[int]) -> list[int]:
    """The first row of each expert's tokens in the sorted order (counts[e] rows each)."""
    return list(itertools.accumulate(counts, initial=0))[:-1]


def gemm_row_layout(counts: list[int], multiple: int, device) -> tuple[list[int], torch.Tensor | None]:
    """Rows of the per-expert GEMMs: each expert's count rounded up to `multiple`, zero rows
    filling the gap, so the GEMM shapes repeat from step to step and cuBLAS finds them in its
    heuristics cache (on an H200 a bf16 GEMM of a new shape took ~600 us of host time, one it had
    seen ~30 us). Returns the padded counts and the padded row of every sorted token, or
    (counts, None) when `multiple` <= 1."""
    if multiple <= 1:
        return counts, None
    padded = [-(-c // multiple) * multiple for c in counts]
    n = sum(counts)
    shift = torch.tensor(expert_starts(padded)) - torch.tensor(expert_starts(counts))
    rows = torch.arange(n) + shift.repeat_interleave(torch.tensor(counts), output_size=n)
    if torch.device(device).type == "cuda":  # from pinned memory: a pageable copy would sync the stream
        rows = rows.pin_memory().to(device, non_blocking=True)
    return padded, rows


def to_gemm_rows(t: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """The sorted rows `t` moved to `rows` of a zeroed [n_rows, d] (as is without padding)."""
    return t if rows is None else t.new_zeros((n_rows, t.shape[1])).index_copy(0, rows, t)


def from_gemm_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def init_expert(seed: int, layer: int, expert: int, d_model: int, d_ff: int, std: float, n_layer: int):
    """The initial (w1, w2) of one expert in fp32, a pure function of (seed, layer, expert), so a
    store can be filled one record at a time and a resident bank gets the same numbers."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + expert + 1)
    w1 = torch.randn(d_ff, d_model, generator=g) * std
    w2 = torch.randn(d_model, d_ff, generator=g) * (std / math.sqrt(2 * n_layer))
    return w1, w2


class ResidentExperts(nn.Module):
    """The reference expert bank: every expert is a pair of nn.Parameters on the model's device."""

    def __init__(self, cfg: ModelConfig, layer: int, seed: int, pad_rows: int = 0):
        super().__init__()
        self.pad_rows = pad_rows  # see gemm_row_layout
        self.w1 = nn.ParameterList()
        self.w2 = nn.ParameterList()
        for e in range(cfg.n_experts):
            w1, w2 = init_expert(seed, layer, e, cfg.d_model, cfg.d_ff, cfg.init_std, cfg.n_layer)
            self.w1.append(nn.Parameter(w1))
            self.w2.append(nn.Parameter(w2))

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: the kept tokens sorted by expert; counts[e] tokens go to expert e."""
        counts_p, rows = gemm_row_layout(counts, self.pad_rows, x_sorted.device)
        outs = []
        for e, part in enumerate(torch.split(to_gemm_rows(x_sorted, rows, sum(counts_p)), counts_p)):
            if counts_p[e]:
                outs.append(expert_ffn(part, self.w1[e].to(part.dtype), self.w2[e].to(part.dtype)))
        return from_gemm_rows(torch.cat(outs), rows) if outs else x_sorted.new_zeros(x_sorted.shape)


# ---- routing ------------------------------------------------------------------------------

@dataclass
class Routing:
    expert: torch.Tensor  # [T] long: the argmax expert of each token
    gate: torch.Tensor  # [T] fp32: its router probability
    keep: torch.Tensor  # [T] bool: False for tokens dropped by the capacity limit
    aux_loss: torch.Tensor  # Switch eq. 4 without alpha: N * sum_i f_i * P_i
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2)


def capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
    """Tokens an expert may take: ceil(capacity_factor * T / N); 0 factor = dropless (T)."""
    if not capacity_factor:
        return n_tokens
    return math.ceil(capacity_factor * n_tokens / n_experts)


def route(logits: torch.Tensor, capacity_factor: float) -> Routing:
    """Top-1 routing of logits [T, N] (fp32). Over capacity, an expert keeps its first tokens
    in order (the rest pass through the residual only)."""
    T, N = logits.shape
    probs = logits.softmax(-1)
    gate, expert = probs.max(-1)
    onehot = F.one_hot(expert, N).to(probs.dtype)
    f = onehot.mean(0)  # fraction of tokens dispatched to each expert (before dropping)
    P = probs.mean(0)  # mean router probability per expert
    aux = N * (f * P).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    # Position of each token within its expert's queue: a scan along the token axis, run over the
    # transposed copy so it scans contiguous memory (the outer-dimension scan took 2.6 ms per
    # layer for 16K tokens on an H200, a tenth of the `small` step).
    rank = (onehot.t().contiguous().cumsum(1).t() * onehot).sum(-1) - 1
    keep = rank < capacity(T, N, capacity_factor)
    return Routing(expert, gate, keep, aux, z)


class SwitchFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: nn.Module):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = experts
        self.aux_loss = self.z_loss = None
        self.last_experts: set[int] = set()  # experts that got tokens in the last forward (for prefetch stats)
        self.last_drop_frac = 0.0

    def router_logits(self, x: torch.Tensor, jitter: bool = False) -> torch.Tensor:
        """fp32 router logits for tokens x [T, d], with autocast off."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if jitter and self.cfg.router_jitter > 0:
                eps = self.cfg.router_jitter
                x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
            return F.linear(x, self.router.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        r = route(self.router_logits(h, jitter=self.training), self.cfg.capacity_factor)
        self.aux_loss, self.z_loss = r.aux_loss, r.z_loss
        kept = r.keep.nonzero().squeeze(1)
        order = kept[torch.argsort(r.expert[kept], stable=True)]  # kept tokens, grouped by expert
        counts = torch.bincount(r.expert[order], minlength=self.cfg.n_experts).tolist()
        self.last_experts = {e for e, c in enumerate(counts) if c}
        self.last_drop_frac = 1.0 - len(kept) / h.shape[0]
        y_sorted = self.experts(h[order], counts)
        y = torch.zeros_like(h).index_copy(0, order, y_sorted.to(h.dtype))
        return (y * r.gate.to(h.dtype).unsqueeze(1)).view(shape)


# ---- the dense part -----------------------------------------------------------------------

def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope[0][:S], rope[1][:S]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn
        self.checkpoint = False

    def forward(self, x, rope):
        if self.checkpoint and self.training:
            # Only the attention half is recomputed: re-running a Switch FFN would page its experts again.
            x = x + checkpoint(lambda t: self.attn(self.ln_1(t), rope), x, use_reentrant=False)
        else:
            x = x + self.attn(self.ln_1(x), rope)
        return x + self.ffn(self.ln_2(x))


class GPT(nn.Module):
    """`expert_bank(layer) -> nn.Module` builds the expert bank of each Switch block
    (default: `ResidentExperts`)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, expert_bank=None):
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(seed)  # the dense init; experts have their own per-expert seeds
        bank = expert_bank or (lambda layer: ResidentExperts(cfg, layer, seed))
        switch = set(cfg.switch_layers())
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(
            Block(cfg, SwitchFFN(cfg, i, bank(i)) if i in switch else DenseFFN(cfg)) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for name, p in self.named_parameters():
            if ".experts." in name:
                continue
            if p.dim() >= 2:  # matrices (routers included) ~ N(0, init_std); residual outputs scaled down
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "w2.weight")) else cfg.init_std
                nn.init.normal_(p, 0.0, std)
        if cfg.positions == "rope":
            cos, sin = rope_cache(cfg.seq_len, cfg.d_model // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.prefetcher = None  # set by the tiered runtime: called with (block index, hidden states)

    def switch_blocks(self) -> list[SwitchFFN]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, SwitchFFN)]

    def set_checkpointing(self, on: bool) -> None:
        for b in self.blocks:
            b.checkpoint = on

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns (logits, loss, aux) where loss is the LM cross entropy (None without targets)
        and aux the summed router losses to add (already weighted by the config's coefficients)."""
        B, S = idx.shape
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(S, device=idx.device))
        rope = (self.rope_cos, self.rope_sin) if self.cfg.positions == "rope" else None
        for i, block in enumerate(self.blocks):
            if self.prefetcher is not None:
                self.prefetcher(i, x)
            x = block(x, rope)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)  # tied output head
        aux = x.new_zeros((), dtype=torch.float32)
        for s in self.switch_blocks():
            aux = aux + self.cfg.aux_loss_coef * s.aux_loss + self.cfg.z_loss_coef * s.z_loss
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, aux

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits, _, _ = self(idx[:, -self.cfg.seq_len:])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), 1)
        return idx


def count_params(cfg: ModelConfig) -> dict:
    """Total and per-token active parameters (the tied head counted once)."""
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layer
    n_switch = len(cfg.switch_layers())
    attn = L * (4 * d * d + 4 * d)  # qkv + proj + 2 layernorms
    dense_ffn = (L - n_switch) * 2 * d * f
    routers = n_switch * cfg.n_experts * d
    embed = cfg.vocab_size * d + (cfg.seq_len * d if cfg.positions == "learned" else 0) + 2 * d
    expert = 2 * d * f
    dense = attn + dense_ffn + routers + embed
    return {"dense": dense, "experts": n_switch * cfg.n_experts * expert, "expert": expert,
            "total": dense + n_switch * cfg.n_experts * expert, "active_per_token": dense + n_switch * expert}
