"""``torchrun`` set-up in one place: rank, world size and device from the environment, the process group,
and the few collectives the trainers need (all of them identities in a single process).

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them a run is one
process (rank 0 of 1) and no process group is created. With CUDA each process uses ``cuda:LOCAL_RANK`` and
NCCL, on CPU gloo.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its machine, ``device``."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints and configs."""
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` (``cuda:local_rank``) or ``"cuda:K"``; asking for
    CUDA without it is an error rather than a silent CPU run."""
    want = str(device).strip().lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if want == "cuda" or want.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for but CUDA is not available (use device=cpu)")
        return torch.device(want if ":" in want else f"cuda:{local_rank}")
    raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:K), got {device!r}")


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def setup(device: str = "auto") -> DistContext:
    """The context of this process from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (defaults 0 / 1 / 0) and the
    device preference; initialises the process group (NCCL on CUDA, gloo on CPU) when ``WORLD_SIZE > 1`` and
    it is not initialised yet, so calling it twice is harmless."""
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    dev = resolve_device(device, local if world > 1 else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local, dev)


def wrap_ddp(module: torch.nn.Module, ctx: DistContext, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` on the context's device when ``world > 1``, else ``module`` itself."""
    if not ctx.ddp:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **kwargs)


def world_size() -> int:
    """Processes in the initialised group (1 without one)."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def all_true(flag: bool, device=None) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce; ``flag`` itself in a single process), so all ranks
    take the same branch (e.g. skip a step whose loss is NaN on any of them)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() == 0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """In place: ``x`` averaged over the ranks (unchanged in a single process); returns ``x``."""
    if world_size() > 1:
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        torch.distributed.barrier()


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x [n, ...]`` concatenated along dim 0 in rank order, ``[world * n, ...]``, keeping gradients
    (``torch.distributed.nn``: the backward sums the gradient of each piece back to its rank); identity in a
    single process. Contrastive losses use it so each rank sees the negatives of the global batch."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather as _differentiable_all_gather

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(_differentiable_all_gather(x.contiguous()), 0)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` for any picklable ``obj`` (``[obj]`` in a single process)."""
    n = world_size()
    if n == 1:
        return [obj]
    out = [None] * n
    torch.distributed.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Destroy the process group if one is initialised (the end of a ``torchrun`` command)."""
    if is_initialized():
        torch.distributed.destroy_process_group()
