"""CUDA graphs for the eager model: one input's forward (and backward) recorded once and
replayed with no host work per kernel.

The eager TransNeXt training step is bound by the host: ~4,000 kernel launches a step at
every size measured, more host time than GPU time (docs/dense_speed.md, round 6).
``torch.compile(mode="reduce-overhead")`` replays graphs too but compiles for minutes at
detection sizes; this records the eager kernels (the package's Triton ones included) in a
few warm-up steps. Training graphs come from ``torch.cuda.make_graphed_callables``: the
loss, the optimizer step, clipping and EMA stay eager and unchanged.

Under torchrun the recording is thread-local (``cudaStreamCaptureModeThreadLocal``): NCCL's
watchdog thread queries events while a graph records, which the default global mode turns
into ``cudaErrorStreamCaptureInvalidated``. The jobs then average the gradients after the
backward themselves (``engine.distributed.GradientAverager``) instead of wrapping the model
in DDP, whose hooks a recording must not meet.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import UserError


def _autocast_state() -> tuple:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def _key(x: Tensor, training: bool) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad, training,
            torch.is_inference_mode_enabled(), _autocast_state())


class _Call(nn.Module):
    """``module(x)`` as a module of its own: make_graphed_callables replaces this one's
    forward, so ``module`` itself stays eager for the inputs the graph was not made for."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, x):
        return self.inner(x)


def _uncached_autocast():
    """The current autocast, with its weight-cast cache off: a cast cached before the
    recording would be replayed stale after the optimizer changes the weights."""
    enabled, dtype = _autocast_state()
    return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


_MODE = "thread_local"


@contextlib.contextmanager
def _thread_local_capture():
    """``make_graphed_callables``' keyword arguments for a thread-local recording. Before
    that function took ``capture_error_mode`` (torch 2.11 among those tested) it records
    through ``torch.cuda.graph``, made thread-local here for the call."""
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        yield {"capture_error_mode": _MODE}
        return
    plain = torch.cuda.graph

    class _ThreadLocal(plain):
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode=_MODE):
            super().__init__(cuda_graph, pool=pool, stream=stream,
                             capture_error_mode=capture_error_mode)

    import torch.cuda.graphs as module  # the name may be looked up in either place
    torch.cuda.graph = module.graph = _ThreadLocal
    try:
        yield {}
    finally:
        torch.cuda.graph = module.graph = plain


class GraphedForward(nn.Module):
    """``module(x)`` replayed from CUDA graphs: with ``train`` graphs for training (forward
    and backward), with ``infer`` graphs for inference (no autograd), one per input key
    (shape, strides, dtype, ``module.training``, autocast state) for the first
    ``max_graphs`` keys met in training and ``max_infer_graphs`` (default: the same) in
    inference. Other inputs (a last, smaller batch), modes not asked for, CPU tensors and
    torch.compile traces run ``module`` eagerly, which stays correct alongside. Each training graph keeps its own memory pool: detection training
    pads its batches to two canvases (landscape, portrait) and asks for two. Inference
    graphs share one pool: a replay's outputs are copied before anything else runs, so a
    graph may write over what another left (a val set's padded shapes, tens of graphs, in
    about the memory of one).

    A training replay returns the graph's own buffers, overwritten by the next replay (a
    training loop is done with them by then); inference outputs are copies. Gradients
    must be cleared (``zero_grad``) between steps: with make_graphed_callables a
    parameter's ``.grad`` may be the graph's buffer, so accumulating over several
    replays would be wrong (the jobs refuse ``--accum-steps`` with graphs).
    """

    def __init__(self, module: nn.Module, warmup: int = 3, train: bool = True,
                 infer: bool = True, max_graphs: int = 1,
                 max_infer_graphs: int | None = None):
        super().__init__()
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (kernels compile and caches fill before "
                             f"the recording), got {warmup}")
        max_infer_graphs = max_graphs if max_infer_graphs is None else max_infer_graphs
        for name, n in (("max_graphs", max_graphs), ("max_infer_graphs", max_infer_graphs)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        self.module = module
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.max_infer_graphs = max_infer_graphs
        self._modes = (train, infer)  # not self.train: that is nn.Module's method
        self._train = {}  # key -> graphed module
        self._infer = {}  # key -> (graph, static input, static outputs)
        self._pool = None  # the inference graphs' shared memory pool
        self._side = None  # the stream their warm-up runs on
        # per mode: [calls answered by a graph, calls that matched none (another shape)]
        self.counts = {"train": [0, 0], "infer": [0, 0]}

    @property
    def graphs(self) -> int:
        return len(self._train) + len(self._infer)

    @property
    def replays(self) -> int:
        return self.counts["train"][0] + self.counts["infer"][0]

    @property
    def eager_calls(self) -> int:
        return self.counts["train"][1] + self.counts["infer"][1]

    def forward(self, x):
        if not (isinstance(x, Tensor) and x.is_cuda) or torch.compiler.is_compiling():
            return self.module(x)
        grad = torch.is_grad_enabled()
        if not self._modes[0 if grad else 1]:
            return self.module(x)  # a mode not asked for: not counted as a miss
        # the module's own flag: a wrapper kept outside the module tree is not switched
        key = _key(x, self.module.training)
        count = self.counts["train" if grad else "infer"]
        if grad:
            if key not in self._train and len(self._train) < self.max_graphs:
                self._train[key] = self._record_training(x)
            if key in self._train:
                count[0] += 1
                return self._train[key](x)
        else:
            if key not in self._infer and len(self._infer) < self.max_infer_graphs:
                self._infer[key] = self._record_inference(x)
            if key in self._infer:
                graph, static_x, static_out = self._infer[key]
                static_x.copy_(x)
                graph.replay()
                count[0] += 1
                return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t,
                                       static_out)
        count[1] += 1
        return self.module(x)

    def _record_training(self, x: Tensor) -> nn.Module:
        sample = x.detach().clone().requires_grad_(x.requires_grad)
        with _uncached_autocast(), _thread_local_capture() as mode:
            return torch.cuda.make_graphed_callables(
                _Call(self.module), (sample,), num_warmup_iters=self.warmup,
                allow_unused_input=True, **mode)  # unused: a head that features_only skips

    def _record_inference(self, x: Tensor):
        static_x = x.detach().clone()
        if self._side is None:  # one stream: the allocator keeps its blocks per stream, so
            self._side = torch.cuda.Stream()  # a new one per recording would cache anew
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with _uncached_autocast():
            with torch.cuda.stream(side):  # kernels compile, caches fill, cuDNN picks
                for _ in range(self.warmup):
                    self.module(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode=_MODE):
                static_out = self.module(static_x)
        return graph, static_x, static_out


class StageMaps(nn.Module):
    """A TransNeXt's stage maps ``indices`` as a module's forward (what a graph records)."""

    def __init__(self, model: nn.Module, indices=(0, 1, 2, 3)):
        super().__init__()
        self.model = model
        self.indices = list(indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)


class GraphedStages:
    """For the dense models' modules that hold a TransNeXt: ``use_cuda_graphs`` (the jobs'
    ``--cuda-graphs``) and ``stage_maps``, which replays the graphs once they are on. The
    class says where its TransNeXt is by ``_graph_body()`` -> (model, stage indices)."""

    def _graph_body(self) -> tuple[nn.Module, list[int]]:
        raise NotImplementedError

    def use_cuda_graphs(self, on: bool = True, *, train: bool = True, infer: bool = False,
                        max_graphs: int = 1, max_infer_graphs: int | None = None) -> None:
        """Replay the TransNeXt's training forward and backward (``train``) and/or its
        inference forward (``infer``) from CUDA graphs, one per input shape for the first
        ``max_graphs`` (training) and ``max_infer_graphs`` (inference) shapes
        (``GraphedForward``)."""
        body, indices = self._graph_body()
        # in a list, not a registered submodule: no second name for every weight
        self._graphed = ([GraphedForward(StageMaps(body, indices), train=train, infer=infer,
                                         max_graphs=max_graphs,
                                         max_infer_graphs=max_infer_graphs)] if on else [])

    @property
    def graphed(self) -> GraphedForward | None:
        """The ``GraphedForward`` that ``use_cuda_graphs`` set up (replay counts), or None."""
        g = getattr(self, "_graphed", None)
        return g[0] if g else None

    def stage_maps(self, x: Tensor) -> list[Tensor]:
        graphed = self.graphed
        if graphed is not None:
            return graphed(x)
        body, indices = self._graph_body()
        return body.forward_intermediates(x, indices=indices, intermediates_only=True)


# Inference graphs the eval and predict jobs record at most (one per padded input shape;
# a COCO val set resized to 800 x 1333 and padded to multiples of 32 has a few dozen).
INFER_GRAPHS = 48


def summary(graphed: GraphedForward) -> str:
    """One line for the jobs' log: calls replayed and run eagerly, per mode where both
    are graphed (a training job's steps, then its validation's forwards)."""
    train, infer = graphed._modes
    (tr, te), (ir, ie) = graphed.counts["train"], graphed.counts["infer"]
    if train and infer:
        line = (f"{tr} call(s) replayed, {te} run eagerly in training; {ir} replayed, {ie} "
                f"eagerly in evaluation")
    else:
        line = f"{tr} call(s) replayed, {te} run eagerly" if train else (
            f"{ir} call(s) replayed, {ie} run eagerly")
    return f"CUDA graphs: {line} (other input shapes); {graphed.graphs} graph(s) recorded"


def check_cuda_graphs(device: torch.device, accum_steps: int = 1,
                      compiled: bool = False) -> None:
    """--cuda-graphs' preconditions, as one clear error each (one process or torchrun)."""
    if device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device (this run uses {device.type})")
    if accum_steps > 1:
        raise UserError(f"--cuda-graphs with --accum-steps {accum_steps}: a graph's gradient "
                        f"buffers cannot accumulate over steps; use a larger --batch-size")
    if compiled:
        raise UserError("--cuda-graphs and --compile/--compile-mode both make graphs; "
                        "choose one (--compile-mode reduce-overhead is the compiled one)")


__all__ = ["GraphedForward", "GraphedStages", "StageMaps", "check_cuda_graphs", "summary"]
