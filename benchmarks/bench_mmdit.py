"""
Forward time of mmdit.py against diffusers' SD3Transformer2DModel on the SAME weights, and what
each of mmdit.py's speed choices is worth: an ablation table measured in one process, every
variant timed in turns round after round (these machines are noisy: only ratios of medians
taken side by side mean something).

    python benchmarks/bench_mmdit.py                          # CPU fp32: SD3-medium width, depth 2, 512x512, 154 text tokens
    python benchmarks/bench_mmdit.py --autocast bf16          # fp32 weights under bf16 autocast (the student in distill.py)
    python benchmarks/bench_mmdit.py --compile                # adds torch.compile rows (compiles first: minutes on a CPU)
    python benchmarks/bench_mmdit.py --depth 24 --res 1024 --tokens 333 --dtype bf16   # on a GPU

Rows (each "without X" is mmdit.py with one choice undone, the rest kept):

    mmdit.py                     as it is
    without contiguous stream    the patch embedding as a Conv2d whose (B, D, h, w) output is
                                 transposed: the image residual stream becomes a strided view, and
                                 every later op on it (LayerNorm, addcmul) pays for the strides
    without packed qkv views     q, k, v copied to contiguous (B, nh, L, hs) before SDPA, and its
                                 output copied back to (B, L, D)
    with one adaLN matmul        every block's adaLN in ONE matrix product over the concatenated
                                 adaLN weights (c is the same for all blocks); concatenated once,
                                 outside the timing
    compiled                     mmdit.compile_mmdit (with --compile)
    compiled whole forward       torch.compile(model) (with --compile)
    diffusers                    SD3Transformer2DModel, the reference

diffusers is a test/benchmark-only dependency (requirements-test.txt). On a GPU the table also
gives the achieved TFLOP/s (matmul + attention FLOPs of one forward).
"""

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level modules
from sd3 import checkpoint  # noqa: E402
from run import cli  # noqa: E402
import mmdit  # noqa: E402


def forward_flops(cfg, L_x, L_c):
    """2 x multiply-adds of the matmuls and attention of one forward (sample of batch 1).
    Per token and block: qkv 3D^2, proj D^2, MLP 2 * ratio * D^2; attention 2 * L^2 * D
    for QK^T and as much for AV. The last text stream is pre-only (qkv only)."""
    D, L = cfg.hidden_size, L_x + L_c
    dense = 2 * D * D * (3 + 1 + 2 * cfg.mlp_ratio)  # per token, full stream
    total = 0
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        total += L_x * dense + L_c * (2 * D * D * 3 if last else dense) + 4 * L * L * D
        if i in cfg.dual_attention_layers:  # image-only attn2: qkv + proj, attention
            total += L_x * 2 * D * D * 4 + 4 * L_x * L_x * D
    return total


# -----------------------------------------------------------------------------
# The variants: one speed choice of mmdit.py undone (or one more tried), on a copy of the model


def conv_patch_embed(self, x):
    """The patch embedding as a Conv2d, its (B, D, h, w) output seen as (B, h, w, D): a
    transposed view, which the pos-embed addition and every later op of the stream inherit."""
    return self.proj(x.to(self.proj.weight.dtype)).permute(0, 2, 3, 1)  # (B, h, w, D), strided


def attention_with_copies(qkv):
    """q, k, v copied to contiguous (B, nh, L, hs) before SDPA, its output copied back."""
    q, k, v = (t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # each (B, nh, L, hs)
    o = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hs), contiguous
    return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)  # (B, L, D), a copy


def one_adaln_matmul(model):
    """model.adaln computing every adaLN output with ONE matmul over the concatenated weights."""
    layers = [s.adaLN_modulation[1] for b in model.joint_blocks for s in (b.context_block, b.x_block)]
    layers.append(model.final_layer.adaLN_modulation[1])
    weight = torch.cat([m.weight for m in layers]).detach()  # (sum of n_mods * D, D)
    bias = torch.cat([m.bias for m in layers]).detach()
    sizes = [m.out_features for m in layers]

    def adaln(self, c):
        silu_c = F.silu(c.to(weight.dtype))
        return list(F.linear(silu_c, weight, bias).float().split(sizes, dim=-1))

    return adaln


class Patched:
    """Calls the model with mmdit.attention replaced (the blocks look it up at call time)."""

    def __init__(self, model, attention):
        self.model, self.attention = model, attention

    def __call__(self, *args):
        saved = mmdit.attention
        mmdit.attention = self.attention
        try:
            return self.model(*args)
        finally:
            mmdit.attention = saved


def variants(ours, with_compile):
    out = {"mmdit.py": ours}
    strided = copy.deepcopy(ours)
    strided.x_embedder.forward = types.MethodType(conv_patch_embed, strided.x_embedder)
    out["without contiguous stream"] = strided
    out["without packed qkv views"] = Patched(ours, attention_with_copies)
    fused = copy.deepcopy(ours)
    fused.adaln = types.MethodType(one_adaln_matmul(fused), fused)
    out["with one adaLN matmul"] = fused
    if with_compile:
        out["compiled"] = mmdit.compile_mmdit(copy.deepcopy(ours))
        out["compiled whole forward"] = torch.compile(copy.deepcopy(ours))
    return out


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def check(args):
    """Every argument, before a model is built: sizes >= 1, --res within the config's position table, the
    models' weights and one forward's inputs within the device's memory. Returns (device, dtype, cfg)."""
    for flag in ("depth", "tokens", "batch", "rounds"):
        cli.at_least(getattr(args, flag), 1, "--" + flag)
    cli.at_least(args.warmup, 0, "--warmup")
    if args.threads is not None:
        cli.at_least(args.threads, 1, "--threads")
    device = cli.check_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    base = mmdit.CONFIGS[args.config]
    cfg = dataclasses.replace(base, depth=args.depth,
                              dual_attention_layers=tuple(i for i in base.dual_attention_layers if i < args.depth))
    side = 8 * cfg.patch_size
    if args.res < side or args.res % side or args.res > side * cfg.pos_embed_max_size:
        raise cli.InputError(f"--res {args.res}: must be a positive multiple of {side} (the VAE's 8 x the patches) and "
                             f"at most {side * cfg.pos_embed_max_size} ({args.config}'s position table holds "
                             f"{cfg.pos_embed_max_size} x {cfg.pos_embed_max_size} patches)")
    with torch.device("meta"):
        n = sum(p.numel() for p in mmdit.MMDiT(cfg).parameters())
    copies = 4 + 2 * args.compile  # ours, diffusers', the two variants' deep copies (and two compiled ones)
    L = (args.res // side) ** 2 + args.tokens
    nbytes = torch.finfo(dtype).bits // 8 * (copies * n + args.batch * (L * 3 * cfg.hidden_size
                                                                         + args.tokens * cfg.context_dim))
    cli.check_memory(nbytes, f"{copies} copies of a {n / 1e9:.2f} B-parameter model and a batch's inputs",
                     "--depth, --res, --tokens or --batch", device)
    return device, dtype, cfg


def main(args):
    device, dtype, cfg = check(args)
    from diffusers import SD3Transformer2DModel  # a test/benchmark-only dependency, and a slow import: after the checks

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = mmdit.MMDiT(cfg)
    with torch.no_grad():  # random, non-zero weights (adaLN-zero init would make a trivial model)
        for p in ours.parameters():
            p.normal_(0, 0.02)
    theirs = SD3Transformer2DModel(**{k: v for k, v in checkpoint.diffusers_config(cfg).items() if k[0] != "_"})
    theirs.load_state_dict(checkpoint.diffusers_state_dict(ours))
    ours, theirs = ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()

    B, side = args.batch, args.res // 8
    x = torch.randn(B, cfg.in_channels, side, side, device=device, dtype=dtype)
    t = torch.rand(B, device=device)
    context = torch.randn(B, args.tokens, cfg.context_dim, device=device, dtype=dtype)
    y = torch.randn(B, cfg.pooled_dim, device=device, dtype=dtype)
    models = variants(ours, args.compile)
    calls = {name: (lambda m=m: m(x, t, context, y)) for name, m in models.items()}
    calls["diffusers"] = lambda: theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=y,
                                        timestep=1000 * t, return_dict=False)[0]
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast])
                if args.autocast else contextlib.nullcontext())
    times = {name: [] for name in calls}
    with torch.no_grad(), autocast:
        reference = calls["diffusers"]().float()
        err = {name: (fn().float() - reference).abs().max().item() for name, fn in calls.items()}  # (compiles)
        for fn in calls.values():  # warm-up
            for _ in range(args.warmup):
                fn()
        for _ in range(args.rounds):  # in turns, so that a busy moment of the machine hits every variant alike
            for name, fn in calls.items():
                times[name].append(timed(fn, device))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    flops = forward_flops(cfg, (side // cfg.patch_size) ** 2, args.tokens) * B
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), torch {torch.__version__}, weights {args.dtype}"
          + (f", autocast {args.autocast}" if args.autocast else "") + f"; {args.rounds} rounds")
    print(f"model: {args.config} width {cfg.hidden_size}, {cfg.num_heads} heads, depth {cfg.depth}; {args.res}x{args.res} "
          f"image -> {(side // cfg.patch_size) ** 2} image tokens + {args.tokens} text tokens, batch {B}")
    print(f"{'':28s} {'median s':>9s} {'min s':>8s} {'/ diffusers':>11s} {'/ mmdit.py':>10s} {'TFLOP/s':>8s} "
          f"{'max |out - diffusers|':>21s}")
    for name, ts in times.items():
        m = median[name]
        print(f"{name:28s} {m:9.4f} {min(ts):8.4f} {m / median['diffusers']:11.3f} {m / median['mmdit.py']:10.3f} "
              f"{flops / m / 1e12:8.2f} {err[name]:21.2e}")
    print(f"ratio mmdit.py / diffusers (median of {args.rounds} interleaved rounds): "
          f"{median['mmdit.py'] / median['diffusers']:.3f}")


if __name__ == "__main__":
    parser = cli.parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd3-medium", choices=sorted(mmdit.CONFIGS))
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--res", type=int, default=512, help="image side in pixels (latent = res / 8)")
    parser.add_argument("--tokens", type=int, default=154, help="text tokens (77 CLIP + 77 T5; SD3's pipeline: 333)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the weights' dtype")
    parser.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="run under torch.autocast")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    cli.run(main, parser)
