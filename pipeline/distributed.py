"""Optional data parallelism: the same training code runs under plain ``python`` or ``torchrun``.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) we initialise a process group (gloo on CPU, nccl on
CUDA), wrap trainable modules in DDP and let each rank draw its own share of the batch. Without it,
everything here is a no-op, so single-process code paths stay simple.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Initialise the process group if launched by torchrun; returns (rank, world_size)."""
    world = env_world_size()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(preferred: torch.device) -> torch.device:
    """Under torchrun on GPUs each rank takes cuda:LOCAL_RANK."""
    if preferred.type == "cuda" and is_distributed():
        idx = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return preferred


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """DDP-wrap a module with trainable parameters when distributed (else return it unchanged)."""
    if not is_distributed() or not any(p.requires_grad for p in module.parameters()):
        return module
    dev = next(module.parameters()).device
    return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def sync_context(module: torch.nn.Module, is_last_chunk: bool):
    """``no_sync()`` for every chunk but the last, so gradients are all-reduced once per step."""
    if is_last_chunk or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (for gradients of parameters outside DDP, e.g. a scalar log Z)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
