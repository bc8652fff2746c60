"""
Peak memory of ONE distillation step (Algorithm 1 as distill.py runs it), measured on the CPU at the
published widths for small depths and token counts, fitted, and extrapolated to SD3-medium and
SD3.5-large at 1024x1024.

    python benchmarks/bench_memory.py              # GRID: 36 points, each in a fresh process (17 min on 2 cores)
    python benchmarks/bench_memory.py --quick      # 4 points per width, checkpointing on: the machinery (3 min)
    python benchmarks/bench_memory.py --optimizer fused   # AdamW(fused=True) instead of distill.py's default
    python benchmarks/bench_memory.py --json points.json; python benchmarks/bench_memory.py --load points.json
    python benchmarks/bench_memory.py --lora 16 --config sd3-medium   # a LoRA student (distill.py --lora 16)
    python benchmarks/bench_memory.py --config sd3.5-large --fsdp      # and distill.py --fsdp, measured (~20 min)
    python benchmarks/bench_memory.py --fsdp-only --json f.json; python benchmarks/bench_memory.py --load f.json --load a.json

The step is distill.py's own: distill.distill_loss on arguments from options.build_parser() and
options.fill_defaults (SD3 defaults: the W2SD + CFG teacher, 50-step schedule) with --bf16 (the
student under bf16 autocast, fp32 master weights) and bf16 teacher weights (--teacher-dtype bf16,
distill.py's default on CUDA): 6 teacher forwards without gradients (the strong and the weak model),
the student's forward and backward, then AdamW. The optimizer is built as distill.py builds it,
with foreach=True, its default on CUDA (foreach keeps a parameter-sized temporary list that the
CPU's default per-tensor loop does not). Batch 1. AdamW's moments are created first (a step on zero
gradients), so that they exist throughout the measured step, as in every step of a run but the first.

What is measured: the bytes of live tensors (weights, buffers, gradients, AdamW moments, autocast's
bf16 weight copies, activations saved for backward, temporaries), from the PyTorch profiler's
allocation events (profile_memory=True; each event carries the allocator's running total), started
before the models are built, so that everything is counted. This is the quantity
torch.cuda.max_memory_allocated reports on a GPU; it is exact and deterministic (the same point
gives the same bytes), whereas the process's peak RSS (printed beside it as a cross-check) adds
the C allocator's caching and page granularity. The peak is taken per phase of the step (teacher
forwards; student forward; backward; optimizer step), because which phase peaks depends on the
size: at these small token counts the optimizer step peaks (weights + gradients + moments), at
1024x1024 the activations count. The backward's own peak is, at small sizes, at its end (all
gradients allocated, activations freed); at large sizes it is at its start (activations still
held). So the backward is also measured less the gradients accumulated so far ("backward - grads",
marked in the profile by a hook on each parameter), which fits the start; the extrapolation adds
one block's gradients to it (a process of its own) or all of them (DDP).

The fit, per width and phase: peak = a + b * depth + c * depth * tokens + d * tokens (least
squares). Why this model: the parameters of a joint block are the same at every depth (b: its
weights, and in the student its gradient and moments), the activations a block saves for backward
grow linearly with its tokens (c: attention is SDPA's flash kernel, which saves O(L) per head, not
the L x L scores), and what lies outside the blocks (embedders, pos_embed, final layer: a; inputs,
embeddings and the loss: d) does not depend on depth. The printed residuals show how well it holds.
b is checked against the parameter bytes. Extrapolation: depth 24 (SD3-medium, width 1536) and depth
38 (SD3.5-large, width 2432, qk RMSNorm, measured at its own width and config) at 4096 image tokens +
333 text tokens.

--lora RANK (with --lora-targets / --lora-full as distill.py takes them): the LoRA student of
distill.py --lora, built as distill.py builds it (lora.attach over the bf16 teacher, whose weights it
shares): its fp32 trainable tensors, their gradients and AdamW moments replace the full student's;
the two bf16 teachers stay. The fit and the extrapolation are the same; the parameter terms use the
trainable count (lora.count at each depth).

--fsdp: distill.py --fsdp's step measured too, per rank, under torchrun with 1, 2 and 4 gloo ranks
(FSDP_RANKS) on this CPU, at a narrow width (FSDP_WIDTH: SD3.5-large's block structure at width 512,
depths 1-3, checkpointing on), each beside the one-process step at the same sizes: parallel.FullShard
shards the student as distill.py does, and the teachers stay whole (FSDP) or are sharded too (FSDP+T,
--fsdp-teachers), two fits. The peak of the busiest rank, less
the one-process peak, is fitted per phase as

    FSDP - one process = - s S (1 - 1/N) - k S + g U

with S the student's parameters, N the ranks and U = one block's parameters + those outside the
blocks (FSDP's working set: the root unit stays gathered through the step, a block is gathered while
it runs): s = bytes per parameter that full sharding divides by N (expected: fp32 weight 4 + AdamW
moments 8, + gradient 4 in the backward, + foreach's temporary 4 in the optimizer step; + 4 for the two
bf16 teachers under --fsdp-teachers), k = bytes per parameter that one process holds and FSDP does not at all,
g = bytes of FSDP's working set per parameter of U. These are bytes per parameter, so they carry
to any width: the extrapolation takes the one-process peak fitted at the published width and applies
them, for SD3.5-large on --gpus GPUs. The backward less gradients is marked, under FSDP, by the end
of each unit's reduce-scatter (its `FSDP::post_backward_reduce` range in the profile), which
allocates that unit's gradient shards. On a GPU the next block's all-gather also overlaps the
block that runs (on the CPU the collectives run in order): up to one more block of fp32 weights,
printed beside the figure, not in it.
ZeRO-1 / ZeRO-2 columns stay arithmetic on paper (distill.py does not implement them).

Not measured here (a GPU adds them): the CUDA context and kernels (~0.5-1 GB), cuBLAS / cuDNN
workspaces, the caching allocator's fragmentation (reserved > allocated, often 5-15%), NCCL buffers,
and DDP: its gradient buckets hold the gradients for the whole run (gradient_as_bucket_view: the
.grad tensors are views into them), so under DDP the gradients are resident in every phase, which
the extrapolation adds.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level modules
from run import cli  # noqa: E402
from sd3 import checkpoint  # noqa: E402
import distill  # noqa: E402
import embed  # noqa: E402
from run import parallel  # noqa: E402
from sd3 import lora  # noqa: E402
import mmdit  # noqa: E402
from run import options  # noqa: E402
import samplers  # noqa: E402

GB = 1e9
PHASES = ("teacher", "student forward", "backward", "backward - grads", "optimizer")
# The grid: config -> (depths, (image patches per side, text tokens) pairs, checkpointing modes);
# image tokens = side^2. Small token counts keep the CPU time reasonable: the fit carries the rest.
SIZES = ((4, 8), (6, 12), (8, 16))  # 24, 48 and 80 tokens
GRID = {"sd3-medium": ((1, 2, 3, 4), SIZES, (False, True)), "sd3.5-large": ((1, 2), SIZES, (False, True))}
QUICK = {"sd3-medium": ((1, 2), SIZES[::2], (True,)), "sd3.5-large": ((1, 2), SIZES[::2], (True,))}
TARGETS = (("SD3-medium", "sd3-medium", 24), ("SD3.5-large", "sd3.5-large", 38))
TARGET_TOKENS = (4096, 333)  # 1024x1024: (1024 / 8 / 2)^2 image tokens; 77 CLIP + 256 T5 text tokens
GPU_GB = 80
# --fsdp: distill.py --fsdp's step over this many gloo ranks, at SD3.5-large's block structure narrowed to
# FSDP_WIDTH (a fully sharded step's terms are bytes per parameter: measured narrow, they carry to any width)
FSDP_RANKS = (1, 2, 4)
FSDP_WIDTH = 512
FSDP_POINTS = dict(config="sd3.5-large", width=FSDP_WIDTH, depths=(1, 2, 3), side=4, text=8, ckpt=True)


# -----------------------------------------------------------------------------
# One point, in its own process


def random_mmdit(cfg, dtype, seed, device="cpu"):
    """An MMDiT with random weights, built on the meta device and filled in place: no construction
    temporaries (the float64 sin-cos table of a new model would be one)."""
    with torch.device("meta"):
        model = mmdit.MMDiT(cfg)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.normal_(0, 0.02, generator=g)
    return model


def point_config(point, depth=None):
    """The MMDiTConfig of a point: its config at its depth, narrowed to point["width"] if given (head size 64)."""
    width = point.get("width")
    narrow = dict(hidden_size=width, num_heads=width // 64) if width else {}
    return dataclasses.replace(mmdit.CONFIGS[point["config"]], depth=depth or point["depth"], dual_attention_layers=(),
                               **narrow)


def param_counts(cfg):
    """(S, U): the MMDiT's parameters, and its largest joint block's + those outside the blocks (at depth 1 the
    only block is the last, whose text stream is pre-only)."""
    with torch.device("meta"):
        model = mmdit.MMDiT(cfg)
    S = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.joint_blocks]
    return S, max(blocks) + S - sum(blocks)


def local(t):
    """This rank's part of a tensor (a shard of a DTensor, the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def params_per_block(cfg):
    """Parameters of a joint block that is not the last (whose text stream is pre-only)."""
    with torch.device("meta"):
        block = mmdit.JointBlock(dataclasses.replace(cfg, depth=2), 0)
    return sum(p.numel() for p in block.parameters())


def trained_per_block(cfg, adapters):
    """Trainable parameters of a joint block that is not the last: all of them, or a LoRA student's."""
    if not adapters:
        return params_per_block(cfg)
    depth = lambda d: lora.count(dataclasses.replace(cfg, depth=d, dual_attention_layers=()), adapters)[0]  # noqa: E731
    return depth(3) - depth(2)


def nbytes(tensors):
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def walk(nodes):
    for n in nodes:
        yield n
        yield from walk(n.children)


def measure(point, threads, optimizer_kind):
    """Build the models, run one distillation step under the profiler, return its
    peak live bytes per phase and what the static parts weigh."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(threads)
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after imports
    cfg = point_config(point)
    ranks = point.get("ranks")  # distill.py --fsdp over this many ranks (this process is one, under torchrun)
    if ranks:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    side, text = point["side"], point["text"]
    adapters = point.get("lora")  # lora.settings, or None: the full student
    args = options.fill_defaults(options.build_parser().parse_args(
        ["--teacher", "random weights", "--teacher-sampler", "w2sd", "--bf16", "--teacher-dtype", "bf16",
         "--global-batch", "1", "--micro-batch", "1"] + (["--grad-checkpointing"] if point["ckpt"] else [])
        + (["--lora", str(adapters["rank"])] if adapters else [])))
    real_target = samplers.teacher_target

    def teacher_target(*a, **kw):  # the same call, inside a named range of the profile
        with record_function("phase:teacher"):
            return real_target(*a, **kw)

    samplers.teacher_target = teacher_target
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        # the networks as distill.py holds them: bf16 frozen strong (= teacher) and weak, fp32 student
        teacher = distill.frozen(random_mmdit(cfg, torch.bfloat16, 1))
        weak = distill.frozen(random_mmdit(cfg, torch.bfloat16, 2))
        # the full student: fp32 weights of its own; a LoRA student: adapters over the teacher's bf16 weights
        model = lora.attach(teacher, adapters) if adapters else random_mmdit(cfg, torch.float32, 1)
        model.gradient_checkpointing = args.grad_checkpointing
        student = distill.Student(model, embed.make_fusion(args.method, cfg)).train()
        if ranks:  # distill.py --fsdp: the student sharded in place, AdamW over the shards (--fsdp-teachers: both teachers)
            parallel.FullShard(student, None, torch.device("cpu"), (teacher, weak) if point.get("shard_teachers") else ())
        params = [p for p in student.parameters() if p.requires_grad]
        accumulated = [0]

        def on_gradient(p):  # marks, in the profile, the gradient bytes accumulated so far
            accumulated[0] += p.grad.numel() * p.grad.element_size()
            with record_function(f"grads:{accumulated[0]}"):
                pass

        for p in params if not ranks else ():  # FSDP writes the gradient shards itself: marked below instead
            p.register_post_accumulate_grad_hook(on_gradient)
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                      **{"foreach": dict(foreach=True), "fused": dict(fused=True),
                                         "for-loop": dict(foreach=False)}[optimizer_kind])
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(1, cfg.in_channels, 2 * side, 2 * side, generator=g),  # (B, C, H, W)
                 "context": torch.randn(1, text, cfg.context_dim, generator=g),  # (B, L, Dc)
                 "y": torch.randn(1, cfg.pooled_dim, generator=g),  # (B, Dy)
                 "t": torch.tensor([0.6]), "w": torch.tensor([5.0]),
                 "eps": torch.randn(1, cfg.in_channels, 2 * side, 2 * side, generator=g)}
        null = (torch.randn(1, text, cfg.context_dim, generator=g), torch.randn(1, cfg.pooled_dim, generator=g))
        # AdamW's moments as after a first step (zero gradients leave the weights as they are)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the measured step
        with record_function("phase:forward"):
            loss, _ = distill.distill_loss(student, teacher, batch, null, args, weak, None)
        with record_function("phase:backward"):
            loss.backward()
        grads = nbytes(p.grad for p in params)
        with record_function("phase:optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    samplers.teacher_target = real_target
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # the allocator's running total after each allocation / free, in time order, and the ranges
    allocs, ranges, marks = [], {}, []
    for node in walk(prof.profiler.kineto_results.experimental_event_tree()):
        kind, fields = node.typed
        if kind == _EventType.Allocation and fields.device.type == "cpu":
            allocs.append((node.start_time_ns, fields.total_allocated))
        elif node.name.startswith("phase:"):
            ranges[node.name] = (node.start_time_ns, node.end_time_ns)
        elif node.name.startswith("grads:"):
            marks.append((node.start_time_ns, int(node.name[6:])))
        elif ranks and node.name.startswith("FSDP::post_backward_reduce"):  # a unit's gradient shards now exist
            marks.append((node.end_time_ns, node.name.partition(" (")[2].rstrip(")")))
    allocs.sort()
    marks.sort()
    if ranks:  # each unit's gradient bytes (its own parameters, not those of units inside it), summed in time order
        unit_grads = fsdp_unit_gradients(student)
        total, cumulative = 0, []
        for ts, fqn in marks:
            total += unit_grads[fqn]
            cumulative.append((ts, total))
        marks = cumulative

    def peak(start, end):  # the live bytes on entering the window, and after each event inside it
        before = [total for ts, total in allocs if ts < start]
        inside = [total for ts, total in allocs if start <= ts <= end]
        return max(before[-1:] + inside)

    def peak_without_gradients(start, end):  # live bytes less the gradients accumulated so far
        best, k, grads = peak(start, start), 0, 0
        for ts, total in allocs:
            while k < len(marks) and marks[k][0] <= ts:
                grads = marks[k][1]
                k += 1
            if start <= ts <= end:
                best = max(best, total - grads)
        return best

    teacher_r, forward_r = ranges["phase:teacher"], ranges["phase:forward"]
    windows = {"teacher": teacher_r, "student forward": (teacher_r[1], forward_r[1]),
               "backward": ranges["phase:backward"], "optimizer": ranges["phase:optimizer"]}
    peaks = {name: peak(*w) for name, w in windows.items()}
    peaks["backward - grads"] = peak_without_gradients(*ranges["phase:backward"])
    rank = 0
    if ranks:
        rank = dist.get_rank()
        dist.destroy_process_group()
    return {
        **point, "tokens": side * side + text, "image_tokens": side * side, "optimizer": optimizer_kind,
        "peaks": peaks, "rank": rank,
        "student_weights": nbytes(params) if adapters else nbytes(model.parameters()) + nbytes(model.buffers()),
        "teacher_weights": nbytes(teacher.parameters()) + nbytes(teacher.buffers()),
        "weak_weights": nbytes(weak.parameters()) + nbytes(weak.buffers()),
        "gradients": grads,
        "adam_moments": nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
        "params_per_block": params_per_block(cfg),
        "rss_delta": rss_peak - rss_base,
    }


def fsdp_unit_gradients(student):
    """{unit's name as FSDP's profile labels name it ("" for the root): the bytes of this rank's gradient
    shards of the parameters that unit holds (not those of the units inside it)}."""
    from torch.distributed.fsdp import FSDPModule

    units = {name: m for name, m in student.named_modules() if isinstance(m, FSDPModule)}
    owner = {}
    for name in sorted(units, key=len):  # outer units first: inner ones take their parameters over
        for p in units[name].parameters():
            owner[id(p)] = name
    out = dict.fromkeys(units, 0)
    for p in student.parameters():
        if p.requires_grad:  # a gradient shard is its parameter's shard (fp32); read after zero_grad freed them
            out[owner[id(p)]] += nbytes([p])
    return out


# -----------------------------------------------------------------------------
# The grid, the fit and the extrapolation


def run_point(point, threads, optimizer_kind):
    """One point in a fresh process; an FSDP point (point["ranks"]) under torchrun, one process per rank on
    one thread each, its peaks those of the busiest rank (the GPU that must hold them)."""
    script = [os.path.abspath(__file__), "--point", json.dumps(point), "--optimizer", optimizer_kind]
    if point.get("ranks"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={point['ranks']}",
               *script, "--threads", "1"]
    else:
        cmd = [sys.executable, *script, "--threads", str(threads)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"point {point} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]  # a JSON line per rank
    result = min(lines, key=lambda r: r["rank"])
    result["rank_peaks"] = [r["peaks"] for r in sorted(lines, key=lambda r: r["rank"])]
    result["peaks"] = {p: max(r["peaks"][p] for r in lines) for p in PHASES}
    result["seconds"] = time.time() - t0
    return result


def lstsq(rows, ys):
    X = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    return coef.tolist(), (y - X @ coef).tolist()


def features(depth, tokens):
    return [1.0, depth, depth * tokens, tokens]


def fit(points, phase):
    return lstsq([features(p["depth"], p["tokens"]) for p in points], [p["peaks"][phase] for p in points])


def model_bytes(config, depth, optimizer_kind, adapters=None):
    """Exact bytes of the parameter terms at a depth: P parameters, B buffer elements (pos_embed);
    with adapters (lora.settings), the student trains and holds Q = its trainable parameters only."""
    cfg = dataclasses.replace(mmdit.CONFIGS[config], depth=depth, dual_attention_layers=())
    with torch.device("meta"):
        model = mmdit.MMDiT(cfg)
    P = sum(p.numel() for p in model.parameters())
    B = sum(b.numel() for b in model.buffers())
    Q = lora.count(cfg, adapters)[0] if adapters else P
    # W student fp32 weights (+ buffers; a LoRA student's frozen weights are the teacher's), T the two bf16
    # teachers, M AdamW's two fp32 moments, G fp32 gradients, F foreach AdamW's fp32 temporary list
    F = 4 * Q if optimizer_kind == "foreach" else 0
    W = 4 * Q if adapters else 4 * (P + B)
    return {"W": W, "T": 2 * 2 * (P + B), "M": 8 * Q, "G": 4 * Q, "F": F, "P": P, "Q": Q}


# which parameter terms are live in each phase of a one-process step (the rest of a phase's peak:
# activations, autocast's bf16 weight copies, temporaries); under DDP G is live in all of them
PRESENT = {"teacher": "WTM", "student forward": "WTM", "backward": "WTMG", "backward - grads": "WTM",
           "optimizer": "WTMGF"}
# what each way of training on N GPUs divides by N, on paper: DDP nothing, ZeRO-1 the optimizer state (and
# its temporaries), ZeRO-2 also the gradients (distill.py implements DDP; its FSDP is measured: fsdp_fit)
SHARDED = {"DDP": "", "ZeRO-1": "MF", "ZeRO-2": "MFG"}
# FSDP - one process, per phase: the fitted coefficients' features (fsdp_fit)
FSDP_TERMS = ("s", "k", "g")


def report(results):
    print("\nMeasured peaks of one step, GB of live tensors (RSS: the process's peak RSS over its baseline after "
          "imports, a cross-check)")
    print(f"{'config':12s} {'width':>5s} {'ranks':>5s} {'ckpt':>4s} {'depth':>5s} {'tokens':>6s} "
          + " ".join(f"{p:>16s}" for p in PHASES) + f" {'RSS':>7s} {'s':>5s}")
    for r in results:
        print(f"{r['config']:12s} {point_config(r).hidden_size:5d} {r.get('ranks') or '-':>5} "
              f"{'yes' if r['ckpt'] else 'no':>4s} {r['depth']:5d} {r['tokens']:6d} "
              + " ".join(f"{r['peaks'][p] / GB:16.3f}" for p in PHASES) + f" {r['rss_delta'] / GB:7.3f} "
              f"{r['seconds']:5.0f}")
    fits = {"optimizer": results[0]["optimizer"], "lora": results[0].get("lora"), "fsdp": fsdp_fit(results),
            "fsdp-teachers": fsdp_fit(results, shard_teachers=True)}
    results = [r for r in results if not r.get("ranks") and not r.get("width")]  # the published widths, one process
    for config in dict.fromkeys(r["config"] for r in results):
        for ckpt in (False, True):
            pts = [r for r in results if r["config"] == config and r["ckpt"] == ckpt]
            if len({(p["depth"], p["tokens"]) for p in pts}) < 4 or len({p["depth"] for p in pts}) < 2:
                continue
            print(f"\nFit {config}, gradient checkpointing {'on' if ckpt else 'off'}, {len(pts)} points: peak = "
                  f"a + b depth + c depth tokens + d tokens  (a, b in GB; c, d in MB per token)")
            for phase in PHASES:
                coef, res = fit(pts, phase)
                fits[config, ckpt, phase] = coef
                a, b, c, d = coef
                print(f"  {phase:16s} a {a / GB:7.3f}  b {b / GB:7.3f}  c {c / 1e6:7.4f}  d {d / 1e6:8.4f}   "
                      f"residuals MB: " + " ".join(f"{e / 1e6:+.2f}" for e in res))
            per_block = params_per_block(mmdit.CONFIGS[config])
            foreach = pts[0]["optimizer"] == "foreach"
            per_param = 20 if foreach else 16
            adapters = pts[0].get("lora")
            trained = trained_per_block(mmdit.CONFIGS[config], adapters)
            print(f"  check: b of the optimizer phase {fits[config, ckpt, 'optimizer'][1] / GB:.3f} GB; "
                  f"{per_block / 1e6:.1f} M parameters per block x 4 bytes (two bf16 teachers) + {trained / 1e6:.2f} M "
                  f"trained per block x {per_param} bytes (fp32 weight 4, gradient 4, AdamW moments 8"
                  f"{', foreach temporary 4' if foreach else ''}) = {(4 * per_block + per_param * trained) / GB:.3f} GB")
    return fits


def fsdp_fit(results, shard_teachers=False):
    """The FSDP terms, per phase (module docstring): FSDP's busiest rank less the one-process peak at the same
    sizes, least squares on [-S (1 - 1/N), -S, U]; returns {phase: (s, k, g)} (bytes per parameter), or None
    when no FSDP point was measured. shard_teachers: the points of --fsdp-teachers (the teachers sharded too)."""
    pairs = []
    for r in results:
        if r.get("ranks") and bool(r.get("shard_teachers")) == shard_teachers:
            key = {k: r[k] for k in ("config", "width", "depth", "side", "text", "ckpt")}
            twin = [q for q in results if not q.get("ranks") and all(q.get(k) == v for k, v in key.items())]
            if twin:
                pairs.append((r, twin[0]))
    if len({(r["ranks"], r["depth"]) for r, _ in pairs}) < 4:
        return None
    rows = []
    for r, _ in pairs:
        S, U = param_counts(point_config(r))
        rows.append([-S * (1 - 1 / r["ranks"]), -S, U])
    print(f"\nFSDP (distill.py --fsdp{' --fsdp-teachers' if shard_teachers else ''}), {len(pairs)} points: the busiest rank's peak less one process's at the same "
          "sizes, GB, and the fit FSDP - one = -s S (1 - 1/N) - k S + g U (bytes per parameter; S: the student's "
          "parameters, U: the largest block's + those outside the blocks)")
    print(f"{'width':>5s} {'ranks':>5s} {'depth':>5s} " + " ".join(f"{p:>16s}" for p in PHASES))
    for r, one in pairs:
        print(f"{point_config(r).hidden_size:5d} {r['ranks']:5d} {r['depth']:5d} "
              + " ".join(f"{(r['peaks'][p] - one['peaks'][p]) / GB:+16.4f}" for p in PHASES))
    out = {}
    expected = {p: e + 4 * shard_teachers for p, e in
                {"teacher": 12, "student forward": 12, "backward": 16, "backward - grads": 12, "optimizer": 20}.items()}
    for phase in PHASES:
        coef, res = lstsq(rows, [r["peaks"][phase] - one["peaks"][phase] for r, one in pairs])
        out[phase] = coef
        s, k, g = coef
        print(f"  {phase:16s} s {s:6.2f}  k {k:6.2f}  g {g:6.2f}   (s expected {expected[phase]} with the teachers "
              f"{'sharded' if shard_teachers else 'whole'})   residuals MB: " + " ".join(f"{e / 1e6:+.2f}" for e in res))
    return out


def fsdp_per_gpu(fits, config, depth, tokens, gpus, key="fsdp"):
    """The step's peak per GPU under distill.py --fsdp on `gpus` GPUs (checkpointing on, batch 1): each phase's
    one-process peak less the FSDP terms (fsdp_fit) at the target's parameter counts; the largest, or the
    backward's start with the first unit's gradient shards."""
    S, U = param_counts(dataclasses.replace(mmdit.CONFIGS[config], depth=depth, dual_attention_layers=()))
    phase, _ = one_process_peak(fits, config, depth, tokens, True)
    at = {}
    for p, value in phase.items():
        s, k, g = fits[key][p]
        at[p] = value - s * S * (1 - 1 / gpus) - k * S + g * U
    return max(max(at.values()), at["backward - grads"] + 4 * params_per_block(mmdit.CONFIGS[config]) / gpus)


def one_process_peak(fits, config, depth, tokens, ckpt):
    """({phase: fitted peak}, the step's peak) of one process at a depth and token count (batch 1): the
    largest phase, or the backward's start (its peak less gradients) with one block's gradients."""
    terms = model_bytes(config, depth, fits["optimizer"], fits["lora"])
    phase = {p: sum(c * f for c, f in zip(fits[config, ckpt, p], features(depth, tokens))) for p in PHASES}
    return phase, max(max(phase.values()), phase["backward - grads"] + terms["G"] / depth)


def extrapolate(fits, gpus):
    L = sum(TARGET_TOKENS)
    fsdp = fits.get("fsdp") or fits.get("fsdp-teachers")
    print(f"\nExtrapolation to 1024x1024 ({TARGET_TOKENS[0]} image + {TARGET_TOKENS[1]} text tokens), batch 1 per "
          "GPU, bf16 autocast, bf16 W2SD teacher pair, GB of live tensors per phase; one process, then per GPU with "
          f"{gpus} GPUs: DDP, ZeRO-1 and ZeRO-2 on paper (their sharded terms / {gpus}), and FSDP as distill.py "
          "--fsdp runs it, its terms measured (fsdp_fit; checkpointing on; FSDP: the teachers whole on every GPU, "
          "FSDP+T: sharded too, --fsdp-teachers)"
          + ("" if fsdp else ": not measured in this run (--fsdp)"))
    strategies = " ".join(f"{s:>7s}" for s in (*SHARDED, "FSDP", "FSDP+T"))
    print(f"{'model':12s} {'ckpt':>4s} " + " ".join(f"{p:>16s}" for p in PHASES) + f" {'1 proc':>7s} {strategies}")
    for name, config, depth in TARGETS:
        terms = model_bytes(config, depth, fits["optimizer"], fits["lora"])
        for ckpt in (False, True):
            if (config, ckpt, "optimizer") not in fits:
                continue
            phase, single = one_process_peak(fits, config, depth, L, ckpt)
            per_gpu = {}
            for strategy, sharded in SHARDED.items():
                worst = 0
                for p, value in phase.items():
                    present = PRESENT[p] + ("" if "G" in PRESENT[p] else "G")  # DDP: gradients always live
                    value += 0 if "G" in PRESENT[p] else terms["G"]
                    value -= sum(terms[k] * (1 - 1 / gpus) for k in present if k in sharded)
                    worst = max(worst, value)
                per_gpu[strategy] = worst
            for key in ("fsdp", "fsdp-teachers"):  # measured with checkpointing; LoRA + FSDP is refused
                per_gpu[key] = fits[name, key] = fsdp_per_gpu(fits, config, depth, L, gpus, key) \
                    if fits.get(key) and ckpt and not fits["lora"] else None
            print(f"{name:12s} {'yes' if ckpt else 'no':>4s} " + " ".join(f"{phase[p] / GB:16.1f}" for p in PHASES)
                  + f" {single / GB:7.1f} " + " ".join(f"{v / GB:7.1f}" if v is not None else f"{'-':>7s}"
                                                       for v in per_gpu.values()))
        trained = f"{terms['Q'] / 1e6:.1f} M trained (LoRA), their" if fits["lora"] else "student"
        print(f"  {name}: {terms['P'] / 1e9:.2f} B parameters, {trained} weights (fp32) {terms['W'] / GB:.2f} GB, "
              f"two bf16 teachers {terms['T'] / GB:.1f}, AdamW moments {terms['M'] / GB:.2f}, gradients "
              f"{terms['G'] / GB:.2f}, foreach temporary {terms['F'] / GB:.2f}")
    for name, config, depth in TARGETS:
        for key, flags in (("fsdp", "--fsdp"), ("fsdp-teachers", "--fsdp --fsdp-teachers")):
            if fits.get((name, key)) is not None:
                prefetch = 4 * params_per_block(mmdit.CONFIGS[config])
                print(f"  {name}, {flags} on {gpus} GPUs: {fits[name, key] / GB:.1f} GB per GPU (fitted and "
                      f"extrapolated); on a GPU the next block's all-gather overlaps the current block, whose fp32 "
                      f"weights are then live too: up to {prefetch / GB:.2f} GB more (not measured: on the CPU the "
                      "collectives run in order)")
    print(f"A GPU holds {GPU_GB} GB; it also needs what is not measured here (module docstring): the CUDA context, "
          "workspaces, the allocator's fragmentation, NCCL buffers (leave 5-10 GB).")
    return fits


def main(args):
    if args.point:
        # one write of one line (< PIPE_BUF): the ranks of an FSDP point share a pipe, and lines must not interleave
        sys.stdout.write(json.dumps(measure(json.loads(args.point), args.threads, args.optimizer)) + "\n")
        sys.stdout.flush()
        return
    cli.at_least(args.threads, 1, "--threads")
    cli.at_least(args.gpus, 1, "--gpus", why="GPUs to share the sharded terms over")
    if (args.fsdp or args.fsdp_only) and args.lora is not None:
        raise cli.InputError("--fsdp measures the full student: distill.py refuses --fsdp with --lora")
    if args.json is not None:  # checked now, not after the grid's minutes of measuring
        cli.output_file(args.json, "--json", suffixes=(".json",), inputs=[("--load", p) for p in args.load or ()])
    if args.load:  # analyse points measured before (several files: their points together)
        results = []
        for path in args.load:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--load {path}: no such file (a --json file of measured points)")
            points = cli.read_json(path, f"--load {path}")
            with cli.reading(path, f"--load {path}"):
                if not isinstance(points, list) or not points or not all(isinstance(r, dict) for r in points):
                    raise cli.InputError(f"--load {path}: not a list of measured points (as --json writes)")
            results += points
        with cli.reading(args.load[0], "--load " + " ".join(args.load)):
            extrapolate(report(results), args.gpus)
        return
    grid = QUICK if args.quick else GRID
    adapters = None
    if args.lora is not None:  # a LoRA student: its rank checked against each model it is measured on
        adapters = lora.settings(args.lora, args.lora_alpha, args.lora_targets, args.lora_full)
        for config in args.config or grid:
            lora.check_rank(adapters, mmdit.CONFIGS[config], "--lora")
    if args.json is not None:  # everything checked: its folder is made now, the file written at the end
        cli.output_folder(os.path.dirname(os.path.abspath(args.json)), "the folder of --json")
    points = [dict(config=config, depth=depth, side=side, text=text, ckpt=ckpt, lora=adapters)
              for config, (depths, sizes, modes) in grid.items() if config in (args.config or grid) for ckpt in modes
              for depth in depths for side, text in sizes] if not args.fsdp_only else []
    if args.fsdp or args.fsdp_only:  # distill.py --fsdp over 1, 2, 4 ranks, each beside one process at the same sizes (fsdp_fit)
        f = FSDP_POINTS
        twins = [dict(config=f["config"], width=f["width"], depth=d, side=f["side"], text=f["text"], ckpt=f["ckpt"],
                      lora=None) for d in f["depths"]]
        points = twins + [dict(t, ranks=n, shard_teachers=sharded) for sharded in (False, True) for n in FSDP_RANKS
                          for t in twins] + points
    start = time.time()
    student = f"LoRA student {adapters}" if adapters else "full student"
    print(f"bench_memory: {student}; {len(points)} points, each in a fresh process; AdamW {args.optimizer}; torch "
          f"{torch.__version__}, CPU {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    results = []
    for i, point in enumerate(points):
        results.append(run_point(point, args.threads, args.optimizer))
        r = results[-1]
        print(f"  [{i + 1}/{len(points)}] {point}: peak {max(r['peaks'].values()) / GB:.3f} GB ({r['seconds']:.0f} s)",
              flush=True)
    if args.json:  # before the analysis: `--load` re-reads the points
        checkpoint.atomic_json(results, args.json)
    fits = report(results)
    extrapolate(fits, args.gpus)
    print(f"\n{len(points)} points in {(time.time() - start) / 60:.1f} minutes")
    if args.json:  # atomically: a kill leaves no half-written file
        checkpoint.atomic_json(results, args.json)


if __name__ == "__main__":
    parser = cli.parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few points only (checks the machinery)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs to share the sharded terms over, in the table")
    parser.add_argument("--optimizer", default="foreach", choices=("foreach", "fused", "for-loop"),
                        help="AdamW's implementation: foreach (its default on CUDA, distill.py's), fused, or the "
                             "per-tensor loop (its default on a CPU)")
    parser.add_argument("--json", default=None, help="also write every measured point to this file")
    parser.add_argument("--config", action="append", choices=sorted(GRID), help="measure this model only (repeatable)")
    parser.add_argument("--lora", type=int, default=None, metavar="RANK", help="a LoRA student (distill.py --lora)")
    parser.add_argument("--fsdp", action="store_true", help="also measure distill.py --fsdp under torchrun with "
                        f"{', '.join(map(str, FSDP_RANKS))} gloo ranks at width {FSDP_WIDTH}, and extrapolate its terms")
    lora.add_arguments(parser)
    parser.add_argument("--fsdp-only", action="store_true", help="measure the --fsdp points alone (analyse them with "
                        "published-width points: --load A.json --load B.json)")
    parser.add_argument("--load", action="append", default=None, help="analyse the points of --json file(s) instead "
                        "of measuring (repeatable: the points of every file together)")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: measure one point
    cli.run(main, parser)
