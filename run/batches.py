"""
Algorithm 1's batches: which samples, and which t, w and eps, every optimizer step of distill.py
draws, such that the step does not depend on the number of processes or on a resume.

The global batch of optimizer step s is the stream positions
p = s * B_global + j, j < B_global; position p is sample perm_e[p mod N] of the dataset, where
perm_e is a permutation seeded by (seed, epoch e = p // N), and its t, w and eps come from a
generator seeded by (seed, p) (distill.draw_t_w_eps, which distill.py hands to WithNoise). Rank r,
accumulation round a, takes the micro-batch j = a * (world * B_micro) + r * B_micro + [0, B_micro).
So the samples and the noise of a step do not depend on how the global batch is split: one process
and N processes compute the same step, and a resume (also on another number of GPUs) continues the
exact same stream. The step number is the whole random state. (DistributedSampler pads each epoch
to a multiple of the world size, which would break this, so StepSampler does its job.)

Buckets (prepare.py's aspect-ratio buckets: latents of different sizes cannot share a batch): the
global batch of step s comes from ONE bucket b(s), drawn with probability N_b / N from a generator
of its own seeded by (seed, s), and takes the next B_global positions q of that bucket's stream:
q = c * B_global + j, where c is the number of earlier steps that drew b, and position q is sample
perm_{b,e}[q mod N_b] of the bucket (perm_{b,e} seeded by (seed, b, e = q // N_b)). t, w and eps stay
keyed by the step's position p = s * B_global + j. b(s) and c depend on the step number alone, so the
properties above hold; with one bucket (square data, the toy world) c = s and q = p: the stream is
exactly the one above.

    sampler = StepSampler(len(dataset), seed, start_step, steps, global_batch, micro, rank, world_size)
    draw = functools.partial(distill.draw_t_w_eps, seed, t_sampling="uniform", w_min=2.0, w_max=14.0)
    loader = DataLoader(WithNoise(dataset, draw), batch_size=micro, sampler=sampler)
    # each item: the dataset's {"latents", "context", "y", ...} plus "p", "t", "w", "eps"

Tested in tests/test_distill.py (the stream of one process = that of two ranks; resume continues it)
and tests/test_prepare.py (with buckets: one bucket per global batch, the same properties).
"""

import bisect

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

BUCKET_STREAM = 0x6275636B  # the bucket draws' own stream: np.random.default_rng((seed, BUCKET_STREAM, step))


class StepSampler(Sampler):
    """Yields (dataset index, stream position p) for this rank, from step `start` to `steps`:
    each step, accum rounds of B_micro positions (the module docstring). buckets: the bucket of
    every sample (ShardDataset.bucket_ids), or None for one bucket; each global batch is then drawn
    from one bucket."""

    def __init__(self, n, seed, start, steps, global_batch, micro, rank, world_size, buckets=None):
        self.n, self.seed, self.start, self.steps = n, seed, start, steps
        self.G, self.micro, self.rank, self.world = global_batch, micro, rank, world_size
        members = {}
        for i, b in enumerate(buckets if buckets is not None else [0] * n):
            members.setdefault(b, []).append(i)
        self.members = [members[b] for b in sorted(members)]  # the sample indices of each bucket
        self.cumulative = np.cumsum([len(m) for m in self.members]).tolist()  # (buckets,)
        self._perm = (None, None)

    def bucket(self, s):
        """The bucket of step s's global batch: bucket b with probability N_b / N."""
        if len(self.members) == 1:
            return 0
        u = np.random.default_rng((self.seed, BUCKET_STREAM, s)).random()
        return bisect.bisect_right(self.cumulative, u * self.n)

    def index(self, p, b=0):
        """The dataset index at position p of bucket b's stream."""
        members = self.members[b]
        e = p // len(members)  # the bucket's epoch
        if self._perm[0] != (b, e):
            seed = self.seed * 2**20 + e + b * 2**40  # bucket 0: the seed of the stream without buckets
            self._perm = ((b, e), torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)))
        return members[int(self._perm[1][p % len(members)])]

    def __iter__(self):
        drawn = [0] * len(self.members)  # steps that drew each bucket before `start`
        if len(self.members) > 1:
            for s in range(self.start):
                drawn[self.bucket(s)] += 1
        for s in range(self.start, self.steps):
            b = self.bucket(s)
            c, drawn[b] = drawn[b] if len(self.members) > 1 else s, drawn[b] + 1
            for a in range(self.G // (self.world * self.micro)):
                j = a * self.world * self.micro + self.rank * self.micro
                for k in range(j, j + self.micro):
                    yield self.index(c * self.G + k, b), s * self.G + k

    def __len__(self):
        return (self.steps - self.start) * self.G // self.world


class WithNoise(Dataset):
    """dataset[i] plus stream position p and its draws t, w, eps = draw(p, shape of the latents)."""

    def __init__(self, dataset, draw):
        self.dataset, self.draw = dataset, draw

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, ip):
        i, p = ip
        item = dict(self.dataset[i])
        t, w, eps = self.draw(p, item["latents"].shape)
        return {**item, "p": p, "t": t, "w": w, "eps": eps}
