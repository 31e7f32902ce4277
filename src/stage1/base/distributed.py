"""torch.distributed set-up for torchrun (or a plain single process), on CPU (gloo) or CUDA (nccl)."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_rank() -> int:
    """This process's rank as the launcher gave it (torchrun's RANK), readable before any process group: 0 alone."""
    return int(os.environ.get("RANK", "0") or 0)


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; a lone process runs without one.

    The timeout bounds every collective, so a rank that dies brings the others down with an error instead
    of a silent hang.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be auto, cuda or cpu, got '{device}'")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=timedelta(minutes=timeout_minutes), device_id=dev if dev.type == "cuda" else None
        )
    return DistInfo(rank, world_size, local_rank, dev, local_world_size)


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over ranks, in place (a no-op in a single process)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of t on every rank, in place (a no-op in a single process)."""
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (ranks may hold different counts)."""
    if not is_distributed():
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros(most, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` in DistributedDataParallel inside a process group (else itself), without the per-forward buffer
    broadcast: the quantizer all-reduces its own EMA statistics, and a broadcast from rank 0 would only cost time
    (and hide a bug if ranks ever diverged). torch >= 2.14 names that forward_sync_buffers (broadcast_buffers is
    deprecated, and warns)."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar logs over ranks (one all-reduce)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def sum_over_ranks(value: int, device: torch.device) -> int:
    """The sum of every rank's `value` (one all-reduce; none in a single process)."""
    return _int_over_ranks(value, device, "SUM")


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (one all-reduce; none in a single process)."""
    return _int_over_ranks(value, device, "MAX")


def _int_over_ranks(value: int, device: torch.device, op: str) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return int(t.item())


def all_ranks_true(flag: torch.Tensor) -> bool:
    """True only if `flag` (a bool tensor) is true on every rank."""
    flag = flag.float()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def gather_objects(obj) -> list:
    """Every rank's `obj` on every rank (pickled over the process group: only our own trusted processes)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def ranks_agree(tensors: dict[str, torch.Tensor], device: torch.device) -> bool:
    """True if every rank holds bit-identical tensors (compared through rank 0's copy)."""
    if not dist.is_initialized():
        return True
    mismatch = torch.zeros((), dtype=torch.float64, device=device)
    for value in tensors.values():
        local = value.detach().to(device).contiguous()
        if local.dtype == torch.bool:  # not every backend broadcasts bool
            local = local.to(torch.uint8)
        reference = local.clone()
        dist.broadcast(reference, src=0)
        mismatch += (local != reference).sum().double()
    dist.all_reduce(mismatch)
    return mismatch.item() == 0
