"""Data-parallel training through torch.distributed.

Launch with torchrun (``torchrun --nproc_per_node 2 train.py ...``): each process reads
RANK / WORLD_SIZE / LOCAL_RANK from the environment; the backend is NCCL when CUDA is
available and gloo on CPU.

The trainer replicates the model (its trainable parameters are broadcast from rank 0
at the start), gives each rank a disjoint slice of every global batch, and averages the
gradients of the trainable parameters with one all-reduce per step (flattened into a
single buffer) before clipping and the optimizer step. Every rank therefore applies the
same update and ends with identical weights. Only the trainable parameters travel: the
frozen target model is never communicated. (Explicit all-reduce rather than
``DistributedDataParallel`` because HyperDAS models keep a frozen target outside their
module tree and some inference paths leave parameters unused, which DDP's reducer
rejects.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: Optional[str] = None, device: Optional[str] = None) -> DistInfo:
    """Join the process group described by the torchrun environment (no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                        dist.get_backend(), False)
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    backend = backend or ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, True)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(info: DistInfo, tensor: torch.Tensor) -> torch.device:
    if info.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_parameters(tensors: Iterable[torch.Tensor], info: DistInfo, src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` (parameters and buffers) to every rank."""
    tensors = list(tensors)
    if not info.enabled or not tensors:
        return
    with torch.no_grad():
        dev = _comm_device(info, tensors[0])
        for t in tensors:
            buf = t.detach().to(dev).contiguous().clone()
            dist.broadcast(buf, src=src)
            t.copy_(buf.to(t.device))


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo, average: bool = True) -> None:
    """Average (or with average=False, sum) the gradients of ``params`` over ranks (missing
    grads count as zeros). The trainer sums: each rank's loss is already its share of the
    whole batch's (see hyperdas_loss's ``totals``)."""
    params = [p for p in params if p.requires_grad]
    if not info.enabled or not params:
        return
    dev = _comm_device(info, params[0])
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(dev, torch.float32)
        for p in params
    ])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat.div_(info.world_size)
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def _all_reduce(values: List[float], info: DistInfo, op) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    if info.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.cpu()


def all_reduce_mean(values: List[float], info: DistInfo) -> List[float]:
    if not info.enabled:
        return list(values)
    return (_all_reduce(values, info, dist.ReduceOp.SUM) / info.world_size).tolist()


def all_reduce_sum(values: List[float], info: DistInfo) -> List[float]:
    if not info.enabled:
        return list(values)
    return _all_reduce(values, info, dist.ReduceOp.SUM).tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard(indices: List[int], info: DistInfo) -> List[int]:
    """This rank's slice of a global batch (contiguous, sizes differ by at most one)."""
    if not info.enabled:
        return list(indices)
    n, w, r = len(indices), info.world_size, info.rank
    per, extra = divmod(n, w)
    start = r * per + min(r, extra)
    return list(indices[start:start + per + (1 if r < extra else 0)])


__all__ = ["DistInfo", "init_distributed", "cleanup", "broadcast_parameters", "all_reduce_gradients",
           "all_reduce_mean", "all_reduce_sum", "barrier", "shard", "env_world_size"]
