"""Everything distributed, in one place: process-group setup, sums, variable-length gathers (with and
without gradient), the DDP / FSDP2 wrap, the gradient-sync switch for accumulation and the optimizer state
that is the same file on any number of ranks. Every other file uses these and never calls
``torch.distributed`` itself.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is the one-process identity.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device): NCCL on CUDA, gloo on CPU; one process when not under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """More than one process in an initialized group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier():
    if is_distributed():
        dist.barrier()


def broadcast_outcome(fn):
    """Rank 0 runs ``fn``; every rank gets its result, or raises its error (so no rank waits forever)."""
    if not is_distributed():
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box = [("error", e)]
    dist.broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum over ranks of a few floats, in one reduction (float64: exact counts)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no gradient)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def _sizes(n: int, device) -> list[int]:
    """Every rank's first-dimension size."""
    mine = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def _padded_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather needs equal shapes: pad every rank's x to the largest, gather, trim, concatenate."""
    pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
    parts = [x.new_empty((max(sizes), *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, pad]).contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (first dims may differ) concatenated in rank order; no gradient."""
    if not is_distributed():
        return x
    return _padded_gather(x, _sizes(x.shape[0], x.device))


def gradient_sync(wrapped, body, fsdp: bool, sync: bool):
    """A context for one micro-step: gradients are reduced over ranks only when ``sync`` (the last one).

    DDP: ``no_sync()`` on the wrapper; FSDP2: ``set_requires_gradient_sync`` on the sharded module."""
    if fsdp:
        body.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if wrapped is not body and not sync:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def wrap(body: nn.Module, blocks, fsdp: bool, device):
    """(what the step calls, whether it is FSDP): under torchrun FSDP2 (``fully_shard`` per block of ``blocks``,
    then the root) or DDP; in one process the module itself."""
    if not is_distributed():
        return body, False
    if fsdp:
        for block in blocks:
            fully_shard(block)
        fully_shard(body)
        return body, True
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(body, device_ids=ids), False


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a plain one or an FSDP2 shard (a DTensor; gathering it is a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_state(body: nn.Module, opt) -> dict:
    """Every rank calls this (under FSDP it gathers): the optimizer state keyed by parameter name, full tensors
    on CPU, so the same file resumes a 1-process, DDP or FSDP run."""
    return get_optimizer_state_dict(body, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(body: nn.Module, opt, state: dict):
    """The inverse of ``optimizer_state``, on any number of ranks."""
    set_optimizer_state_dict(body, opt, state, options=StateDictOptions(full_state_dict=True))
