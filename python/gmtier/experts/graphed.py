"""CUDA graphs of the resident Switch layers' training forward and backward.

A resident Switch layer with grouped GEMMs runs on the device without a host sync (router,
routing, the GEMM row layout, two grouped GEMMs and the gated way back: about 50 kernels in
forward and as many in backward) and its shapes repeat from step to step. Launched one by one,
those kernels' host work, not their GPU time, set the `small` step's time (docs/performance.md,
"Where the resident small step's time goes"). `SwitchGraphs` captures every Switch layer of a
model once (a forward and a backward graph each, in one memory pool, captured in the order a
step runs them, as `torch.cuda.make_graphed_callables` does); a training step then replays each
layer's forward and backward as one launch each.

A layer replays its graph only where the graph gives the eager layer's numbers: a training
forward with autograd on, on CUDA, a `ResidentExperts` bank with grouped GEMMs whose dW GEMM
takes an expert without rows as the probe found (the graph computes every expert's dW; at the
end of backward the experts with tokens get theirs and the others none, as in the eager layer),
no router jitter (its random draws would differ), no expert parallelism, and the input shape, dtypes and parameters it
was captured with (a change captures again). Elsewhere the layer runs eagerly. The first step
pays the capture (a few warm-up passes of each layer); the graphs keep their intermediates in a
pool of their own between steps. `experts.graphs = "off"` runs every layer eagerly.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch

from gmtier.experts.bank import HostCopy, ResidentExperts, _empty_groups_are_zero, compute_dtype

CAPTURE_FAILURES: dict[str, str] = {}  # device -> why capturing failed (its layers then run eagerly)


def _params(ffn) -> list[torch.nn.Parameter]:
    """The parameters a Switch layer's graph reads: its router's, then its experts'."""
    return [ffn.router.weight, *ffn.experts.weights()]


def _pointers(params) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in params)


def _layer_callable(ffn, dtype: torch.dtype):
    """The layer as a function of its input and parameters (what is captured): its output, aux
    and z losses, and the kept tokens per expert (on the device)."""
    factor = ffn.cfg.capacity_factor

    def layer(h, *params):
        y, aux, z, t = ffn.routed_on_device(h, factor, dtype, to_host=False)
        return y, aux, z, t.kept

    return layer


class _LayerGraphs:
    """One layer's captured forward and backward and their static tensors: the input and the
    outputs of forward, the output gradients and the gradients of backward."""

    def __init__(self, graph, inputs, outputs):
        self.fwd, self.inputs, self.outputs = graph, inputs, outputs
        self.bwd = self.grad_outputs = self.grads = None
        self.aliased: list = []  # (parameter, buffer): expert gradients handed over as the graph's buffers
        self.counts: HostCopy | None = None  # the last replay's kept tokens per expert


def _capture(callables, samples) -> list[_LayerGraphs]:
    """Each callable's forward, then (in reverse) its backward, captured into one memory pool in
    the order a step runs them (so a replay never overwrites what a later one still reads)."""
    pool, side = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Warm-up outside any capture: lazy initialisation, the one-time probes, cuBLAS workspaces.
        for fn, args in zip(callables, samples):
            for _ in range(2):
                outs = [o for o in fn(*args) if o.requires_grad]
                torch.autograd.grad(outs, [a for a in args if a.requires_grad], [torch.empty_like(o) for o in outs])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    layers, graphed_outputs = [], []
    for fn, args in zip(callables, samples):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side):
            outs = fn(*args)
        layers.append(_LayerGraphs(graph, args, [o.detach() for o in outs]))
        graphed_outputs.append(outs)
    for layer in reversed(layers):
        outs = [o for o in graphed_outputs.pop() if o.requires_grad]
        layer.grad_outputs = [torch.empty_like(o) for o in outs]
        layer.bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(layer.bwd, pool=pool, stream=side):
            layer.grads = torch.autograd.grad(outs, [a for a in layer.inputs if a.requires_grad], layer.grad_outputs)
        # The captured autograd graph goes with `outs`: its AccumulateGrad nodes, made on the
        # capture stream, would otherwise stay the parameters' and cost a stream sync each step.
        del outs
    torch.cuda.synchronize()
    return layers


def _hand_over_expert_grads(weights, grads, counts: HostCopy, aliased: list) -> None:
    """At the end of a backward pass: each expert with tokens gets the dW the graph computed
    (the buffer itself where it had no gradient, else added to its gradient); the experts
    without tokens get none, as in the eager layer. Setting them here instead of returning them
    to autograd spares each expert parameter its AccumulateGrad node."""
    n = len(weights) // 2
    for e, c in enumerate(counts.tolist()):
        if c:
            for w, dw in ((weights[e], grads[e]), (weights[n + e], grads[n + e])):
                if w.grad is None:
                    w.grad = dw
                    aliased.append((w, dw))
                else:
                    w.grad += dw


def _copy_out_grads(graphs: _LayerGraphs, router: torch.nn.Parameter) -> None:
    """Gradients that a backward replay left as the graph's own buffers (the router's, taken by
    autograd as its first gradient, and the experts' dW handed over) become copies of their own:
    every replay reuses the pool's memory, the forward ones included (its intermediates sit where
    another layer's gradients were), so this runs before any replay while they are still set
    (a second pass before the step, or gradients zeroed rather than set to None)."""
    for w, buf in graphs.aliased:
        if w.grad is not None and w.grad.data_ptr() == buf.data_ptr():
            w.grad = buf.clone()
    graphs.aliased.clear()
    if router.grad is not None and router.grad.data_ptr() == graphs.grads[1].data_ptr():
        router.grad = router.grad.clone()


class _Replay(torch.autograd.Function):
    """A layer's forward graph replayed on input h. Its backward replays the backward graph and
    returns the static gradients of h and the router; the experts' dW reach their parameters at
    the end of the backward pass (`_hand_over_expert_grads`)."""

    @staticmethod
    def forward(ctx, graphs: _LayerGraphs, h, router, *experts):
        graphs.inputs[0].copy_(h)
        graphs.fwd.replay()
        y, aux, z, kept = (o.detach() for o in graphs.outputs)
        graphs.counts = HostCopy(kept)  # this replay's kept tokens per expert, on their way to the host
        ctx.graphs, ctx.counts, ctx.router, ctx.experts = graphs, graphs.counts, router, experts
        ctx.mark_non_differentiable(kept)
        return y, aux, z, kept

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, daux, dz, _):
        g = ctx.graphs
        _copy_out_grads(g, ctx.router)
        for buf, grad in zip(g.grad_outputs, (dy, daux, dz)):
            buf.copy_(grad)
        g.bwd.replay()
        torch.autograd.Variable._execution_engine.queue_callback(
            functools.partial(_hand_over_expert_grads, ctx.experts, g.grads[2:], ctx.counts, g.aliased))
        return (None, g.grads[0].detach(), g.grads[1].detach(), *([None] * len(ctx.experts)))


class SwitchGraphs:
    """The CUDA graphs of a model's Switch layers (`layers`, in the order a step runs them)."""

    def __init__(self, layers):
        self._layers = [weakref.ref(f) for f in layers]  # the layers hold this object: no cycle
        self._graphed: dict[int, _LayerGraphs] = {}  # id(layer) -> its graphs
        self._params: dict[int, list] = {}  # id(layer) -> the parameters its graphs read (`_params`)
        self._pointers: dict[int, tuple[int, ...]] = {}  # id(layer) -> their data pointers when captured
        self._key = None  # (shape, dtypes, device) of the input they were captured for
        self.captures = 0  # how many times the layers were captured
        self.replays = 0  # forward replays so far

    def applies(self, ffn, h: torch.Tensor) -> bool:
        """Whether this forward of `ffn` may replay a graph (see the module's docstring)."""
        if not (ffn.training and torch.is_grad_enabled() and h.is_cuda and h.requires_grad):
            return False
        if str(h.device) in CAPTURE_FAILURES or torch.cuda.is_current_stream_capturing():
            return False
        if ffn.route_sync is not None or ffn.cfg.router_jitter > 0 or not isinstance(ffn.experts, ResidentExperts):
            return False
        dtype = compute_dtype(h)
        return ffn.experts.takes_device_routing(h) and _empty_groups_are_zero(h.device.type, dtype)

    def run(self, ffn, h: torch.Tensor):
        """The layer's (output, aux loss, z loss, kept tokens per expert on their way to the
        host) from its graphs, capturing them first where needed; None where the layer must run
        eagerly."""
        if not self.applies(ffn, h):
            return None
        key = (tuple(h.shape), h.dtype, compute_dtype(h), str(h.device))
        if key != self._key or self._pointers.get(id(ffn)) != _pointers(self._params.get(id(ffn), ())):
            if not self._capture(h, key):
                return None
        for layer_id, g in self._graphed.items():
            _copy_out_grads(g, self._params[layer_id][0])
        graphs = self._graphed[id(ffn)]
        y, aux, z, _ = _Replay.apply(graphs, h, *self._params[id(ffn)])
        self.replays += 1
        return y, aux, z, graphs.counts

    def _capture(self, h: torch.Tensor, key) -> bool:
        layers = [f for f in (ref() for ref in self._layers) if f is not None]
        dtype = compute_dtype(h)
        self._graphed, self._params, self._pointers, self._key = {}, {}, {}, None
        callables = [_layer_callable(f, dtype) for f in layers]
        samples = [(torch.randn_like(h).requires_grad_(), *_params(f)) for f in layers]
        try:
            if not all(p.requires_grad for args in samples for p in args):
                raise ValueError("a Switch layer has parameters that take no gradient")
            # Autocast off: the layer's GEMMs take `dtype` explicitly, the router is fp32 anyway.
            with torch.autocast(h.device.type, enabled=False):
                graphed = _capture(callables, samples)
        except Exception as e:  # noqa: BLE001  (whatever capture raises, the layers run eagerly)
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            CAPTURE_FAILURES[str(h.device)] = why
            warnings.warn(f"capturing the Switch layers as CUDA graphs failed on {h.device} ({why}); they run "
                          f"eagerly (experts.graphs = 'off' skips the attempt)", RuntimeWarning, stacklevel=3)
            return False
        for f, g in zip(layers, graphed):
            self._graphed[id(f)], self._params[id(f)] = g, _params(f)
            self._pointers[id(f)] = _pointers(self._params[id(f)])
        self._key = key
        self.captures += 1
        return True
