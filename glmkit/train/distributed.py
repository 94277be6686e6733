"""Data parallelism on PyTorch's own engines (DDP, FSDP2), set up from the torchrun / accelerate environment.

The model is unaware of it: ``wrap`` is applied after the model is built, as in torchtitan.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group that ``torchrun`` or ``accelerate launch`` describes (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    if rank_world()[1] == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def maybe_no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def all_reduce_sum(t: torch.Tensor) -> None:
    if rank_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def gather_objects(obj) -> list:
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state dicts with glmkit parameter names, on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if rank_world()[1] == 1:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [], options=opts)
    return msd, osd if optimizer is not None else None


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if rank_world()[1] == 1:
        model.load_state_dict(msd)
        optimizer.load_state_dict(osd)
        return
    set_state_dict(
        model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True)
    )


def shutdown() -> None:
    """Leave the process group cleanly (an FSDP/gloo process that exits without this can abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
