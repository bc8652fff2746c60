"""
Cost of the paper's five samplers on the SAME MMDiT, noise and prompt, side by side in one run:
network evaluations (NFE, counted) and wall time per image, each as a ratio to the student
(the paper's Table 4 "6x": W2SD + CFG costs 6(N-1) + 2 = 296 NFE at 50 steps, the student 50).

    python benchmarks/bench_samplers.py                              # tiny-sd3, 32x32 latent, CPU, 1 thread
    python benchmarks/bench_samplers.py --hidden 256 --depth 4       # a wider net: closer to compute-bound
    python benchmarks/bench_samplers.py --config sd3-medium --res 1024 --dtype bf16   # on a GPU

Weights are random (the cost of a forward does not depend on them). W2SD gets its own strong
and weak models of the same size. The methods are timed in turns, --repeats times; the table
gives the fastest run (load on a shared machine only adds time) and the ratio of medians, and on
a CPU the process's CPU time, which other processes do not inflate. The wall ratio stays under
the NFE ratio where a batch of 2 (CFG) costs less than two batches of 1, i.e. where the network
is too small to be compute-bound, and where a step costs more than its network evaluations.

Two more rows measure the student's cost outside the network: "student (per-step z)" computes
its conditioning at every step (samplers.student: G(psi(t)) and every adaLN layer, matrix-vector
products at batch 1), where sample("student") computes it for the whole schedule at once
(samplers.student_steps); "network alone" is the same number of forwards on a fixed conditioning
with nothing around them, and "w2sd network alone" W2SD + CFG's forwards likewise (its 148 calls
at batch 2). A method minus its network alone = the sampler's own cost per step.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level modules
from run import cli  # noqa: E402
import embed  # noqa: E402
import mmdit  # noqa: E402
import samplers  # noqa: E402

# rows besides the five samplers: the student as samplers.student runs it (conditioning computed at
# every step), and the network alone: the student's forwards (batch 1), then W2SD + CFG's (batch 2,
# three per step but the last), each on a fixed conditioning with nothing around them
EXTRA = ("student (per-step z)", "network alone", "w2sd network alone")


def random_mmdit(cfg, seed, device, dtype):
    torch.manual_seed(seed)
    model = mmdit.MMDiT(cfg)
    with torch.no_grad():  # random, non-zero weights (adaLN-zero init would make a trivial model)
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(device, dtype).eval().requires_grad_(False)


def timed(fn, device):
    """Returns fn(), its wall time and the CPU time of this process (both in seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def check(args):
    """Every argument, before a model is built: sizes >= 1, a width of whole heads, --res of whole patches,
    w finite, and the three models (whose position table grows with --res) and one batch's inputs within
    the device's memory. Returns (device, dtype, cfg)."""
    for flag in ("tokens", "steps", "repeats", "threads"):
        cli.at_least(getattr(args, flag), 1, "--" + flag)
    for flag in ("depth", "hidden"):
        if getattr(args, flag) is not None:
            cli.at_least(getattr(args, flag), 1, "--" + flag)
    cli.finite(args.w, "--w", low=0, why="the paper's guidance w, Eq. 2")
    cli.check_seed(args.seed)
    device = cli.check_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cli.check_memory(8 * (args.steps + 1), f"the schedule of {args.steps} steps (its N + 1 times)", "--steps")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = mmdit.CONFIGS[args.config]
    if args.hidden is not None and args.hidden % base.head_size:
        raise cli.InputError(f"--hidden {args.hidden}: must be a multiple of the head size {base.head_size} "
                             f"({args.config}'s), so that the width is whole heads")
    side = 8 * base.patch_size
    if args.res < side or args.res % side:
        raise cli.InputError(f"--res {args.res}: must be a positive multiple of {side} (the VAE's 8 x the patches)")
    cfg = dataclasses.replace(
        base, depth=args.depth or base.depth, hidden_size=args.hidden or base.hidden_size,
        num_heads=(args.hidden or base.hidden_size) // base.head_size if args.hidden else base.num_heads,
        pos_embed_max_size=max(base.pos_embed_max_size, args.res // 8 // base.patch_size),
        dual_attention_layers=tuple(i for i in base.dual_attention_layers if i < (args.depth or base.depth)))
    with torch.device("meta"):
        n = sum(p.numel() for p in mmdit.MMDiT(cfg).parameters()) + cfg.pos_embed_max_size ** 2 * cfg.hidden_size
    L = (args.res // side) ** 2 + args.tokens
    nbytes = torch.finfo(dtype).bits // 8 * (3 * n + 2 * (L * 3 * cfg.hidden_size + args.tokens * cfg.context_dim))
    cli.check_memory(nbytes, f"three {n / 1e9:.3g} B-number models (the position table grows with --res) and a "
                     "batch's inputs", "--depth, --hidden, --res or --tokens", device)
    return device, dtype, cfg


def main(args):
    device, dtype, cfg = check(args)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, strong, weak = (random_mmdit(cfg, seed, device, dtype) for seed in (0, 1, 2))

    g = torch.Generator().manual_seed(args.seed)
    side = args.res // 8  # latent side: the VAE divides by 8
    noise = torch.randn(1, cfg.in_channels, side, side, generator=g).to(device)  # (1, C, H, W), float32
    context = torch.randn(1, args.tokens, cfg.context_dim, generator=g).to(device, dtype)  # (1, L, Dc)
    y = torch.randn(1, cfg.pooled_dim, generator=g).to(device, dtype)  # (1, Dy)
    context_null = torch.randn(1, args.tokens, cfg.context_dim, generator=g).to(device, dtype)
    y_null = torch.randn(1, cfg.pooled_dim, generator=g).to(device, dtype)

    def run(method, steps):
        if method == EXTRA[0]:  # the student with its conditioning computed at every step (samplers.student)
            counter = samplers.NFECounter()
            v = samplers.student(model, context, y, y_null, args.w, counter)
            return samplers.euler(v, noise, samplers.flow_sigmas(steps)), counter.per_sample(1)
        if method in EXTRA[1:]:  # the network alone: the method's forwards on a fixed conditioning, nothing else
            counter = samplers.NFECounter()
            forward = counter.wrap(model)
            B, calls = (1, steps) if method == EXTRA[1] else (2, 3 * (steps - 1) + 1)
            for _ in range(calls):
                forward(noise.expand(B, -1, -1, -1), t_fixed.expand(B), context.expand(B, -1, -1), y.expand(B, -1),
                        adaln=[m.expand(B, -1) for m in adaln_fixed])
            return noise, counter.per_sample(1)
        w = None if method == "euler" else args.w
        return samplers.sample(method, model, noise, context, y, context_null, y_null, w=w, steps=steps,
                               strong=strong, weak=weak)

    t_fixed = torch.full((1,), 0.5, device=device)
    with torch.no_grad():
        adaln_fixed = model.adaln(embed.sd3_conditioning(model, t_fixed, y))
    methods = samplers.METHODS + EXTRA

    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"{device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}{threads}), "
          f"torch {torch.__version__}, {args.dtype}; MMDiT depth {cfg.depth} width {cfg.hidden_size}; latent "
          f"{cfg.in_channels}x{side}x{side} ({(side // cfg.patch_size) ** 2} image + {args.tokens} text tokens); "
          f"{args.steps} steps, w = {args.w}, {args.repeats} repeats")
    with torch.no_grad():
        for method in methods:  # warm-up
            run(method, 2)
        walls, cpus = {m: [] for m in methods}, {m: [] for m in methods}
        nfe = {}
        for _ in range(args.repeats):
            for method in methods:  # in turns, so that a busy moment hits every method alike
                (x0, nfe[method]), wall_s, cpu_s = timed(lambda: run(method, args.steps), device)
                if not torch.isfinite(x0).all():
                    raise RuntimeError(f"{method} produced non-finite latents")
                walls[method].append(wall_s)
                cpus[method].append(cpu_s)
    # the fastest run (load on a shared machine only adds time) and the median
    wall = {m: min(s) for m, s in walls.items()}
    wall_med = {m: statistics.median(s) for m, s in walls.items()}
    cpu = {m: min(s) for m, s in cpus.items()}

    s = "student"
    head = "| method                | NFE | NFE / student | wall s | wall / student | median / student | wall ms / NFE |"
    rule = "|-----------------------|-----|---------------|--------|----------------|------------------|---------------|"
    if device.type == "cpu":  # CPU time does not count the time other processes hold the core
        head, rule = head + "  CPU s | CPU / student |", rule + "--------|---------------|"
    print("\n" + head + "\n" + rule)
    for m in methods:
        row = (f"| {m:<21} | {nfe[m]:>3} | {nfe[m] / nfe[s]:>13.2f} | {wall[m]:>6.3f} | {wall[m] / wall[s]:>14.2f} | "
               f"{wall_med[m] / wall_med[s]:>16.2f} | {1000 * wall[m] / nfe[m]:>13.2f} |")
        if device.type == "cpu":
            row += f" {cpu[m]:>6.3f} | {cpu[m] / cpu[s]:>13.2f} |"
        print(row)
    ms = {m: (wall[m] - wall[n]) / args.steps * 1000 for m, n in ((s, EXTRA[1]), (EXTRA[0], EXTRA[1]),
                                                                 ("w2sd", EXTRA[2]))}
    print(f"\nper step outside the network (fastest runs, method - its network alone): student {ms[s]:.2f} ms, "
          f"student with the conditioning computed per step {ms[EXTRA[0]]:.2f} ms, w2sd {ms['w2sd']:.2f} ms; "
          f"networks alone, w2sd / student: {wall[EXTRA[2]] / wall[EXTRA[1]]:.2f}")


if __name__ == "__main__":
    parser = cli.parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-sd3", choices=sorted(mmdit.CONFIGS))
    parser.add_argument("--depth", type=int, default=None, help="override the config's depth")
    parser.add_argument("--hidden", type=int, default=None, help="override the config's width (same head size)")
    parser.add_argument("--res", type=int, default=256, help="image side in pixels; the latent is res / 8")
    parser.add_argument("--tokens", type=int, default=16, help="text tokens (SD3: 333)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--w", type=float, default=5.0, help="the paper's guidance w (released student: 5)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 gives the steadiest timings)")
    cli.run(main, parser)
