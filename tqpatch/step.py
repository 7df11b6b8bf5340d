"""A compiled decode step replayed as one CUDA graph, without per-call guard checks.

``torch.compile(step, fullgraph=True, mode="reduce-overhead")`` runs Dynamo's guards (a few per
tensor the step reaches: weights, every cache buffer) and the CUDA-graph tree's input checks on the
host before each replay, and the GPU waits for them: on an H200 host 0.6 ms of a 32-layer
transformers Llama step with a StaticCache at batch 1 (``results/h200/bench_static_ro_h200.md``:
6.48 ms, against 5.96 ms replayed as one graph), and in a small model ~1.6x as much per layer
with tqpatch's cache, which has more tensors per layer (``results/h200/host_cost_cuda.md``).
A decode loop calls the step with the same tensors every time and a fixed-address cache whose
length lives on the device (tqpatch's, or transformers' ``StaticCache``), so one graph serves
every step:
:func:`compile_step` compiles the step without CUDA graphs, runs it once (compile and lazy
initialisation, on a side stream), captures the next call whole in one ``torch.cuda.CUDAGraph``,
and from then on copies the new inputs into the graph's and replays it.

Every call runs the step exactly once (the capture call replays right after recording), so the
cache advances one token per call as with any other step function.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["capture_graph", "compile_step", "step_function"]

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compile_step(model: torch.nn.Module, cache, *, capture: bool | None = None) -> StepFn:
    """The decode step ``step(tok [B, 1], pos [B, 1]) -> logits [B, 1, vocab]`` of ``model`` over a
    preallocated ``cache`` (a :class:`tqpatch.TurboQuantCache` built with ``max_cache_len`` and
    ``batch_size``, or transformers' ``StaticCache``), compiled with ``fullgraph=True``.

    Args:
        model: a causal LM (tqpatch-patched or not).
        cache: the cache every call appends one token per row to; it must not be reallocated
            while the step is in use.
        capture: replay the step as one CUDA graph (default: on CUDA). The returned logits are then
            the graph's output buffer, overwritten by the next call: use or copy them before it.
            The inputs must keep their shape and device from call to call.

    Returns:
        The step function. Off CUDA (or with ``capture=False``) it is the compiled function itself.
    """
    compiled = torch.compile(step_function(model, cache), fullgraph=True)
    if capture is None:
        capture = torch.cuda.is_available() and _on_cuda(model)
    return capture_graph(compiled) if capture else compiled


def step_function(model: torch.nn.Module, cache) -> StepFn:
    """The uncompiled decode step: ``step(tok, pos) -> logits`` of one token per row over
    ``cache`` (what :func:`compile_step` compiles)."""
    def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

    return step


def capture_graph(fn: StepFn) -> StepFn:
    """``fn(tok, pos)`` (a step compiled without CUDA graphs, on CUDA tensors) run once, captured
    whole in one CUDA graph at its second call, replayed from then on (see :func:`compile_step`)."""
    return _GraphStep(fn)


def _on_cuda(model: torch.nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.is_cuda


class _GraphStep:
    """``fn`` run once on a side stream, then captured on its second call and replayed."""

    def __init__(self, fn: StepFn) -> None:
        self.fn = fn
        self.warm = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.out: torch.Tensor | None = None

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not tok.is_cuda:  # nothing to capture off CUDA
            return self.fn(tok, pos)
        if self.graph is not None:
            if tok.shape != self.inputs[0].shape or pos.shape != self.inputs[1].shape:
                raise ValueError(f"the captured step takes tok {tuple(self.inputs[0].shape)} and pos "
                                 f"{tuple(self.inputs[1].shape)}, got {tuple(tok.shape)} and {tuple(pos.shape)}; "
                                 "build another step for another batch size")
            self.inputs[0].copy_(tok)
            self.inputs[1].copy_(pos)
            self.graph.replay()
            return self.out
        if not self.warm:  # compile, cuBLAS/Triton lazy initialisation: outside any capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(tok, pos)
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
            return out
        self.inputs = (tok.clone(), pos.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.fn(*self.inputs)
        self.graph = graph
        graph.replay()  # recording ran nothing: this is the call's step
        return self.out
