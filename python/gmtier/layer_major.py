"""The layer-major step: `train.micro_batches` = M micro-batches a step, each expert paged once.

A step of M micro-batches equals one batch of all their sequences (the same loss, routing and
gradients up to float rounding), run so that only one micro-batch's dense activations are
alive at a time:

- Forward runs block by block; block i runs for micro-batches 1..M before block i+1, without
  an autograd graph. Each block's input for every micro-batch is put in the `ActivationStash`
  (device, pinned RAM, disk). At a Switch block the router logits of all M micro-batches are
  routed together: capacity (capacity_factor x the step's tokens / experts) and the aux and z
  losses are over the step's tokens, exactly as for one big batch. The kept tokens of the step
  are gathered per expert, the expert bank runs each expert once over all of them
  (`step_forward`: the tiered bank pages each expert in once), and the outputs return to their
  micro-batches. The sorted tokens and outputs are stashed too.
- The head's loss (cross entropy summed over each micro-batch, divided by the step's tokens) is
  backpropagated micro-batch by micro-batch to the last block's output.
- Backward walks the blocks in reverse. A dense block is recomputed from its stashed input,
  micro-batch by micro-batch, and backpropagated. A Switch block first runs its experts'
  backward once over the step's tokens (`step_backward`: the tiered bank pages each expert once,
  computes dx and dW over all its tokens and runs its AdamW once), then recomputes the block
  per micro-batch with the stashed expert outputs as constants and backpropagates the
  gradients of its output, of the expert inputs (dx) and of the router losses together.
- The dense gradients accumulate in `.grad` over the micro-batches; the caller steps the dense
  optimizer once.

Router jitter draws random numbers: the generator state before each micro-batch's draw is kept
and replayed in the recompute, so the recomputed routing is the one forward used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gmtier.activations import ActivationStash
from gmtier.experts.bank import gemm_row_layout
from gmtier.model import GPT, SwitchFFN, capacity, route


@dataclass
class _SwitchSaved:
    """What backward needs of a Switch block's step-level routing (small: a few numbers a token)."""
    expert: torch.Tensor  # [T_step] the chosen expert of every token
    gate: torch.Tensor  # [T_step] its router probability (detached)
    frac: torch.Tensor  # [n_experts] share of the step's tokens routed to each (before dropping)
    counts: list[int]  # kept tokens per expert
    pos: list[torch.Tensor]  # per micro-batch: where its kept tokens are in the sorted order
    local: list[torch.Tensor]  # per micro-batch: which of its tokens they are
    bank_saved: object  # what the expert bank's step_forward handed back
    rng: list  # per micro-batch: the generator state before the router jitter (or None)


class LayerMajorStep:
    """Runs one step over M micro-batches for a `GPT` (see the module doc)."""

    def __init__(self, model: GPT, stash: ActivationStash, autocast):
        self.model, self.stash, self.autocast = model, stash, autocast
        self.cfg = model.cfg
        self._saved: dict[int, _SwitchSaved] = {}
        self.where = "before the step"  # the phase and block running now (named in errors)

    # ---- sizes -------------------------------------------------------------------------------
    def stash_bytes(self, micro_batches: int, tokens: int, act_bytes: int, expert_bytes: int) -> int:
        """An upper bound of what a step keeps: every block's input for every micro-batch
        (`tokens` each, `act_bytes` per element), per Switch block its kept tokens sorted and
        the experts' outputs, and the output gradients of one Switch block."""
        c, d = self.cfg, self.cfg.d_model
        step = micro_batches * tokens
        kept = min(step, c.n_experts * capacity(step, c.n_experts, c.capacity_factor))
        per_switch = kept * d * 2 * expert_bytes
        # + the output gradients a Switch block's backward puts aside (one block's worth, last).
        return (c.n_layer + 1) * micro_batches * tokens * d * act_bytes + len(c.switch_layers()) * per_switch

    # ---- the step ----------------------------------------------------------------------------
    def run(self, xs: list[torch.Tensor], ys: list[torch.Tensor], loss_scale: float = 1.0):
        """Forward and backward of one step over micro-batches `xs` (token ids [B, S] each) with
        targets `ys`; the dense gradients are left in `.grad` (scaled by `loss_scale`). Returns
        (loss, aux) of the step as 0-d tensors."""
        model, stash = self.model, self.stash
        sizes = {x.numel() for x in xs}
        if len(sizes) != 1:
            raise ValueError(f"micro-batches of different sizes {sorted(sizes)}: a step needs equal ones")
        self.tokens, self.step_tokens = xs[0].numel(), sum(x.numel() for x in xs)
        rope = model.rope()
        try:
            with torch.no_grad(), self.autocast():
                hs = [model.embed(x) for x in xs]
                self.expert_dtype = _expert_dtype(model, hs[0])
                expert_bytes = torch.empty((), dtype=self.expert_dtype).element_size()
                stash.begin_step(self.stash_bytes(len(xs), self.tokens, hs[0].element_size(), expert_bytes))
                aux = hs[0].new_zeros((), dtype=torch.float32)
                for i, block in enumerate(model.blocks):
                    self.where = f"forward of block {i}"
                    model.block_input(i, hs)
                    for m, h in enumerate(hs):
                        stash.put(("in", i, m), h)
                    if isinstance(block.ffn, SwitchFFN):
                        hs, block_aux = self._switch_forward(i, block, hs, rope)
                        aux = aux + block_aux
                    else:
                        for m in range(len(hs)):  # in place: each input goes as its output comes
                            hs[m] = _dense_block(block, hs[m], rope)
            stash.expect(self._backward_order(len(xs)))
            self.where = "the head"
            loss, grads = self._head(hs, ys, loss_scale)
            del hs
            for i in reversed(range(len(model.blocks))):
                block = model.blocks[i]
                self.where = f"backward of block {i}"
                if isinstance(block.ffn, SwitchFFN):
                    grads = self._switch_backward(i, block, grads, rope, loss_scale)
                else:
                    grads = self._dense_backward(i, block, grads, rope)
            for x, g in zip(xs, grads):
                with torch.enable_grad(), self.autocast():
                    e = model.embed(x)
                torch.autograd.backward(e, self._take(g))
        finally:
            self._saved.clear()
            stash.end_step()
        return loss, aux

    def _backward_order(self, micro_batches: int) -> list:
        """The stash's keys in the order backward gets them."""
        keys = []
        for i in reversed(range(len(self.model.blocks))):
            if isinstance(self.model.blocks[i].ffn, SwitchFFN):
                keys += [("xs", i), ("ys", i)]
            keys += [("in", i, m) for m in range(micro_batches)]
        return keys

    def _head(self, hs, ys, loss_scale: float):
        """The loss over the step's tokens and its gradient at the last block's output (taken
        out of `hs` as it goes; the gradients are parked as the last block's input gradients)."""
        loss, grads = 0.0, []
        bank = len(self.model.blocks) % 2  # the bank a block after the last would park them in
        for m, y in enumerate(ys):
            h, hs[m] = hs[m].detach().requires_grad_(), None
            with torch.enable_grad(), self.autocast():
                logits = self.model.head(h)
                part = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1),
                                       reduction="sum") / self.step_tokens
            (part * loss_scale).backward()
            loss = loss + part.detach()
            self.stash.park(("grad_in", len(self.model.blocks), m), h.grad, bank)
            grads.append(("grad_in", len(self.model.blocks), m))
        return loss, grads

    def _dense_backward(self, i: int, block, grads, rope):
        out_grads = []
        for m, g in enumerate(grads):
            h = self.stash.get(("in", i, m)).requires_grad_()
            with torch.enable_grad(), self.autocast():
                out = _dense_block(block, h, rope)
            torch.autograd.backward(out, self._take(g))
            grads[m] = None
            # Parked as they come (the bank this block's inputs' gradients go to, the other than
            # the one read now): a Switch block below sets out its sorted tokens beside them.
            self.stash.park(("grad_in", i, m), h.grad, i % 2)
            out_grads.append(("grad_in", i, m))
        return out_grads

    # ---- Switch blocks -----------------------------------------------------------------------
    def _switch_forward(self, i: int, block, hs, rope):
        """Block i over the step; takes the inputs out of `hs` as it goes (each is stashed)."""
        ffn, d, T = block.ffn, self.cfg.d_model, self.tokens
        jitter = self.cfg.router_jitter > 0
        stash, bank = self.stash, i % 2
        logits, rng = [], []
        for m in range(len(hs)):
            a = block.attn_residual(hs[m], rope)
            hs[m] = None
            u = block.ln_2(a).reshape(-1, d)
            rng.append(_rng_state(u.device) if jitter else None)
            logits.append(ffn.router_logits(u, jitter=True))
            # The step's residual stream waits for the routing of all its tokens: set aside (off
            # the device where the step's activations exceed its budget) while the experts run.
            stash.park(("a", i, m), a, bank)
        r = route(torch.cat(logits), self.cfg.capacity_factor, ffn.route_sync)  # capacity and losses over the step
        order, counts = ffn.dispatch(r)
        # Each micro-batch's kept tokens: their rows in the experts' GEMMs (each expert's count
        # rounded up to the bank's row multiple, zero rows between; see gemm_row_layout), and
        # which of the micro-batch's tokens they are.
        counts, rows = gemm_row_layout(counts, ffn.experts.pad_rows, order.device)
        mb = torch.div(order, T, rounding_mode="floor")
        by_mb = torch.argsort(mb, stable=True)
        per_mb = torch.bincount(mb, minlength=len(hs)).tolist()
        local = [order[p] - m * T for m, p in enumerate(by_mb.split(per_mb))]
        pos = [p if rows is None else rows[p] for p in by_mb.split(per_mb)]
        # In the experts' compute dtype: the bank would convert it anyway, and it is half the bytes.
        x_sorted = logits[0].new_zeros((sum(counts), d), dtype=self.expert_dtype)
        for m in range(len(hs)):
            u = block.ln_2(stash.peek(("a", i, m))).reshape(-1, d)  # recomputed rather than kept: a LayerNorm is cheap
            x_sorted[pos[m]] = u[local[m]].to(x_sorted.dtype)
        y_sorted, bank_saved = ffn.experts.step_forward(x_sorted, counts)
        stash.put(("xs", i), x_sorted)
        del x_sorted  # the stash's now (and off the device, where it goes to RAM)
        out = []
        for m in range(len(hs)):
            a = stash.unpark(("a", i, m))
            shape, a = a.shape, a.reshape(-1, d)
            gate = r.gate[m * T + local[m]].to(a.dtype).unsqueeze(1)
            a.index_add_(0, local[m], y_sorted[pos[m]].to(a.dtype) * gate)  # a + gate * expert(x)
            out.append(a.view(shape))
        self._saved[i] = _SwitchSaved(r.expert, r.gate.detach(), r.frac, counts, pos, local, bank_saved, rng)
        stash.put(("ys", i), y_sorted)
        return out, self.model.router_losses(r.aux_loss, r.z_loss)

    def _switch_backward(self, i: int, block, grads, rope, loss_scale: float):
        ffn, d, T, N = block.ffn, self.cfg.d_model, self.tokens, self.cfg.n_experts
        s = self._saved.pop(i)
        x_sorted = self.stash.get(("xs", i))
        # d(loss)/d(expert output) = d(loss)/d(block output) x gate, in the sorted order.
        dy_sorted = torch.zeros_like(x_sorted)  # zero in the padding rows: they add nothing to dW
        keys = []
        for m, g in enumerate(grads):
            # The output gradients wait while the experts run (as much memory as the step's
            # residual stream, which the experts' backward would otherwise share): parked, in the
            # bank the Switch block above parked its own in.
            if isinstance(g, tuple):
                key, g = g, self.stash.peek(g)
            else:
                key = ("grad", i, m)
                self.stash.park(key, g, (i + 1) % 2)
            gate = s.gate[m * T + s.local[m]].unsqueeze(1)
            dy_sorted[s.pos[m]] = (g.reshape(-1, d)[s.local[m]] * gate).to(dy_sorted.dtype)
            keys.append(key)
            grads[m] = None
            del g
        with self.autocast():
            dx_sorted = ffn.experts.step_backward(x_sorted, dy_sorted, s.counts, s.bank_saved)
        del x_sorted, dy_sorted
        y_sorted = self.stash.get(("ys", i))
        out_grads = []
        for m, key in enumerate(keys):
            g = self.stash.unpark(key)
            h = self.stash.get(("in", i, m)).requires_grad_()
            with torch.enable_grad(), self.autocast(), _replayed_rng(h.device, s.rng[m]):
                a = block.attn_residual(h, rope).reshape(-1, d)
                u = block.ln_2(a)
                logits = ffn.router_logits(u, jitter=True)
                probs = logits.softmax(-1)
                gate = probs.gather(1, s.expert[m * T:(m + 1) * T].unsqueeze(1))  # as route's max picks it
                y = u.new_zeros(u.shape).index_copy(0, s.local[m], y_sorted[s.pos[m]].to(u.dtype))
                out = a + y * gate.to(u.dtype)
                # The step's router losses, this micro-batch's share: their gradients are the
                # full batch's (the expert shares `frac` are constants of the step).
                aux = self.model.router_losses(N * (s.frac * probs.sum(0)).sum() / self.step_tokens,
                                               torch.logsumexp(logits, -1).square().sum() / self.step_tokens)
                dx = u.new_zeros(u.shape).index_copy(0, s.local[m], dx_sorted[s.pos[m]].to(u.dtype))
            torch.autograd.backward([out, u, aux * loss_scale], [g.reshape(-1, d), dx, None])
            # Set aside until the block below takes it (the other bank than the one read now).
            self.stash.park(("grad_in", i, m), h.grad, i % 2)
            out_grads.append(("grad_in", i, m))
        return out_grads

    def _take(self, g):
        """A gradient passed between blocks: a tensor, or the key it is parked under."""
        return self.stash.unpark(g) if isinstance(g, tuple) else g


def _dense_block(block, h, rope):
    """A dense block without activation checkpointing (the step keeps only its input anyway)."""
    a = block.attn_residual(h, rope)
    return a + block.ffn(block.ln_2(a))


def _expert_dtype(model: GPT, like: torch.Tensor) -> torch.dtype:
    """The dtype the expert banks return (the tiered runtime's expert dtype, else autocast's)."""
    for ffn in model.switch_blocks():
        runtime = getattr(ffn.experts, "runtime", None)
        if runtime is not None:
            return runtime.dtype
    return torch.get_autocast_dtype(like.device.type) if torch.is_autocast_enabled(like.device.type) else like.dtype


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state):
    """Run with the generator at `state` (None: as it is), then put it back."""
    if state is None:
        yield
        return
    now = _rng_state(device)
    set_state = (lambda st: torch.cuda.set_rng_state(st, device)) if device.type == "cuda" else torch.set_rng_state
    set_state(state)
    try:
        yield
    finally:
        set_state(now)
