"""The Switch GPT: a causal decoder whose every k-th FFN is a top-1 Switch layer.

The dense part (embeddings, attention, norms, routers, dense FFNs) is an ordinary nn.Module.
A Switch layer routes every token of the step (fp32 router, load-balancing and z losses,
capacity with token dropping or dropless), sorts the kept tokens by expert and hands them to an
*expert bank* (`gmtier.experts.bank`): `ResidentExperts` (experts as nn.Parameters, the
reference, the default) or `TieredExperts` (experts paged from the tiered store, updated by the
CPU AdamW during backward). A bank that runs grouped GEMMs takes the routing as it is on the
device instead (each token's GEMM row, `bank.token_rows`): no host sync in the layer; in
training such layers replay CUDA graphs (`gmtier.experts.graphed`). A hook sees each block's input (`set_block_input_hook`), and
`route_votes` applies the routers ahead to it, which is what the tiered runtime predicts with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gmtier.config import ModelConfig
from gmtier.experts.bank import HostCopy, ResidentExperts, compute_dtype, expert_ffn, token_rows  # noqa: F401  (expert_ffn: the experts' math, re-exported)


# ---- routing ------------------------------------------------------------------------------

@dataclass
class Routing:
    expert: torch.Tensor  # [T] long: the argmax expert of each token
    gate: torch.Tensor  # [T] fp32: its router probability
    keep: torch.Tensor  # [T] bool: False for tokens dropped by the capacity limit
    aux_loss: torch.Tensor  # Switch eq. 4 without alpha: N * sum_i f_i * P_i
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2)
    rank: torch.Tensor  # [T] long: the token's place in its expert's queue (in token order)
    frac: torch.Tensor | None = None  # [N] share of the tokens routed to each expert (before dropping)


def capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
    """Tokens an expert may take: ceil(capacity_factor * T / N); 0 factor = dropless (T)."""
    if not capacity_factor:
        return n_tokens
    return math.ceil(capacity_factor * n_tokens / n_experts)


def route(logits: torch.Tensor, capacity_factor: float, sync=None) -> Routing:
    """Top-1 routing of logits [T, N] (fp32). Over capacity, an expert keeps its first tokens
    in order (the rest pass through the residual only).

    `sync` (expert parallelism, `gmtier.distributed`): these are one rank's tokens of a step that
    is routed as a whole; `sync(counts)` takes this rank's tokens per expert and returns (the
    step's tokens per expert, those of the ranks before this one, the step's token count), so
    capacity, queue positions and the expert shares `f` are the step's. The losses stay this
    rank's share (its mean router probabilities and z), whose mean over the ranks is the step's."""
    T, N = logits.shape
    probs = logits.softmax(-1)
    gate, expert = probs.max(-1)
    # The one-hot of the choices, expert-major: [N, T], so the queue scan below runs over
    # contiguous memory (the token-axis scan of a [T, N] one-hot took 2.6 ms per layer for 16K
    # tokens on an H200, a tenth of the `small` step).
    onehot = probs.new_zeros((N, T)).scatter_(0, expert.unsqueeze(0), 1.0)
    before, T_all = 0, T
    if sync is None:
        f = onehot.mean(1)  # fraction of tokens dispatched to each expert (before dropping)
    else:
        total, before, T_all = sync(onehot.sum(1))
        f = total / T_all
    P = probs.mean(0)  # mean router probability per expert
    aux = N * torch.dot(f, P)
    z = torch.logsumexp(logits, -1).square().mean()
    # Position of each token within its expert's queue: its expert's running count (exact in
    # fp32 up to 2^24 tokens).
    rank = onehot.cumsum(1).gather(0, expert.unsqueeze(0)).squeeze(0) - 1
    if sync is not None:
        rank = rank + before[expert]  # behind the tokens of the ranks before this one
    keep = rank < capacity(T_all, N, capacity_factor)
    return Routing(expert, gate, keep, aux, z, rank.long(), f)


class SwitchFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: nn.Module):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = experts
        self.aux_loss = self.z_loss = None
        self.route_sync = None  # expert parallelism: see route() and gmtier.distributed
        self.graphs = None  # the model's SwitchGraphs where training steps replay CUDA graphs (gmtier.experts.graphed)
        self._last: tuple[HostCopy, int] | None = None  # the last forward's kept tokens per expert, and its tokens

    @property
    def last_experts(self) -> set[int]:
        """Experts that got tokens in the last forward (the routing trace)."""
        return {e for e, c in enumerate(self._last[0].tolist()) if c} if self._last else set()

    @property
    def last_drop_frac(self) -> float:
        """The share of the last forward's tokens dropped by the capacity limit."""
        return 1.0 - sum(self._last[0].tolist()) / self._last[1] if self._last else 0.0

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
        # Evaluation and generation route at their own factor (0 = dropless): a token is never
        # dropped because of what else is in the batch.
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        if self.graphs is not None and (out := self.graphs.run(self, h)) is not None:
            y, self.aux_loss, self.z_loss, counts = out  # a training step's layer: its CUDA graph replayed
            self._last = (counts, h.shape[0])
            return y.view(shape)
        if self.route_sync is None and self.experts.takes_device_routing(h):
            y, self.aux_loss, self.z_loss, t = self.routed_on_device(h, factor, compute_dtype(h))
            self._last = (t.counts, h.shape[0])
            return y.view(shape)
        r = route(self.router_logits(h, jitter=self.training), factor, self.route_sync)
        order, counts = self.dispatch(r)
        y_sorted = self.experts(h[order], counts)
        y = torch.zeros_like(h).index_copy(0, order, y_sorted.to(h.dtype))
        return (y * r.gate.to(h.dtype).unsqueeze(1)).view(shape)

    def routed_on_device(self, h: torch.Tensor, factor: float, dtype: torch.dtype, to_host: bool = True):
        """The layer without a host sync, for a bank that takes the routing as it is on the device
        (grouped GEMMs: each token's GEMM row from device counts): (the output [T, d] in h's
        dtype, aux loss, z loss, the `TokenRows`). The experts' GEMMs run in `dtype` whatever
        autocast says, so a CUDA graph captured without autocast gives the same numbers."""
        r = route(self.router_logits(h, jitter=self.training), factor)
        T, N = h.shape[0], self.cfg.n_experts
        t = token_rows(r.expert, r.rank, r.keep, N, min(T, N * capacity(T, N, factor)), self.experts.pad_rows, to_host)
        return self.experts.forward_tokens(h, t, r.gate, dtype).to(h.dtype), r.aux_loss, r.z_loss, t

    def dispatch(self, r: Routing) -> tuple[torch.Tensor, list[int]]:
        """The kept tokens grouped by expert (stable: in token order within an expert) and each
        expert's count (a host sync); keeps the routing's losses and trace on the module."""
        self.aux_loss, self.z_loss = r.aux_loss, r.z_loss
        kept = r.keep.nonzero().squeeze(1)
        order = kept[torch.argsort(r.expert[kept], stable=True)]  # kept tokens, grouped by expert
        counts = torch.bincount(r.expert[order], minlength=self.cfg.n_experts).tolist()
        self._last = (HostCopy(counts), r.expert.shape[0])
        return order, counts


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
        x = self.attn_residual(x, rope, checkpointed=self.checkpoint and self.training)
        return x + self.ffn(self.ln_2(x))

    def attn_residual(self, x, rope, checkpointed: bool = False):
        """x + attention(ln_1(x)): the first half of the block (the FFN half takes ln_2 of it)."""
        if checkpointed:
            # Only the attention half is recomputed: re-running a Switch FFN would page its experts again.
            return x + checkpoint(lambda t: self.attn(self.ln_1(t), rope), x, use_reentrant=False)
        return x + self.attn(self.ln_1(x), rope)


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
        self._block_input_hook: Callable[[int, torch.Tensor], None] | None = None

    def set_block_input_hook(self, hook: Callable[[int, torch.Tensor], None] | None) -> None:
        """`hook(block index, hidden states)` is called with each block's input in forward
        (None: no hook)."""
        self._block_input_hook = hook

    @torch.no_grad()
    def route_votes(self, blocks: list[int], x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """For hidden states `x` (or a step's micro-batches of them, summed), how many tokens the
        router of each Switch block in `blocks` would send to each expert if `x` reached it:
        [len(blocks), n_experts]."""
        parts = x if isinstance(x, (list, tuple)) else [x]
        votes = []
        for i in blocks:
            blk = self.blocks[i]
            v = 0
            for part in parts:
                h = part.reshape(-1, part.shape[-1])
                v = v + torch.bincount(blk.ffn.router_logits(blk.ln_2(h)).argmax(-1), minlength=self.cfg.n_experts)
            votes.append(v)
        return torch.stack(votes)

    def switch_blocks(self) -> list[SwitchFFN]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, SwitchFFN)]

    def set_checkpointing(self, on: bool) -> None:
        for b in self.blocks:
            b.checkpoint = on

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns (logits, loss, aux) where loss is the LM cross entropy (None without targets)
        and aux the summed router losses to add (already weighted by the config's coefficients)."""
        x = self.embed(idx)
        rope = self.rope()
        for i, block in enumerate(self.blocks):
            self.block_input(i, x)
            x = block(x, rope)
        logits = self.head(x)
        aux = x.new_zeros((), dtype=torch.float32)
        for s in self.switch_blocks():
            aux = aux + self.router_losses(s.aux_loss, s.z_loss)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, aux

    # The pieces of forward, also run one at a time by the layer-major step (gmtier.layer_major).
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return x

    def rope(self):
        return (self.rope_cos, self.rope_sin) if self.cfg.positions == "rope" else None

    def block_input(self, i: int, x) -> None:
        """Block `i`'s input (a tensor, or a step's micro-batches) reaches the hook."""
        if self._block_input_hook is not None:
            self._block_input_hook(i, x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output head

    def router_losses(self, aux_loss: torch.Tensor, z_loss: torch.Tensor) -> torch.Tensor:
        """A Switch layer's load-balancing and z losses, weighted by the config's coefficients."""
        return self.cfg.aux_loss_coef * aux_loss + self.cfg.z_loss_coef * z_loss

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
