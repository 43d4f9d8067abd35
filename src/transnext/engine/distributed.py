"""torchrun detection, process groups and small collective helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import UserError
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def init_distributed(device: str | None = None) -> DistInfo:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        index = local if world > 1 else (dev.index or 0)
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place. NCCL reduces CUDA tensors only: a CPU tensor (metric
    counters kept on the host) makes the trip through the current GPU."""
    if dist.is_available() and dist.is_initialized():
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj):
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        buf = [obj]
        dist.broadcast_object_list(buf, src=src)
        return buf[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class GradientAverager:
    """Data parallelism without DDP, for steps replayed from CUDA graphs (``--cuda-graphs``
    under torchrun): the module's parameters and buffers broadcast from rank 0 once, and
    after each backward (before unscaling and clipping) the gradients averaged over the
    ranks in flat buckets.

    DDP would keep every parameter's gradient-accumulator node alive on the stream it was
    built on, and a graph recording whose backward meets those nodes waits on the legacy
    stream (``cudaErrorStreamCaptureImplicit``). A graphed backward hands every gradient
    over at its end anyway, so DDP's overlap of all-reduces with the backward is lost
    there and averaging after it costs the same."""

    def __init__(self, module: torch.nn.Module, bucket_mb: float = 25.0, uneven: bool = False):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.uneven = uneven
        self.world = dist.get_world_size()
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, src=0)

    def __call__(self) -> None:
        """Average the gradients. Every rank must hold the same set: the same graph ran,
        or, with ``uneven``, a parameter with a gradient on another rank gets zeros here."""
        if self.uneven:
            self._fill_missing()
        bucket, size = [], 0
        for g in (p.grad for p in self.params):
            if g is None:
                continue
            if bucket and (g.dtype != bucket[0].dtype
                           or size + g.numel() * g.element_size() > self.bucket_bytes):
                self._reduce(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket:
            self._reduce(bucket)

    def _fill_missing(self) -> None:
        """Zeros for a parameter that another rank's batch reached and this one's did not
        (eager heads: the detectors), so that every rank reduces the same buckets; one small
        all-reduce and a host sync per step."""
        if not self.params:
            return
        has = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32,
                           device=self.params[0].device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        for p, h in zip(self.params, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)

    def _reduce(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
