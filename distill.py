"""
Algorithm 1 of TeEFusion as a training loop: distill classifier-free guidance (and the
reflection samplers Z-Sampling / W2SD built on it) into a student that needs ONE network
pass per sampling step. One process, or many under torchrun (DDP); CPU or CUDA.

Algorithm 1 (paper; SPEC.md section 5), one iteration:
    student initialised from the teacher
    (x0, c) from the data;  t ~ U[0, 1];  w ~ U[w_min, w_max];  eps ~ N(0, I)
    x_t = (1 - t) x0 + t eps
    target = (1 + w) v_T(x_t, t, c) - w v_T(x_t, t, null)   (Eq. 2; refined by Eq. 3-4 for
                                                            Z-Sampling and W2SD teachers)
    z = G(psi(t)) + F(y) + G(psi(w)) * F(y - y_null) / 256  (Eq. 7, embed.py)
    loss = || v_S(x_t, t, c, z) - target ||^2, AdamW step

The same loop trains the paper's Table 3 ablations and the DICE baseline (--method):
teefusion (Eq. 7, no new parameters), gonly (c + G(psi(w))), distillcfg (a new guidance MLP,
trained with the model) and dice (a text-embedding enhancer; the MMDiT stays frozen).

Run (no --teacher: the CPU toy world of toy.py, its cached teacher and its data; then evaluation/toy_report.py
prints the toy Table 4 with 95% confidence intervals and draws the figures into --out):
    python distill.py                   # W2SD + CFG teacher, 1500 steps, batch 32, lr 1e-3 -> runs/toy
    python distill.py --method gonly --out runs/gonly   # a Table 3 ablation (also distillcfg, dice)
    python distill.py --teacher-sampler zsampling --out runs/toy-z   # a Z-Sampling + CFG teacher
    python distill.py --teacher-sampler cfg --out runs/toy-cfg       # an Euler + CFG teacher
    python distill.py --full --out runs/full   # every student of Tables 3 and 4 (options.FULL), one report
  --full distills, one after another, a TeEFusion student from each teacher (cfg, zsampling, w2sd)
  and, from the W2SD + CFG teacher, the ablations gonly and distillcfg and the DICE baseline, each
  into its own --out/NAME with the same budget (--steps etc. apply to all), then one report (Table 4
  with every student, Table 3, Fig. 5a, 5b) into --out. With --resume, finished students are reused.
  It refuses --teacher (real SD3), --method and --teacher-sampler. Runtimes and results: README.

A LoRA student (--lora RANK; sd3/lora.py has the details and the merge command): the same Algorithm 1,
checkpoints, resume and DDP, with adapters on a frozen network that shares the start network's tensors;
it writes DIR/lora.safetensors (diffusers' SD3 LoRA format), and in the toy world the merged student too.
    python distill.py --lora 4 --out runs/toy-lora

Real scale (SD3-medium, shards from prepare.py, 8 GPUs per node, the paper's settings: a W2SD + CFG
teacher, here with the W2SD release's pair built from a fine-tune of SD3-medium):
    torchrun --nproc_per_node=8 distill.py --teacher sd3_medium.safetensors \\
        --w2sd-finetuned sd3_medium_finetune.safetensors --data shards/ \\
        --out runs/teefusion --bf16 --grad-checkpointing --global-batch 128 --micro-batch 1 \\
        --lr 5e-6 --steps 10000 --ckpt-every 500 --resume --export-diffusers
    (any pair: --strong S --weak W; an Euler + CFG teacher: --teacher-sampler cfg)
    (add --nnodes N --node_rank R --rdzv_endpoint HOST:PORT for several nodes. --resume starts
    from the teacher when --out has no checkpoint yet, so the same line launches and relaunches;
    it also works after a change of the number of GPUs: run/batches.py.)
    (--fsdp: the student, its gradients, AdamW state and EMA sharded across the GPUs instead of DDP's
    whole copy per GPU, same files: run/parallel.py; --fsdp-teachers the teachers too; SD3.5-large on 80 GB
    GPUs needs both: docs/MULTI_GPU.md)

Choices Algorithm 1 leaves open, and what this file does (its flags and defaults: run/options.py):
  * The teacher step. The target is the velocity of ONE teacher step from t (samplers.teacher_target),
    and that step is the one the student's sampler takes from t: N = --teacher-steps (50 for SD3, the
    released student's count; 20 in the toy world, its report's) on SD3's shifted schedule, t_next from
    samplers.schedule_step (at 50 steps the step is ~0.007 near t = 1 and ~0.05 at low t), and no
    reflection where the sampler takes a plain step (its last one, t <= t_{N-1}). For --teacher-sampler
    cfg the step length does not matter (the target is the Eq. 2 velocity at t).
  * The reflection: the Z-Sampling authors' flow-matching settings (--preset flow: w_inv = -0.5, the
    inversion labelled t - 1/N), or their SDXL ones (--preset sdxl). W2SD: the strong model denoises
    at w, the weak one inverts at w = 0, and (Eq. 4) the strong model moves after the reflection
    (--w2sd-final main: a third model moves, as the W2SD authors' SDXL LoRA release does).
  * Which checkpoint the student starts from ("student initialised from the teacher"): the network
    whose velocity ends the teacher step, so that the untrained student already takes the teacher
    step minus its guidance and reflection corrections. cfg and zsampling: --teacher. w2sd: the
    strong model (--strong, default --teacher; Eq. 4), or with --w2sd-final main the main model
    (--teacher). --w2sd-finetuned F builds the W2SD release's pair from a fine-tune of --teacher:
    strong = teacher + 1.5 (F - teacher), weak = teacher - 1.5 (F - teacher), main = teacher +
    0.8 (F - teacher) (--strong-scale, --weak-scale, --main-scale), read tensor by tensor
    (mmdit.load_mmdit_blend), so two SD3-medium files never need four copies in memory.
  * Cost of the target per training sample, in teacher forwards: cfg 2, zsampling 6, w2sd 6 (3 models
    held in memory for w2sd with a main model, 2 otherwise), plus the student's forward and backward
    (about 3 forwards' worth): a W2SD + CFG step costs about 9 / 5 = 1.8x a cfg step.
  * t sampling: uniform on (0, 1] as in Algorithm 1, or SD3's logit-normal (sigmoid of N(0,1)).
  * the 1/256 of Eq. 7 as released (embed.teefusion_conditioning); psi(1000 w) formed in float32.
  * Baselines as their papers train them: DICE (--method dice) trains its token enhancer alone, the
    MMDiT frozen, from PyTorch's default initialisation, at ONE guidance (w = 4, diffusers' scale 5)
    with lr 2e-4; DistillCFG's guidance MLP starts from the default initialisation (as FLUX's and
    the released guidance_in); G only adds G(psi(w)) / 256, Eq. 7's scale without its text factor.
  * A student distilled from a reflection teacher at w follows a stronger guidance than CFG at w (to
    first order, Z-Sampling at w is CFG at 2w - w_inv: samplers.first_order_cfg_w).

Data and randomness: run/batches.py. The step number is the whole random state: one process and N
processes compute the same step, and a resume (also on another number of GPUs) continues the
exact same stream.

Files (--out DIR; safetensors and JSON only, never pickle; every file written atomically):
    DIR/checkpoints/step-NNNNNNN/...  and DIR/checkpoints/latest: see run/training_state.py
    DIR/lora.safetensors (lora-ema.safetensors with --ema) for --lora, with the merged students in the toy world
    DIR/student.safetensors (+ fusion.safetensors; with --ema student-ema.safetensors and
    fusion-ema.safetensors) at the end, their metadata naming the method and the teacher sampler;
    main() returns the student's path (the EMA one with --ema); DIR/README.md, the model card (sd3/export.py);
    DIR/diffusers/ with --export-diffusers: transformer/ (config has txt_align_guidance: true, the flag the
    authors' released pipeline reads), and when --teacher is a diffusers pipeline folder its text encoders,
    tokenizers, VAE and scheduler (hard-linked) and model_index.json, a folder the released pipeline
    loads, with its own card (sd3/export.py); DIR/log.jsonl: one line per step: step, loss, lr,
    samples_per_s, teacher_s, student_s, step_s, grad_norm (before clipping), and sample_s where a grid
    was drawn; DIR/samples/step-NNNNNNN.png (sample grids: teacher | student at three w, run/monitor.py)
    and DIR/tensorboard with --report-to tensorboard; DIR/final.json: the final files with their sizes and
    SHA-256, for the checkpoint they come from (run/final_files.py); DIR/run.lock while a run holds DIR
    (cli.FolderLock).

Faults (the details: run/training_state.py, run/cli.py, run/options.py):
  * Bad input is refused before anything heavy loads: one line `error: ...`, exit status 2; a failure
    during the work (a non-finite loss or weight) exits 1, naming the step and the newest checkpoint
    whose tensors, read back from disk, are all finite. --traceback (or TEEFUSION_TRACEBACK=1) shows more.
  * One run per --out (DIR/run.lock). --resume continues from `latest`, or from the newest COMPLETE
    checkpoint with a warning; with none left it refuses. Only finite weights are ever written.
  * The final files are a pure function of the checkpoint at --steps: a relaunch writes those a kill left
    missing, and a relaunch of a finished run says so and writes nothing, exit 0 (run/final_files.py).
  * Under torchrun a worker dies with its launcher: `kill -9` of torchrun leaves no worker training.

Memory per GPU, measured for one distillation step (benchmarks/bench_memory.py): README.

Shape legend: B batch, C latent channels, H W latent size, L tokens, Dc context width,
Dy pooled width, D model width.
"""

import copy
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's pooled-text embedder
from torch.utils.data import DataLoader
from tqdm import tqdm

from run import cli
import embed
from sd3 import export
from run import final_files
from sd3 import lora
from run import monitor
from run import options
from run import parallel
import samplers
from run.batches import StepSampler, WithNoise
from mmdit import load_mmdit, load_mmdit_blend
from run.options import FULL, build_parser, check_args, fill_defaults, lora_spec
from run.training_state import (LATEST, _trim_log, check_resume, complete_checkpoints, last_good, load_checkpoint,
                            non_finite, remove_temporaries, replica_checksums, resume_point,
                            save_checkpoint)


# -----------------------------------------------------------------------------
# The student: an MMDiT and the module that builds its inputs (embed.FUSIONS)


class Student(nn.Module):
    """v_S(x_t, t, c, w): the fusion builds (context, y, z), the MMDiT runs once with vec=z.
    One module, so that DDP sees every trainable parameter inside one forward."""

    def __init__(self, model, fusion):
        super().__init__()
        self.model, self.fusion = model, fusion

    def forward(self, x_t, t, context, y, context_null, y_null, w):
        # Eq. 7 (teefusion), or the Table 3 ablation / DICE input
        context_s, y_s, z = self.fusion(self.model, t, context, y, context_null, y_null, w)  # z (B, D)
        return self.model(x_t, t, context_s, y_s, vec=z)  # (B, C, H, W)


def frozen(model):
    """A network that is only evaluated: no gradients, eval mode (the MMDiT has no dropout or
    batch norm, so eval() changes nothing today; it documents intent and guards the future)."""
    return model.requires_grad_(False).eval()


def teacher_step(t, args):
    """The teacher's step from t (B,): (t_next, reflects), see the file docstring."""
    if args.teacher_step == "uniform":
        return (t - 1.0 / args.teacher_steps).clamp(min=0), torch.ones_like(t, dtype=torch.bool)
    return samplers.schedule_step(t, args.teacher_steps, args.shift)


def distill_loss(student, teacher, batch, null, args, weak=None, main=None, timing=None):
    """One micro-batch of Algorithm 1. batch: tensors on the device; null: (context_null, y_null).
    teacher: the frozen teacher (for w2sd: the strong model), weak / main: W2SD's other models.
    Returns the MSE loss (fp32 scalar). timing: a dict to which teacher/student seconds are added."""
    context, y = batch["context"], batch["y"]  # (B, L, Dc), (B, Dy)
    t, w = batch["t"], batch["w"]  # (B,), (B,)
    context_null, y_null = null  # (1, L, Dc), (1, Dy)
    device = t.device
    amp = _autocast(device, student_bf16(args))
    # a bf16 teacher always runs under autocast (its inputs stay fp32, its matmuls run in bf16)
    teacher_amp = _autocast(device, args.bf16 or args.teacher_dtype == "bf16")
    tick = _clock(device)
    x_t = noised(batch)  # (B, C, H, W)
    # the step the sampler takes from t, on its shifted schedule (see the file docstring)
    t_next, reflect = teacher_step(t, args)  # (B,), (B,)
    # Algorithm 1: target = (1 + w) v_T(x_t, t, c) - w v_T(x_t, t, null) (Eq. 2), refined by Eq. 3-4
    with torch.no_grad(), teacher_amp:
        target = samplers.teacher_target(args.teacher_sampler, teacher, x_t, t, t_next, (context, y), null, w,
                                         reflect=reflect, steps=args.teacher_steps, preset=args.preset,
                                         w_inv=args.w_inv, tau=args.tau, weak=weak, main=main,
                                         w_strong=args.w_strong, w_weak=args.w_weak,
                                         target=args.target).float()  # (B, C, H, W)
    tock = _clock(device)
    # Algorithm 1: z from Eq. 7, one student forward
    with amp:
        v_S = student(x_t, t, context, y, context_null, y_null, w)  # (B, C, H, W)
    # Algorithm 1: loss = || v_S(x_t, z) - target ||^2 (mean over all elements)
    loss = F_.mse_loss(v_S.float(), target)
    if timing is not None:
        timing["teacher_s"] += tock - tick
        timing["_student_start"] = tock
    return loss


def noised(batch):
    """Algorithm 1: x_t = (1 - t) x0 + t eps."""
    t_ = batch["t"].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return (1 - t_) * batch["latents"] + t_ * batch["eps"]  # (B, C, H, W)


def student_bf16(args):
    """The student runs under bf16 autocast: --bf16, or a LoRA student over bf16 weights (the teacher's)."""
    return args.bf16 or (getattr(args, "lora", None) is not None and args.teacher_dtype == "bf16")


def _autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# -----------------------------------------------------------------------------
# The loop


class NonFinite(FloatingPointError):
    """A non-finite loss, weight or output: the run stops (exit status 1)."""


def weights_problem(student, ema, batch, null, args, distributed):
    """Before a checkpoint: what is wrong with the weights, the same on every rank, or None. Every
    parameter and buffer of the student (MMDiT and fusion module) and of the EMA must be finite, and
    so must a forward of each on the step's last micro-batch (weights of 1e30 are finite, and give
    inf and NaN)."""
    problem = non_finite([("student", student), ("EMA", ema)])
    problem = problem and f"the weights hold non-finite values ({problem})"
    if not problem:
        x_t = noised(batch)  # (B, C, H, W)
        with torch.no_grad(), _autocast(x_t.device, student_bf16(args)):
            for label, module in (("student", student), ("EMA", ema)):
                if module is not None and not torch.isfinite(module(x_t, batch["t"], batch["context"], batch["y"],
                                                                    *null, batch["w"])).all():
                    problem = f"the {label}'s weights give a non-finite output (a forward on the step's last batch)"
                    break
    if distributed:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, problem)
        problem = next((p for p in every if p), None)
    return problem


def _setup_distributed(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device is not None:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return distributed, rank, world_size, device


def _resolve_world(args, dataset, rank, distributed):
    """The networks and the data: the user's (SD3 world) or the toy world's when there is no --teacher.
    Returns (sources, dataset, toy world or None); sources maps "teacher" (the frozen network the
    target's first move uses: for w2sd the strong model), "weak", "main" and "init" (the student's
    starting point) to a checkpoint path, or to (base, finetuned, scale) for a W2SD blend."""
    world = None
    if args.teacher is None:
        import toy  # the CPU toy world; imported only when used

        if distributed and rank != 0:
            dist.barrier()  # rank 0 builds (or trains) the toy world first; the others then read its cache
        world = toy.build_world(progress=rank == 0 and not args.no_progress)
        if distributed and rank == 0:
            dist.barrier()
        teacher, weak = world.teacher_path, args.weak or world.weak_path
        strong = args.strong or world.strong_path
        dataset = dataset if dataset is not None else world.dataset(split="train")
    else:
        teacher, weak, strong = args.teacher, args.weak, args.strong or args.teacher
    sources = dict(teacher=teacher, weak=None, main=None, init=teacher)
    if args.teacher_sampler == "w2sd":
        if args.w2sd_finetuned is not None:  # the W2SD release's pair from one fine-tune of the teacher
            blend = lambda scale: (teacher, args.w2sd_finetuned, scale)  # noqa: E731
            strong, weak, main = blend(args.strong_scale), blend(args.weak_scale), blend(args.main_scale)
        else:
            main = teacher
        sources.update(teacher=strong, weak=weak, main=main if args.w2sd_final == "main" else None)
        # the student starts from the model that makes the teacher step's final move (see the docstring)
        sources["init"] = sources["main"] if args.w2sd_final == "main" else strong
    return sources, dataset, world


def load_network(source, device, dtype):
    """A checkpoint path, or (base, finetuned, scale): base + scale (finetuned - base), streamed."""
    if isinstance(source, tuple):
        return load_mmdit_blend(*source, device=device, dtype=dtype)
    return load_mmdit(source, device, dtype)


def describe_source(source):
    if isinstance(source, tuple):
        base, tuned, scale = source
        return f"{base} {scale:+g} x ({tuned} - {base})"
    return source


def student_metadata(args, step):
    """What a student file records of its run (embed.load_student and toy_report read it)."""
    meta = {"teefusion_method": args.method, "teefusion_teacher": args.teacher_sampler, "step": str(step),
            export.RUN_METADATA: json.dumps(export.run_info(args, step))}  # what the model card says
    if args.fused_scale is not None:  # Eq. 7's factor, which embed.load_student applies again
        meta[embed.SCALE_METADATA] = repr(args.fused_scale)
    if getattr(args, "lora", None) is not None:
        meta[lora.METADATA] = json.dumps(lora_spec(args))
    return meta


def main_full(args):
    """--full: distill every student of FULL from the toy teacher, then print one table with the
    teacher samplers and every student (toy.report_students) and write out/table.json and
    out/samples.png. Returns {subfolder name: student path}."""
    out, runs = options.full_runs(args)
    cli.output_folder(out, "--out")
    start = time.time()
    students = {}
    for (name, _, _), sub in zip(FULL, runs):
        students[name] = main(sub)  # with --resume, a finished student says so and is reused
    import toy
    from evaluation import toy_report

    world = toy.build_world(progress=False)
    toy_report.report(world, [dict(path=students[name], teacher=sampler) for name, _, sampler in FULL], out_dir=out,
                      sweep_ws=toy_report.SWEEP_WS, progress=not args.no_progress)
    print(f"--full: {len(FULL)} students and the table in {(time.time() - start) / 60:.1f} minutes; {out}")
    return students


def main(args, dataset=None):
    """Train; returns the path of the final student checkpoint (the EMA weights with --ema).
    dataset: optional, a Dataset of {"latents", "context", "y", ...} items with .null() that
    replaces --data / the toy world's data (tests, notebooks). With --full (toy world only):
    main_full, every student and one table."""
    if getattr(args, "full", False):
        if dataset is not None:
            raise ValueError("--full trains on the toy world's own data: it takes no dataset")
        return main_full(args)
    fill_defaults(args)
    micro = check_args(args, int(os.environ.get("WORLD_SIZE", 1)))  # before the process group and anything heavy
    if dataset is None and args.teacher is not None:
        from prepare import ShardDataset

        dataset = ShardDataset(args.data)  # index.json is checked here, each shard when it is first read
        if len(dataset) == 0:
            raise ValueError(f"--data {args.data} holds no samples (index.json lists none)")
    distributed, rank, world_size, device = _setup_distributed(args)
    threads = torch.get_num_threads()
    lock = None
    try:
        # the toy world's tensors are tiny: one CPU thread per process is faster than several
        if args.teacher is None and device.type == "cpu":
            torch.set_num_threads(1)
        lock, resume = open_run(args, rank, distributed)
        if isinstance(resume, final_files.Finished):  # every final file there: nothing to do
            return resume.path
        return _main(args, dataset, resume, micro, distributed, rank, world_size, device)
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads)
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def open_run(args, rank, distributed):
    """Before anything heavy: rank 0 (or the single process) takes --out's lock (cli.FolderLock),
    chooses the checkpoint to resume and checks it (start_point), and removes the temporary files a
    killed run left; the other ranks never touch the lock, and receive the outcome, the checkpoint
    or the refusal. Returns (the lock on rank 0, else None; (folder, state), None, or
    final_files.Finished)."""
    lock, outcome = None, None
    if rank == 0:
        try:
            lock = cli.FolderLock(args.out, "--out").acquire()
            outcome = start_point(args)
        except Exception as e:  # every rank raises it below
            if lock is not None:
                lock.release()
                lock = None
            outcome = e
    if distributed:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return lock, outcome


def start_point(args):
    """Under --out's lock: (folder, state) of the checkpoint to resume, or None to start from the
    teacher; refuses a run that would overwrite checkpoints without --resume, and a resume that
    cannot continue (check_resume). Then removes the temporary files of a killed run, and says so.
    A checkpoint at --steps: final_files.Finished (after one line) when every final file is there
    and intact; else (folder, state), from which _main writes the missing ones (run/final_files.py)."""
    root = os.path.join(args.out, "checkpoints")
    if not args.resume and (os.path.exists(os.path.join(root, LATEST)) or complete_checkpoints(root)):
        raise ValueError(f"{args.out} already holds checkpoints ({root}): pass --resume to continue that run, "
                         "or choose another --out")
    point = resume_point(args.out) if args.resume else None
    if point is not None:
        check_resume(*point, args)
    removed = remove_temporaries(args.out)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by a killed run: {', '.join(removed[:10])}"
              + (", ..." if len(removed) > 10 else ""))
    if point is not None and point[1]["step"] == args.steps:
        return final_files.finished(args, *point) or point
    return point


def _main(args, dataset, resume, micro, distributed, rank, world_size, device):
    accum = args.global_batch // (world_size * micro)
    sources, dataset, toy_world = _resolve_world(args, dataset, rank, distributed)
    if len(dataset) == 0:
        raise ValueError("the training data is empty")
    if args.teacher_dtype is None:
        args.teacher_dtype = "bf16" if device.type == "cuda" else "fp32"
    net_dtype = torch.bfloat16 if args.teacher_dtype == "bf16" else torch.float32  # the frozen networks

    # Algorithm 1: student initialised from the teacher (fp32 master weights); for W2SD, from the model
    # that moves after the reflection (the strong one, Eq. 4, or the main one)
    # (--fsdp-teachers: on the CPU, then sharded onto the device with the student)
    at = torch.device("cpu") if args.fsdp_teachers else device
    teacher = frozen(load_network(sources["teacher"], at, net_dtype))
    weak, main = (frozen(load_network(sources[k], at, net_dtype)) if sources[k] else None for k in ("weak", "main"))
    # --lora: the student's frozen weights are those of the network it starts from (shared, not copied)
    base = (main if sources["init"] == sources["main"] else teacher) if args.lora is not None else None
    # (--fsdp: on the CPU, then sharded onto the device: no rank holds the whole student there)
    model = load_network(sources["init"], torch.device("cpu") if args.fsdp else device, torch.float32) \
        if base is None else None
    torch.manual_seed(args.seed)  # new modules and adapters start the same on every rank and world size
    if base is not None:
        model = lora.attach(base, lora_spec(args))  # adapters: A drawn as nn.Linear draws, B = 0
    model.gradient_checkpointing = args.grad_checkpointing
    fusion = embed.make_fusion(args.method, model.config, args.fused_scale).to(device)
    if not fusion.trains_model:  # DICE: the diffusion model stays frozen, only the enhancer learns
        frozen(model)
    student = Student(model, fusion).train()
    # the EMA of a LoRA student shares its frozen weights too
    shared = {id(t): t for t in (*student.parameters(), *student.buffers()) if not t.requires_grad} if base else {}
    ema = frozen(copy.deepcopy(student, shared)) if args.ema is not None else None
    # --fsdp: the student and its EMA sharded in place across the ranks (run/parallel.py); AdamW is built over the shards
    fsdp = parallel.FullShard(student, ema, device, [m for m in (teacher, weak, main) if m is not None]
                              if args.fsdp_teachers else ()) if args.fsdp else None
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ema_params = [dict(ema.named_parameters())[n] for n in names] if ema is not None else []
    torch.manual_seed(args.seed * world_size + rank)  # per-rank seed (DiT); Algorithm 1's draws are counter-based

    start, ckpt = 0, None
    if resume is not None:  # chosen and checked by open_run before anything loaded
        ckpt = resume[0]
        start = fsdp.load_checkpoint(*resume, optimizer, names) if fsdp else \
            load_checkpoint(*resume, student, ema, optimizer, names)
    log_path = os.path.join(args.out, "log.jsonl")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if ckpt is not None:
            _trim_log(log_path, start)
        elif os.path.exists(log_path):
            os.remove(log_path)
        print(f"distill: {args.method}, teacher {args.teacher_sampler} ({describe_source(sources['teacher'])}"
              + (f", weak {describe_source(sources['weak'])}" if sources["weak"] else "")
              + (f", main {describe_source(sources['main'])}" if sources["main"] else "")
              + f"; student from {describe_source(sources['init'])}), {world_size} process(es) "
              f"on {device}, global batch {args.global_batch} = {world_size} x {micro} x {accum} rounds, "
              f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters"
              + (f" (LoRA rank {args.lora} on {args.lora_targets}, trained fully: {args.lora_full}), " if base else ", ")
              + (f"resuming at step {start} from {ckpt}" if ckpt else "from step 0"))

    ddp = parallel.data_parallel(student, device, distributed, fsdp)
    context_null, y_null = dataset.null()
    null = (context_null.to(device, torch.float32), y_null.to(device, torch.float32))  # (1, L, Dc), (1, Dy)
    sampler = StepSampler(len(dataset), args.seed, start, args.steps, args.global_batch, micro, rank, world_size,
                          buckets=getattr(dataset, "bucket_ids", None))  # prepare.py's buckets: one per global batch
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    loader = DataLoader(WithNoise(dataset, args.seed, args.t_sampling, args.w_min, args.w_max), batch_size=micro,
                        sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    batches = iter(loader)
    # sample grids and TensorBoard (rank 0; they leave the training bitwise unchanged)
    watch = monitor.Monitor(args, rank, start, dataset, toy_world, dict(student=ema or student, teacher=teacher,
                            weak=weak, main=main), null, (args.bf16 or args.teacher_dtype == "bf16",
                                                          student_bf16(args)), device)

    log = None  # opened at the first record: a run refused before its first step leaves no file
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"distill {args.method}",
               disable=rank != 0 or args.no_progress)
    for step in bar:
        t0 = time.perf_counter()
        timing = {"teacher_s": 0.0, "student_s": 0.0}
        loss_sum = torch.zeros((), device=device)
        for a in range(accum):
            # Algorithm 1: (x0, c) from the data, with this sample's t, w and eps
            batch = next(batches)
            batch = {k: v.to(device, torch.float32, non_blocking=True) if torch.is_tensor(v) and v.is_floating_point()
                     else v for k, v in batch.items()}
            # DDP: all-reduce the gradients only on the last accumulation round (FSDP: reduce-scatter each round)
            with parallel.accumulating(ddp, last_round=a == accum - 1):
                loss = distill_loss(ddp, teacher, batch, null, args, weak, main, timing)
                (loss / accum).backward()
            timing["student_s"] += _clock(device) - timing.pop("_student_start")
            loss_sum += loss.detach()
        loss_mean = loss_sum / accum
        if distributed:
            dist.all_reduce(loss_mean)  # the loss of the whole global batch, on every rank
            loss_mean /= world_size
        loss_value = loss_mean.item()
        if not math.isfinite(loss_value):  # every rank sees the same all-reduced value and stops
            raise NonFinite(f"non-finite loss ({loss_value}) at step {step + 1}: training stopped before the "
                            f"optimizer step; {last_good(args.out, rank)}; lower --lr, or check the data and the teacher")
        if args.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)  # the norm before clipping
        else:  # every rank: with --fsdp the norm of the shards is a collective
            norm = monitor.grad_norm(params)
        # Algorithm 1: AdamW step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:  # ema <- decay * ema + (1 - decay) * weights
            with torch.no_grad():
                for p_ema, p in zip(ema_params, params):
                    p_ema.lerp_(p, 1 - args.ema)
        done = step + 1
        dt = time.perf_counter() - t0
        if rank == 0:
            record = {"step": done, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                      "samples_per_s": args.global_batch / dt, "teacher_s": timing["teacher_s"],
                      "student_s": timing["student_s"], "step_s": dt,
                      "grad_norm": norm.item() if torch.isfinite(norm) else None}
            record.update(watch.step(done, record))  # a sample grid when due: its seconds as sample_s
            log = log or open(log_path, "a")
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", sps=f"{args.global_batch / dt:.1f}")
        if done % args.ckpt_every == 0 or done == args.steps:  # the last step always checkpoints
            # only finite weights are written: here, before every checkpoint, and so before the final files
            problem = weights_problem(student, ema, batch, null, args, distributed)
            if problem:
                raise NonFinite(f"after step {done} {problem}: training stopped, nothing was written for step {done}; "
                                f"{last_good(args.out, rank)}; lower --lr, or check the data and the teacher")
            # FSDP: the shards gathered whole on rank 0, into the files a DDP run writes (no replicas to compare)
            saved = fsdp.gather(optimizer) if fsdp else (student, ema, optimizer)
            replicas = None if fsdp else replica_checksums(params, distributed, world_size)
            if rank == 0:
                save_checkpoint(args.out, done, *saved, names, args, args.keep, replicas, student_metadata(args, done))
            del saved
            if distributed:
                dist.barrier()  # rank 0 saves, then everybody goes on
    bar.close()
    watch.close()
    if log is not None:
        log.close()
    del batches

    # the final files, beside the checkpoints: a pure function of the checkpoint at --steps (run/final_files.py);
    # FSDP: the student and EMA gathered whole on rank 0 first (every rank takes part)
    if fsdp:
        student, ema = fsdp.gather_modules()
    final = final_files.write(args, student, ema, base, toy_world, rank, student_metadata(args, args.steps))
    if distributed:
        dist.barrier()
    return final


if __name__ == "__main__":
    cli.run(main, build_parser())
