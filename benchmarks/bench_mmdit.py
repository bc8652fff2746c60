"""
Forward time of mmdit.py against diffusers' SD3Transformer2DModel on the SAME weights,
side by side in one run (these machines are noisy: only the ratio is meaningful).

    python benchmarks/bench_mmdit.py                 # CPU: SD3-medium width, depth 4, 512x512
    python benchmarks/bench_mmdit.py --depth 24 --res 1024 --dtype bf16   # on a GPU

diffusers is a test/benchmark-only dependency (requirements-test.txt). On a GPU it also
prints the achieved TFLOP/s (matmul + attention FLOPs of one forward).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level modules
import checkpoint  # noqa: E402
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


def timed(fn, device, reps):
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(args):
    from diffusers import SD3Transformer2DModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    cfg = dataclasses.replace(mmdit.CONFIGS[args.config], depth=args.depth,
                              dual_attention_layers=tuple(i for i in mmdit.CONFIGS[args.config].dual_attention_layers
                                                          if i < args.depth))
    ours = mmdit.MMDiT(cfg)
    with torch.no_grad():  # random, non-zero weights (adaLN-zero init would make a trivial model)
        for p in ours.parameters():
            p.normal_(0, 0.02)
    theirs = SD3Transformer2DModel(**{k: v for k, v in checkpoint.diffusers_config(cfg).items() if k[0] != "_"})
    theirs.load_state_dict(checkpoint.diffusers_state_dict(ours))
    ours, theirs = ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()

    B, h = args.batch, args.res // 8
    x = torch.randn(B, cfg.in_channels, h, h, device=device, dtype=dtype)
    t = torch.rand(B, device=device)
    context = torch.randn(B, args.tokens, cfg.context_dim, device=device, dtype=dtype)
    y = torch.randn(B, cfg.pooled_dim, device=device, dtype=dtype)
    with torch.no_grad():
        run_ours = lambda: ours(x, t, context, y)  # noqa: E731
        run_theirs = lambda: theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=y,  # noqa: E731
                                    timestep=1000 * t, return_dict=False)[0]
        err = (run_ours().float() - run_theirs().float()).abs().max().item()
        for fn in (run_ours, run_theirs):  # warm-up
            timed(fn, device, args.warmup)
        t_ours, t_theirs = [], []
        for _ in range(args.rounds):  # interleaved, so drifts in machine load hit both
            t_ours += timed(run_ours, device, args.reps)
            t_theirs += timed(run_theirs, device, args.reps)
    m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    flops = forward_flops(cfg, (h // cfg.patch_size) ** 2, args.tokens) * B
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else torch.get_num_threads()} "
          f"{'' if device.type == 'cuda' else 'threads'}), torch {torch.__version__}, dtype {args.dtype}")
    print(f"model: {args.config} width {cfg.hidden_size}, {cfg.num_heads} heads, depth {cfg.depth}; "
          f"{args.res}x{args.res} image -> {(h // cfg.patch_size) ** 2} image tokens + {args.tokens} text tokens, "
          f"batch {B}; max |ours - diffusers| = {err:.2e}")
    print(f"{'':10s} {'median s':>10s} {'min s':>10s} {'TFLOP/s':>9s}")
    for name, ts, m in (("mmdit.py", t_ours, m_ours), ("diffusers", t_theirs, m_theirs)):
        print(f"{name:10s} {m:10.4f} {min(ts):10.4f} {flops / m / 1e12:9.2f}")
    print(f"ratio mmdit.py / diffusers (median): {m_ours / m_theirs:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd3-medium", choices=sorted(mmdit.CONFIGS))
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--res", type=int, default=512, help="image side in pixels (latent = res / 8)")
    parser.add_argument("--tokens", type=int, default=333, help="text tokens (77 CLIP + 256 T5)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    main(parser.parse_args())
