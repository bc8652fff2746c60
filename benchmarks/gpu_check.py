"""
One GPU check, ready to run: the numbers only a GPU can give, in ONE table, in about 5 minutes on
one H100 or H200. Random weights at the real sizes (nothing is downloaded); diffusers is needed
for its row (a test/benchmark dependency, requirements-test.txt).

    python benchmarks/gpu_check.py                     # SD3-medium sizes, 1024x1024, bf16
    python benchmarks/gpu_check.py --peak-tflops 989   # a device that PEAK_TFLOPS does not know
    python benchmarks/gpu_check.py --no-compile        # without the torch.compile rows (saves ~2 minutes)

Rows of the table (docs/MULTI_GPU.md says what each column means):

    forward   mmdit.py and diffusers' SD3Transformer2DModel on the same weights, eager and under
              torch.compile: median ms of one forward (SD3-medium width 1536, depth 24, 1024x1024 =
              4096 image + 333 text tokens, bf16 weights, batch 1), achieved TFLOP/s (forward_flops:
              every matmul, the attention and the patch convolution of one forward) and MFU against
              the device's dense bf16 peak (PEAK_TFLOPS by device name, or --peak-tflops)
    memory    peak memory of one real distillation step (distill.distill_loss, backward, AdamW;
              --bf16 --grad-checkpointing, the bf16 W2SD teacher pair, batch 1, 1024x1024): the full
              student and a LoRA r16 student, torch.cuda.max_memory_allocated, beside what
              benchmarks/bench_memory.py extrapolates from its CPU points (benchmarks/results/*.json)
    sampling  one image, 50 steps: the student (one forward per step, 50 NFE) and its W2SD + CFG
              teacher (296 NFE), wall seconds, and their ratio

Every part takes a device and sizes, so that tests/run/test_gpu_check.py runs each on the CPU at tiny
sizes (the table prints, the FLOP count equals torch's FLOP counter, the memory probe measures);
only main refuses to run without CUDA.
"""

import contextlib
import copy
import dataclasses
import gc
import io
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_memory  # noqa: E402
from sd3 import checkpoint  # noqa: E402
from run import cli  # noqa: E402
import distill  # noqa: E402
import embed  # noqa: E402
from sd3 import lora  # noqa: E402
import mmdit  # noqa: E402
from run import options  # noqa: E402
import samplers  # noqa: E402

GB = 1e9
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# bench_memory.py --json points of one process at SD3-medium's width, the full student and LoRA r16
POINTS = {"full": os.path.join(RESULTS, "memory-full-sd3-medium.json"),
          "LoRA r16": os.path.join(RESULTS, "memory-lora16-sd3-medium.json")}
# dense bf16 tensor-core peak, TFLOP/s, by a piece of torch.cuda.get_device_name() (first match wins;
# NVIDIA's data sheets, without sparsity)
PEAK_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
               ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("A10G", 70.0),
               ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2))


# -----------------------------------------------------------------------------
# FLOPs, TFLOP/s and MFU


def forward_flops(cfg, L_x, L_c, batch=1):
    """FLOPs of one MMDiT forward (2 per multiply-add): every matmul (embedders, adaLN, the streams' qkv,
    proj and MLP, the final layer), the joint attention (QK^T and AV: 2 L^2 D each) and the patch
    convolution; elementwise work (norms, modulation, softmax) is not counted. L_x image tokens (patches),
    L_c text tokens."""
    D, L = cfg.hidden_size, L_x + L_c
    mlp = int(D * cfg.mlp_ratio)
    stream = 2 * (3 * D * D + D * D + 2 * D * mlp)  # per token: qkv, proj, fc1, fc2
    per_sample = 2 * cfg.frequency_dim * D + 2 * D * D + 2 * cfg.pooled_dim * D + 2 * D * D  # G and F of Eq. 6
    per_sample += 2 * D * 2 * D  # the final layer's adaLN
    tokens = 2 * L_x * cfg.in_channels * cfg.patch_size ** 2 * D + 2 * L_c * cfg.context_dim * D  # embedders
    tokens += 2 * L_x * D * cfg.patch_size ** 2 * cfg.out_channels  # the final linear
    for i in range(cfg.depth):
        last, dual = i == cfg.depth - 1, i in cfg.dual_attention_layers
        per_sample += 2 * D * (2 if last else 6) * D + 2 * D * (9 if dual else 6) * D  # adaLN of both streams
        tokens += L_x * stream + L_c * (2 * 3 * D * D if last else stream)  # the last text stream: qkv only
        tokens += 4 * L * L * D  # joint attention
        if dual:  # attn2: image-only self-attention, qkv + proj, its attention
            tokens += L_x * 2 * 4 * D * D + 4 * L_x * L_x * D
    return batch * (per_sample + tokens)


def tflops(flops, seconds):
    return flops / seconds / 1e12


def mfu(achieved_tflops, peak_tflops):
    """Model FLOPs utilisation: the achieved share of the device's peak, or None without a peak."""
    return None if not peak_tflops else achieved_tflops / peak_tflops


def device_peak(name, given=None):
    """(dense bf16 TFLOP/s, where it came from) for a device name: --peak-tflops if given, else PEAK_TFLOPS."""
    if given:
        return given, "--peak-tflops"
    for piece, peak in PEAK_TFLOPS:
        if piece.lower() in name.lower():
            return peak, f"PEAK_TFLOPS[{piece!r}]"
    return None, "unknown device: give --peak-tflops for the MFU column"


# -----------------------------------------------------------------------------
# The parts: each takes a device and sizes


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup=2, iters=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(cfg, side, text, device, dtype, seed=0):
    """(x, t, context, y) for batch 1: a latent of side x side, `text` tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, side, side, generator=g)  # (B, C, H, W)
    t = torch.rand(1, generator=g)  # (B,)
    context = torch.randn(1, text, cfg.context_dim, generator=g)  # (B, L, Dc)
    y = torch.randn(1, cfg.pooled_dim, generator=g)  # (B, Dy)
    return x.to(device, dtype), t.to(device), context.to(device, dtype), y.to(device, dtype)


def forward_rows(device, cfg, side, text, dtype=torch.bfloat16, compile_backend="inductor", peak_tflops=None,
                 warmup=2, iters=10):
    """The forward rows: mmdit.py and diffusers on the same random weights, eager, then compiled unless
    compile_backend is None (mmdit.compile_mmdit: each block; diffusers: torch.compile of the model)."""
    from diffusers import SD3Transformer2DModel

    ours = bench_memory.random_mmdit(cfg, torch.float32, 0)  # random, non-zero weights (adaLN-zero would be trivial)
    with torch.device("meta"):  # built without initialising 2 B parameters on the CPU: the weights are ours
        theirs = SD3Transformer2DModel(**{k: v for k, v in checkpoint.diffusers_config(cfg).items() if k[0] != "_"})
    theirs.load_state_dict(checkpoint.diffusers_state_dict(ours), strict=True, assign=True)
    ours, theirs = ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()
    x, t, context, y = inputs(cfg, side, text, device, dtype)
    calls = {("mmdit.py", "eager"): lambda m=ours: m(x, t, context, y),
             ("diffusers", "eager"): lambda m=theirs: m(hidden_states=x, encoder_hidden_states=context,
                                                        pooled_projections=y, timestep=1000 * t, return_dict=False)[0]}
    if compile_backend:
        compiled = mmdit.compile_mmdit(copy.deepcopy(ours), backend=compile_backend)
        whole = torch.compile(copy.deepcopy(theirs), backend=compile_backend)
        calls[("mmdit.py", "compiled")] = lambda m=compiled: m(x, t, context, y)
        calls[("diffusers", "compiled")] = lambda m=whole: m(hidden_states=x, encoder_hidden_states=context,
                                                             pooled_projections=y, timestep=1000 * t,
                                                             return_dict=False)[0]
    flops = forward_flops(cfg, (side // cfg.patch_size) ** 2, text)
    rows = []
    with torch.no_grad():
        reference = calls["diffusers", "eager"]().float()
        for (impl, mode), fn in calls.items():
            diff = (fn().float() - reference).abs().max().item()  # (the first call compiles)
            s = median_seconds(fn, device, warmup, iters)
            rows.append(dict(part="forward", what=f"{impl}, {mode}", ms=1e3 * s, tflops=tflops(flops, s),
                             mfu=mfu(tflops(flops, s), peak_tflops), note=f"max |out - diffusers eager| {diff:.1e}"))
    return rows


def peak_during(device, build, step):
    """The peak bytes of live tensors while step(build()) runs, counting everything build made (not what was
    live before it): on CUDA torch.cuda.max_memory_allocated (reset after build); on the CPU the allocator's running total in the
    PyTorch profiler's allocation events (as benchmarks/bench_memory.py reads it), the profile started
    before build so that every byte is counted."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)  # what was live before (nothing, after release())
        state = build()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(state)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = build()
        with record_function("gpu_check:step"):
            step(state)
    allocs, window = [], None
    for node in bench_memory.walk(prof.profiler.kineto_results.experimental_event_tree()):
        kind, fields = node.typed
        if kind == _EventType.Allocation and fields.device.type == "cpu":
            allocs.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif node.name == "gpu_check:step":
            window = (node.start_time_ns, node.end_time_ns)
    allocs.sort()
    # the running total also carries what earlier profiles of this process left in it: count from this
    # profile's start (the total before its first event)
    base = allocs[0][1] - allocs[0][2]
    before = [total for ts, total, _ in allocs if ts < window[0]][-1:]
    return max(before + [total for ts, total, _ in allocs if window[0] <= ts <= window[1]]) - base


def distillation_step_peak(device, cfg, side, text, lora_rank=None):
    """Peak bytes of one distillation step as distill.py runs it with --bf16 --grad-checkpointing and the
    bf16 W2SD pair (the strong teacher and the weak one; the student starts from the strong one), batch 1:
    the full student (fp32 master weights) or a LoRA student of lora_rank over the strong teacher's weights.
    AdamW's moments exist before the measured step (a step on zero gradients), as in every step but the first."""
    args = options.fill_defaults(options.build_parser().parse_args(
        ["--teacher", "random weights", "--teacher-sampler", "w2sd", "--bf16", "--teacher-dtype", "bf16",
         "--global-batch", "1", "--micro-batch", "1", "--grad-checkpointing"]
        + (["--lora", str(lora_rank)] if lora_rank else [])))

    def build():
        teacher = distill.frozen(bench_memory.random_mmdit(cfg, torch.bfloat16, 1, device))
        weak = distill.frozen(bench_memory.random_mmdit(cfg, torch.bfloat16, 2, device))
        model = lora.attach(teacher, lora.settings(lora_rank)) if lora_rank else \
            bench_memory.random_mmdit(cfg, torch.float32, 1, device)
        model.gradient_checkpointing = True
        student = distill.Student(model, embed.make_fusion(args.method, cfg).to(device)).train()
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, foreach=True)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(1, cfg.in_channels, side, side, generator=g),  # (B, C, H, W)
                 "context": torch.randn(1, text, cfg.context_dim, generator=g),  # (B, L, Dc)
                 "y": torch.randn(1, cfg.pooled_dim, generator=g),  # (B, Dy)
                 "t": torch.tensor([0.6]), "w": torch.tensor([5.0]),
                 "eps": torch.randn(1, cfg.in_channels, side, side, generator=g)}
        null = (torch.randn(1, text, cfg.context_dim, generator=g), torch.randn(1, cfg.pooled_dim, generator=g))
        batch = {k: v.to(device) for k, v in batch.items()}
        return dict(student=student, teacher=teacher, weak=weak, optimizer=optimizer, batch=batch,
                    null=tuple(n.to(device) for n in null))

    def step(s):
        loss, _ = distill.distill_loss(s["student"], s["teacher"], s["batch"], s["null"], args, s["weak"], None)
        loss.backward()
        s["optimizer"].step()
        s["optimizer"].zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the measured distillation step's loss is {loss.item()}")

    return peak_during(device, build, step)


def expected_step_peak(points_file, config, depth, tokens):
    """What benchmarks/bench_memory.py extrapolates for one process's step (checkpointing on) from its CPU
    points (a --json file), or None when there is no such file or it holds no fit for config."""
    if not points_file or not os.path.isfile(points_file):
        return None
    with open(points_file) as f:
        points = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):  # report() prints its tables
        fits = bench_memory.report(points)
    if (config, True, "optimizer") not in fits:
        return None
    return bench_memory.one_process_peak(fits, config, depth, tokens, True)[1]


def memory_rows(device, cfg, side, text, config_name, points=POINTS, lora_rank=16):
    rows = []
    for label, rank in (("full", None), (f"LoRA r{lora_rank}", lora_rank)):
        peak = distillation_step_peak(device, cfg, side, text, rank)
        expected = expected_step_peak(points.get(label), config_name, cfg.depth, (side // cfg.patch_size) ** 2 + text)
        rows.append(dict(part="memory", what=f"distillation step, {label} student", peak_gb=peak / GB,
                         expected_gb=None if expected is None else expected / GB,
                         note="measured / CPU fit {:.2f}".format(peak / expected) if expected else
                         "no bench_memory points for this student"))
    return rows


def sampling_rows(device, cfg, side, text, steps=50, w=5.0, dtype=torch.bfloat16):
    """Wall time of one image: the student (samplers.sample "student": Eq. 7, one forward per step) against
    the W2SD + CFG teacher (the strong and the weak model, 6 forwards per step, 2 on the last), after a
    2-step warm-up of each."""
    student = bench_memory.random_mmdit(cfg, dtype, 1, device).eval()
    weak = bench_memory.random_mmdit(cfg, dtype, 2, device).eval()
    x, _, context, y = inputs(cfg, side, text, device, dtype)
    noise = x.float()
    context_null, y_null = torch.zeros_like(context), torch.zeros_like(y)
    runs = {"student": lambda n: samplers.sample("student", student, noise, context, y, y_null=y_null, w=w, steps=n),
            "W2SD + CFG": lambda n: samplers.sample("w2sd", student, noise, context, y, context_null, y_null, w=w,
                                                    weak=weak, steps=n)}
    seconds, nfe = {}, {}
    with torch.no_grad():
        for name, run in runs.items():
            run(2)
            synchronize(device)
            t0 = time.perf_counter()
            _, nfe[name] = run(steps)
            synchronize(device)
            seconds[name] = time.perf_counter() - t0
    ratio = seconds["W2SD + CFG"] / seconds["student"]
    return [dict(part="sampling", what=f"{name}, {steps} steps", s=seconds[name], nfe=nfe[name],
                 note=f"teacher / student {ratio:.2f}x wall, {nfe['W2SD + CFG'] / nfe['student']:.2f}x NFE"
                 if name == "student" else "") for name in runs]


def release():
    """Free what a finished part held (its models, compiled graphs and cached blocks) before the next."""
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# The table


COLUMNS = (("part", "{}", 8), ("what", "{}", 34), ("ms", "{:.1f}", 8), ("tflops", "{:.0f}", 7), ("mfu", "{:.1%}", 6),
           ("peak_gb", "{:.1f}", 7), ("expected_gb", "{:.1f}", 11), ("s", "{:.2f}", 7), ("nfe", "{}", 4),
           ("note", "{}", 0))
HEADERS = {"tflops": "TFLOP/s", "mfu": "MFU", "peak_gb": "peak GB", "expected_gb": "CPU fit GB", "nfe": "NFE"}


def table(rows):
    """One table of every row: each column where the row has a value, '-' where it has none."""
    def cell(row, key, fmt, width):
        value = row.get(key)
        text = "-" if value is None else fmt.format(value)
        return text.ljust(width) if key in ("part", "what", "note") else text.rjust(width)

    header = " ".join((HEADERS.get(k, k)).ljust(w) if k in ("part", "what", "note") else HEADERS.get(k, k).rjust(w)
                      for k, _, w in COLUMNS)
    lines = [header.rstrip()] + [" ".join(cell(r, k, f, w) for k, f, w in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def main(args):
    if not torch.cuda.is_available():
        raise ValueError("gpu_check.py measures a CUDA GPU and torch sees none here (torch "
                         f"{torch.__version__}); its parts run on a CPU at tiny sizes in tests/run/test_gpu_check.py")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops {args.peak_tflops}: give the device's dense bf16 peak, > 0")
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ValueError("gpu_check.py compares with diffusers' SD3Transformer2DModel: pip install -r "
                         "requirements-test.txt") from e
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak, source = device_peak(name, args.peak_tflops)
    cfg = dataclasses.replace(mmdit.CONFIGS[args.config], depth=args.depth)
    side = args.res // 8
    start = time.time()
    print(f"gpu_check: {name}, torch {torch.__version__}, bf16 peak {peak or '?'} TFLOP/s ({source}); {args.config} "
          f"width {cfg.hidden_size} depth {cfg.depth}, {args.res}x{args.res} = {(side // cfg.patch_size) ** 2} image + "
          f"{args.tokens} text tokens, batch 1, random weights; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = forward_rows(device, cfg, side, args.tokens, compile_backend=None if args.no_compile else "inductor",
                        peak_tflops=peak, iters=args.iters)
    release()
    rows += memory_rows(device, cfg, side, args.tokens, args.config)
    release()
    rows += sampling_rows(device, cfg, side, args.tokens, steps=args.steps)
    print(table(rows))
    print(f"{time.time() - start:.0f} s in all")


def build_parser():
    parser = cli.parser("The GPU check: forward speed and MFU against diffusers, torch.compile, one distillation "
                        "step's peak memory against the CPU fit, student vs W2SD + CFG sampling time.")
    parser.add_argument("--config", default="sd3-medium", choices=sorted(mmdit.CONFIGS))
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--res", type=int, default=1024, help="image side in pixels (latent = res / 8)")
    parser.add_argument("--tokens", type=int, default=333, help="text tokens (77 CLIP + 256 T5)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of the sampling rows")
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per row (after 2 warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s "
                        "(default: PEAK_TFLOPS by device name)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    return parser


if __name__ == "__main__":
    cli.run(main, build_parser())
