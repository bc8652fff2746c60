"""
The student on many processes: DDP (a whole student on every rank) or FSDP (torch's fully_shard,
"FSDP2": the student, its gradients and its AdamW state split across the ranks), and the gathering
that turns a sharded student back into the files one process writes. distill.py (Algorithm 1's loop)
calls these; they hold no training logic, and the loss is the same function under all three.

    torchrun --nproc_per_node=8 distill.py ...            # DDP
    torchrun --nproc_per_node=8 distill.py ... --fsdp     # FSDP, full shard of the student
    torchrun --nproc_per_node=8 distill.py ... --fsdp --fsdp-teachers   # and of the teachers (SD3.5-large:
                                                                        # docs/MULTI_GPU.md)

DDP: every rank holds the student, its gradients and AdamW's moments; gradients are all-reduced
(averaged) once per optimizer step, on the last accumulation round (`accumulating`).

FSDP (`FullShard`): each joint block of the student's MMDiT is one fully_shard unit (its adaLN
linears, which MMDiT.adaln calls before the blocks run, units of their own) and the student
(embedders, final layer, the fusion module of --method) the root unit. Every parameter is split
along its first dimension, torch.chunk's way (rank r holds rows [r c, (r + 1) c), c = ceil(rows /
ranks)), and so are its gradient and AdamW's moments: the optimizer is built over the shards. A
unit's whole fp32 weights exist only while it runs (all-gathered before its forward, freed after it,
gathered again for its backward: under --grad-checkpointing also for the recomputation); its
gradients are reduce-scattered (averaged over ranks, like DDP's all-reduce) after EVERY accumulation
round, so no rank ever holds the whole gradient. The student runs under the same bf16 autocast as
with DDP (fp32 weights gathered), so the numbers are DDP's up to summation order. The EMA (--ema) is
sharded the same way. The frozen teachers stay whole, in bf16 on CUDA, on every rank (they need no
gradients or moments, and whole they need no all-gather: six teacher forwards per sample for W2SD),
unless --fsdp-teachers shards them too (units as the student's; each of their forwards all-gathers
them block by block, so every rank runs the same teacher forwards). benchmarks/bench_memory.py
--fsdp measures both per rank: SD3.5-large on 8 GPUs of 80 GB needs --fsdp-teachers (docs/MULTI_GPU.md).

Checkpoints keep the one-process format (run/training_state.py): at a checkpoint every sharded tensor is
gathered (DTensor.full_tensor, one tensor at a time, collective), rank 0 keeps it on the CPU and
writes exactly the files a DDP run writes. So a run resumes at any world size, with or without
--fsdp, and pruning, the final files and loading them in one process stay as they are. A resume under
--fsdp reads from each file only this rank's rows of each tensor (safetensors' get_slice).

Host memory: every rank loads the student's start (fp32) and its EMA on the CPU, and shards them onto
its device (freeing the CPU copy); at a checkpoint, rank 0 holds the gathered student, EMA and AdamW
moments on the CPU (SD3.5-large: 32 + 32 + 64 GB) while it writes them.

    python -m pytest -q tests/run/test_parallel.py
"""

import copy
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

from run import cli
from mmdit import STABILITY_PREFIX
from run.training_state import load_optimizer_tensors, model_file, non_finite


# -----------------------------------------------------------------------------
# DDP


def data_parallel(student, device, distributed, fsdp=None):
    """The module distill.py calls for the student's forward: DDP around the student under torchrun,
    the student itself in one process or when FullShard has sharded it (FSDP's units are the student)."""
    if not distributed or fsdp is not None:
        return student
    return DDP(student, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def accumulating(module, last_round):
    """The context of one accumulation round's forward and backward: DDP all-reduces the gradients only
    on the last round of a step (no_sync before it); FSDP reduce-scatters on every round (holding the
    whole gradient between rounds is what it exists to avoid); one process has nothing to sync."""
    return module.no_sync() if isinstance(module, DDP) and not last_round else nullcontext()


# -----------------------------------------------------------------------------
# FSDP


def _meta_copy(module):
    """The module's structure with every parameter and buffer on the meta device (no memory): what a
    gathered copy is loaded into (FSDP refuses deepcopy once a module is sharded)."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def shard(root, mesh, model=None):
    """fully_shard in place: one unit per joint block of the MMDiT `model` (default root.model: a Student's),
    then root as the root unit (what is left: embedders, pos_embed, final layer, the fusion module). A
    block's two adaLN linears are units of their own: MMDiT.adaln calls them all at the start of the
    forward, outside their block's forward, so each is gathered when it runs rather than with its block
    (or, in the root, for the whole step). Buffers (pos_embed) are not sharded: every rank keeps them whole."""
    model = root.model if model is None else model
    for block in model.joint_blocks:
        for stream in (block.context_block, block.x_block):
            fully_shard(stream.adaLN_modulation[1], mesh=mesh)
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def rows(t, rank):
    """(start, stop): the rows of dim 0 of a sharded tensor's full shape that `rank` holds (torch.chunk's
    split, as fully_shard's Shard(0) placement has them)."""
    if not (t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)):
        raise RuntimeError(f"a sharded tensor with placements {t.placements}: only Shard(0) on one mesh dimension "
                           "(fully_shard's) is handled")
    n, world = t.shape[0], t.device_mesh.size()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    if t.to_local().shape[0] != stop - start:
        raise RuntimeError(f"rank {rank} holds {t.to_local().shape[0]} rows of {n}, not torch.chunk's {stop - start}")
    return start, stop


class FullShard:
    """The student (and its EMA) sharded in place over every rank of the process group, FSDP's full shard;
    `gather` and `load_checkpoint` translate between the shards and training_state's one-process files."""

    def __init__(self, student, ema, device, teachers=()):
        """teachers: frozen MMDiTs to shard too (--fsdp-teachers), each then all-gathered block by block
        for each of its forwards; every rank must run the same teacher forwards in the same order."""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world,))
        # the structures, taken before sharding: gathered tensors are loaded into copies of them
        self.skeletons = [_meta_copy(m) if m is not None else None for m in (student, ema)]
        self.student, self.ema = (shard(m, self.mesh) if m is not None else None for m in (student, ema))
        for teacher in teachers:
            shard(teacher, self.mesh, model=teacher)

    # --- sharded -> whole (checkpoints and the final files)

    def _gathered_state(self, module):
        """module's state_dict with every sharded tensor gathered; on rank 0 CPU copies, elsewhere {}.
        Collective: every rank calls it, in the same order."""
        out = {}
        for name, t in module.state_dict().items():
            whole = t.full_tensor() if isinstance(t, DTensor) else t  # (all-gather)
            if self.rank == 0:
                out[name] = whole.detach().to("cpu", copy=True)
        return out

    def _gathered_module(self, module, skeleton):
        state = self._gathered_state(module)
        if self.rank != 0:
            return module
        whole = copy.deepcopy(skeleton)
        whole.load_state_dict(state, strict=True, assign=True)
        return whole

    def gather_modules(self):
        """(student, EMA or None): on rank 0 whole copies on the CPU, as one process holds them; on the
        other ranks the sharded modules themselves. Collective."""
        return tuple(self._gathered_module(m, s) if m is not None else None
                     for m, s in zip((self.student, self.ema), self.skeletons))

    def gather(self, optimizer):
        """(student, EMA, optimizer) as training_state.save_checkpoint reads them: on rank 0 whole CPU
        copies, and for the optimizer a GatheredOptimizer with AdamW's whole moments; on the other ranks
        the sharded objects. Collective."""
        student, ema = self.gather_modules()
        state = {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            entry = {}
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                whole = value.full_tensor() if isinstance(value, DTensor) else value  # (all-gather)
                if self.rank == 0:
                    entry[key] = whole.detach().to("cpu", copy=True) if torch.is_tensor(whole) else whole
            if entry:
                state[i] = entry
        if self.rank != 0:
            return student, ema, optimizer
        groups, first = [], 0
        for group in optimizer.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(first, first + len(group["params"])))})
            first += len(group["params"])
        return student, ema, GatheredOptimizer(state, groups)

    # --- whole files -> shards (a resume)

    def _read_into(self, module, path, prefix=""):
        """Copy a checkpoint file's tensors (keys: prefix + module's state_dict names) into module: for a
        sharded tensor only this rank's rows are read (get_slice), the rest whole. Refuses a file that
        does not hold exactly the module's tensors, with their shapes."""
        try:
            with safe_open(path, framework="pt") as f, torch.no_grad():
                mine = module.state_dict(keep_vars=True)
                keys = set(f.keys())
                wanted = {prefix + name for name in mine}
                if keys != wanted:
                    raise cli.InputError(f"{path} holds other tensors than the student it should restore "
                                         f"(missing {sorted(wanted - keys)[:3]}, unexpected {sorted(keys - wanted)[:3]})")
                for name, t in mine.items():
                    self._copy(f, prefix + name, t, path)
        except cli.InputError:
            raise
        except Exception as e:  # safetensors' own SafetensorError, OSError
            raise cli.InputError(f"{path} cannot be read ({cli.one_line(e)})") from e

    def _copy(self, f, key, t, path):
        shape = tuple(f.get_slice(key).get_shape())
        if shape != tuple(t.shape):
            raise cli.InputError(f"{path}: {key} has shape {shape}, the student's is {tuple(t.shape)}")
        if isinstance(t, DTensor):
            start, stop = rows(t, self.rank)
            t.to_local().copy_(f.get_slice(key)[start:stop])
        else:
            t.copy_(f.get_tensor(key))

    def load_checkpoint(self, folder, state, optimizer, names):
        """training_state.load_checkpoint for the sharded student: weights, EMA and AdamW state from a
        checkpoint folder written by any world size, with or without --fsdp (checked by check_resume);
        refuses non-finite weights (on any rank). Returns the step."""
        for module, prefix in ((self.student, ""), (self.ema, "ema-")):
            if module is None:
                continue
            self._read_into(module.model, os.path.join(folder, model_file(module.model, prefix)), STABILITY_PREFIX)
            if len(module.fusion.state_dict()):
                self._read_into(module.fusion, os.path.join(folder, f"{prefix}fusion.safetensors"))
        # AdamW's moments: sharded like their parameters (a DTensor of the parameter's layout, this rank's rows)
        params = dict(self.student.named_parameters())
        path = os.path.join(folder, "optimizer.safetensors")
        tensors = {}
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    p = params.get(key.rsplit(".", 1)[0])
                    if isinstance(p, DTensor) and tuple(f.get_slice(key).get_shape()) == tuple(p.shape):
                        moment = torch.zeros_like(p)  # (a DTensor laid out as p)
                        start, stop = rows(moment, self.rank)
                        moment.to_local().copy_(f.get_slice(key)[start:stop])
                        tensors[key] = moment
                    else:  # AdamW's step count, and any state that is not parameter-shaped
                        tensors[key] = f.get_tensor(key)
        except Exception as e:
            raise cli.InputError(f"{path} cannot be read ({cli.one_line(e)})") from e
        load_optimizer_tensors(optimizer, names, tensors, state["optimizer"])
        every = [None] * self.world
        dist.all_gather_object(every, non_finite([("student", self.student), ("EMA", self.ema)]))
        bad = next((b for b in every if b), None)
        if bad:
            raise cli.InputError(f"{folder} holds non-finite weights ({bad}): delete that folder to resume from the "
                                 "checkpoint before it")
        return state["step"]


class GatheredOptimizer:
    """AdamW's state gathered whole on rank 0, as training_state.optimizer_tensors reads an optimizer:
    state_dict() -> {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}."""

    def __init__(self, state, param_groups):
        self.state, self.param_groups = state, param_groups

    def state_dict(self):
        return {"state": self.state, "param_groups": self.param_groups}
