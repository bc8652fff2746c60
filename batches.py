"""
Algorithm 1's batches: which samples, and which t, w and eps, every optimizer step of distill.py
draws, such that the step does not depend on the number of processes or on a resume.

The global batch of optimizer step s is the stream positions
p = s * B_global + j, j < B_global; position p is sample perm_e[p mod N] of the dataset, where
perm_e is a permutation seeded by (seed, epoch e = p // N), and its t, w and eps come from a
generator seeded by (seed, p). Rank r, accumulation round a, takes the micro-batch
j = a * (world * B_micro) + r * B_micro + [0, B_micro). So the samples and the noise of a step
do not depend on how the global batch is split: one process and N processes compute the same
step, and a resume (also on another number of GPUs) continues the exact same stream. The step
number is the whole random state. (DistributedSampler pads each epoch to a multiple of the
world size, which would break this, so StepSampler does its job.)

    sampler = StepSampler(len(dataset), seed, start_step, steps, global_batch, micro, rank, world_size)
    loader = DataLoader(WithNoise(dataset, seed, "uniform", 2.0, 14.0), batch_size=micro, sampler=sampler)
    # each item: the dataset's {"latents", "context", "y", ...} plus "p", "t", "w", "eps"

Tested in tests/test_distill.py (the stream of one process = that of two ranks; resume continues it).
"""

import torch
from torch.utils.data import Dataset, Sampler


def draw(seed, p, shape, t_sampling, w_min, w_max):
    """Algorithm 1's random draws for stream position p: t, w (scalars) and eps (shape)."""
    g = torch.Generator().manual_seed(seed * 2**32 + p)
    # Algorithm 1: t ~ U[0, 1] (here (0, 1]: t = 0 has no step to take), or SD3's logit-normal
    if t_sampling == "uniform":
        t = 1 - torch.rand((), generator=g)
    else:
        t = torch.sigmoid(torch.randn((), generator=g)).clamp(1e-5, 1.0)  # logit-normal(0, 1)
    # Algorithm 1: w ~ U[w_min, w_max]
    w = w_min + (w_max - w_min) * torch.rand((), generator=g)
    # Algorithm 1: eps ~ N(0, I)
    eps = torch.randn(shape, generator=g)  # (C, H, W)
    return t, w, eps


class StepSampler(Sampler):
    """Yields (dataset index, stream position p) for this rank, from step `start` to `steps`:
    each step, accum rounds of B_micro positions (the module docstring)."""

    def __init__(self, n, seed, start, steps, global_batch, micro, rank, world_size):
        self.n, self.seed, self.start, self.steps = n, seed, start, steps
        self.G, self.micro, self.rank, self.world = global_batch, micro, rank, world_size
        self._perm = (None, None)

    def index(self, p):
        e = p // self.n  # the epoch
        if self._perm[0] != e:
            self._perm = (e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 2**20 + e)))
        return int(self._perm[1][p % self.n])

    def __iter__(self):
        for s in range(self.start, self.steps):
            for a in range(self.G // (self.world * self.micro)):
                first = s * self.G + a * self.world * self.micro + self.rank * self.micro
                for p in range(first, first + self.micro):
                    yield self.index(p), p

    def __len__(self):
        return (self.steps - self.start) * self.G // self.world


class WithNoise(Dataset):
    """dataset[i] plus stream position p and its draws t, w, eps."""

    def __init__(self, dataset, seed, t_sampling, w_min, w_max):
        self.dataset, self.seed, self.t_sampling, self.w_min, self.w_max = dataset, seed, t_sampling, w_min, w_max

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, ip):
        i, p = ip
        item = dict(self.dataset[i])
        t, w, eps = draw(self.seed, p, item["latents"].shape, self.t_sampling, self.w_min, self.w_max)
        return {**item, "p": p, "t": t, "w": w, "eps": eps}
