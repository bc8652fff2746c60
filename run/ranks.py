"""
The processes of a command that shares its work under torchrun (generate.py, evaluate.py table4): which
one this is, and the three collective steps they need (wait for all, rank 0's object to all, every
rank's object to all). gloo on the CPU, NCCL on CUDA; one process without torchrun, with the same calls.
distill.py sets up its own process group (DDP).

    torchrun --nproc_per_node 8 generate.py ...        # RANK, WORLD_SIZE, LOCAL_RANK from torchrun

    with ranks.Ranks(device) as group:
        done = group.broadcast(done)       # rank 0's view, on every rank
        group.barrier()
        every = group.gather(mine)         # [rank 0's, rank 1's, ...] on every rank
"""

import os

import torch
import torch.distributed as dist


def from_environment():
    """(rank, world size, local rank) that torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, 0) without it.
    A stray or partial setting (RANK without WORLD_SIZE, a rank beyond the world, words) is refused with one
    line naming the variables, before any work: it would make this process wait for ranks that never come."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    given = {k: os.environ.get(k) for k in names}
    if given["RANK"] is None and given["WORLD_SIZE"] is None:
        return 0, 1, 0  # plain python: one process (a stray LOCAL_RANK alone means nothing)
    if given["RANK"] is None or given["WORLD_SIZE"] is None:
        set_, unset = ("RANK", "WORLD_SIZE") if given["WORLD_SIZE"] is None else ("WORLD_SIZE", "RANK")
        raise ValueError(f"{set_}={given[set_]} is set in the environment but {unset} is not: launch with torchrun "
                         f"(it sets both), or unset {set_} to run one process")
    try:
        rank, size, local = int(given["RANK"]), int(given["WORLD_SIZE"]), int(given["LOCAL_RANK"] or 0)
    except ValueError:
        raise ValueError(f"RANK={given['RANK']}, WORLD_SIZE={given['WORLD_SIZE']}, LOCAL_RANK={given['LOCAL_RANK']} "
                         "in the environment: not whole numbers, as torchrun sets them") from None
    if not 0 <= rank < size or local < 0:
        raise ValueError(f"RANK={rank} is not a rank of WORLD_SIZE={size} (0 to {size - 1}), or LOCAL_RANK={local} "
                         "< 0: launch with torchrun, or unset them to run one process")
    return rank, size, local


def device_for(device):
    """The device of this process: under torchrun a bare "cuda" is cuda:LOCAL_RANK (one GPU per process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", from_environment()[2])
    return device


class Ranks:
    """The process group of a command's processes (created on entering, destroyed on leaving if it made it),
    or a single process when WORLD_SIZE is 1 or unset, or when one=True (a caller that works alone)."""

    def __init__(self, device="cpu", one=False):
        self.rank, self.size, _ = (0, 1, 0) if one else from_environment()
        self.device = torch.device(device)
        self._made = False

    def __enter__(self):
        if self.size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._made = True
        return self

    def __exit__(self, *exc):
        if self._made and dist.is_initialized():
            dist.destroy_process_group()
        self._made = False

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.size == 1:
            return [obj]
        every = [None] * self.size
        dist.all_gather_object(every, obj)
        return every
