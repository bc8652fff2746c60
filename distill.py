"""
Algorithm 1 of TeEFusion as a training loop: distill classifier-free guidance (and the
reflection samplers Z-Sampling / W2SD built on it) into a student that needs ONE network
pass per sampling step. One process, or many under torchrun (DDP); CPU or CUDA.

Algorithm 1 (paper; docs/DESIGN.md), read top to bottom in this file:
    student initialised from the teacher
    repeat
        (x0, c) from the data;  t ~ U[0, 1];  w ~ U[w_min, w_max];  eps ~ N(0, I)    draw_t_w_eps
        x_t = (1 - t) x0 + t eps                                                       noised
        target = (1 + w) v_T(x_t, t, c) - w v_T(x_t, t, null)   (Eq. 2; refined by Eq. 3-4 for
                                                                 Z-Sampling and W2SD teachers)
        z = G(psi(t)) + F(y) + G(psi(w)) * F(y - y_null) / 256  (Eq. 7, embed.py)       Student
        loss = || v_S(x_t, t, c, z) - target ||^2                                      distill_loss
        AdamW step (and the EMA of the weights, --ema)                                 distill

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
  It refuses --teacher (real SD3), --method and --teacher-sampler. Runtimes and results: docs/RESULTS.md.

Real scale (SD3-medium, shards from prepare.py, 8 GPUs per node, the paper's settings: a W2SD + CFG
teacher, here with the W2SD release's pair built from a fine-tune of SD3-medium):
    torchrun --nproc_per_node=8 distill.py --teacher sd3_medium.safetensors \\
        --w2sd-finetuned sd3_medium_finetune.safetensors --data shards/ \\
        --out runs/teefusion --bf16 --grad-checkpointing --global-batch 128 --micro-batch 1 \\
        --lr 5e-6 --steps 10000 --ckpt-every 500 --resume --export-diffusers
    (any pair: --strong S --weak W; an Euler + CFG teacher: --teacher-sampler cfg; a LoRA student:
    --lora RANK; sharded: --fsdp)
Everything around the algorithm (processes, loading, LoRA, resume, EMA copies, the log, checkpoints, final
files, faults and exit statuses, the files in --out) is run/training.py's Run; flags and defaults:
run/options.py.

Choices Algorithm 1 leaves open, and what this file does:
  * The teacher step. The target is the velocity of ONE teacher step from t (samplers.teacher_target),
    the step the student's sampler takes from t: N = --teacher-steps (50 for SD3, the released
    student's count; 20 in the toy world) on SD3's shifted schedule (samplers.schedule_step; at 50 steps
    the step is ~0.007 near t = 1 and ~0.05 at low t), with no reflection where the sampler takes a plain
    step (its last one). For cfg the step length does not matter (the target is the Eq. 2 velocity at t).
  * The reflection: the Z-Sampling authors' flow-matching settings (--preset flow), or their SDXL ones
    (--preset sdxl). W2SD: the strong model denoises at w, the weak one inverts at w = 0, and (Eq. 4) the
    strong model moves after the reflection (--w2sd-final main: a third model moves, as the W2SD release).
  * "Student initialised from the teacher": from the network whose velocity ends the teacher step (for
    W2SD the strong model), so the untrained student already takes the teacher step minus its guidance
    and reflection corrections.
  * Cost of the target per sample, in teacher forwards: cfg 2, zsampling 6, w2sd 6 (3 models held in
    memory for w2sd with a main model, 2 otherwise), plus the student's forward and backward (about 3
    forwards' worth): a W2SD + CFG step costs about 9 / 5 = 1.8x a cfg step.
  * t: uniform on (0, 1] (t = 0 has no step to take), or SD3's logit-normal (--t-sampling).
  * Eq. 7's 1/256 as released (embed.teefusion_conditioning; 1/4 in the toy world, --fused-scale);
    psi(1000 w) formed in float32.
  * Baselines as their papers train them: DICE trains its enhancer alone, MMDiT frozen, at ONE guidance
    (w = 4) with lr 2e-4; DistillCFG's guidance MLP starts from the default initialisation.
  * A student distilled from a reflection teacher at w follows a stronger guidance than CFG at w (to
    first order, Z-Sampling at w is CFG at 2w - w_inv: samplers.first_order_cfg_w).
  * The draws are counter-based: seed and stream position p fix t, w and eps, and the step number fixes
    the samples (run/batches.py), so one process and N compute the same step and a resume, also on
    another number of GPUs, continues the exact same stream.

Shape legend: B batch, C latent channels, H W latent size, L tokens, Dc context width,
Dy pooled width, D model width.
"""

import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's pooled-text embedder

from run import cli, monitor, parallel, training
import embed
import samplers
from run.options import build_parser
from run.training import autocast, frozen, student_bf16, teacher_bf16, trainable
from run.training import NonFinite  # noqa: F401 - what a run raises on a non-finite loss or weight (exit 1)


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


# -----------------------------------------------------------------------------
# One iteration of Algorithm 1


def draw_t_w_eps(seed, p, shape, t_sampling, w_min, w_max):
    """Algorithm 1's random draws for the sample at stream position p (run/batches.py): t, w (scalars)
    and eps (shape), from a generator seeded by (seed, p) alone."""
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


def noised(batch):
    """Algorithm 1: x_t = (1 - t) x0 + t eps."""
    t_ = batch["t"].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return (1 - t_) * batch["latents"] + t_ * batch["eps"]  # (B, C, H, W)


def teacher_step(t, args):
    """The teacher's step from t (B,): (t_next, reflects), see the file docstring."""
    if args.teacher_step == "uniform":
        return (t - 1.0 / args.teacher_steps).clamp(min=0), torch.ones_like(t, dtype=torch.bool)
    return samplers.schedule_step(t, args.teacher_steps, args.shift)


def distill_loss(student, teacher, batch, null, args, weak=None, main=None):
    """One micro-batch of Algorithm 1. batch: tensors on the device (x0 as "latents", c as "context" and
    "y", and the draws t, w, eps); null: (context_null, y_null). teacher: the frozen teacher (for w2sd: the
    strong model), weak / main: W2SD's other models. Returns (loss, teacher_seconds): the MSE (an fp32
    scalar) and the seconds the teacher's target took."""
    context, y = batch["context"], batch["y"]  # (B, L, Dc), (B, Dy)
    t, w = batch["t"], batch["w"]  # (B,), (B,)
    context_null, y_null = null  # (1, L, Dc), (1, Dy)
    tick = clock(t.device)
    # Algorithm 1: x_t = (1 - t) x0 + t eps
    x_t = noised(batch)  # (B, C, H, W)
    # the step the sampler takes from t, on its shifted schedule (see the file docstring)
    t_next, reflect = teacher_step(t, args)  # (B,), (B,)
    # Algorithm 1: target = (1 + w) v_T(x_t, t, c) - w v_T(x_t, t, null) (Eq. 2), refined by Eq. 3-4
    with torch.no_grad(), autocast(t.device, teacher_bf16(args)):
        target = samplers.teacher_target(args.teacher_sampler, teacher, x_t, t, t_next, (context, y), null, w,
                                         reflect=reflect, steps=args.teacher_steps, preset=args.preset,
                                         w_inv=args.w_inv, tau=args.tau, weak=weak, main=main,
                                         w_strong=args.w_strong, w_weak=args.w_weak,
                                         target=args.target).float()  # (B, C, H, W)
    teacher_seconds = clock(t.device) - tick
    # Algorithm 1: z from Eq. 7, one student forward
    with autocast(t.device, student_bf16(args)):
        v_S = student(x_t, t, context, y, context_null, y_null, w)  # (B, C, H, W)
    # Algorithm 1: loss = || v_S(x_t, z) - target ||^2 (mean over all elements)
    loss = F_.mse_loss(v_S.float(), target)
    return loss, teacher_seconds


def clock(device):
    """Seconds, after the device's queued work (for the log's teacher_s and student_s)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# -----------------------------------------------------------------------------
# The loop


def distill(run, args):
    """Algorithm 1 on run's networks and data (run/training.py), from its start step to --steps.
    Returns the final student's path."""
    # Algorithm 1: student initialised from the teacher (for W2SD the model that moves after the reflection)
    teacher, weak, main = run.load_teachers()  # frozen
    model = run.load_student_start()  # fp32 master weights, or --lora adapters on the frozen start network
    # its inputs: Eq. 7 (no new parameters), or an ablation's / DICE's new modules, drawn after --seed's reseed
    fusion = embed.make_fusion(args.method, model.config, args.fused_scale).to(run.device)
    if not fusion.trains_model:  # DICE: the diffusion model stays frozen, only the enhancer learns
        frozen(model)
    student = Student(model, fusion).train()
    ema = run.make_ema(student)  # --ema: a frozen copy of the student, else None
    run.shard(student, ema)  # --fsdp: both sharded across the ranks in place; AdamW is built over the shards
    names, params = trainable(student)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ema_params = [dict(ema.named_parameters())[n] for n in names] if ema is not None else []
    start = run.resume(student, ema, optimizer)  # 0, or the resumed checkpoint's step (weights, EMA, AdamW)
    forward = run.data_parallel(student)  # DDP under torchrun, else the student itself
    null = run.null_prompt()  # (1, L, Dc), (1, Dy)
    batches = run.micro_batches(start, functools.partial(draw_t_w_eps, args.seed, t_sampling=args.t_sampling,
                                                         w_min=args.w_min, w_max=args.w_max))
    run.start_monitor(start, student, ema, null)

    for step in run.steps(start):
        t0 = time.perf_counter()
        teacher_s = student_s = 0.0
        loss_sum = torch.zeros((), device=run.device)
        for a in range(run.accum):  # the global batch, in rounds of micro-batches on each rank
            # Algorithm 1: (x0, c) from the data, with this sample's t, w and eps (draw_t_w_eps)
            batch = next(batches)
            tick = clock(run.device)
            # DDP: all-reduce the gradients only on the last accumulation round (FSDP: reduce-scatter each round)
            with parallel.accumulating(forward, last_round=a == run.accum - 1):
                loss, seconds = distill_loss(forward, teacher, batch, null, args, weak, main)
                (loss / run.accum).backward()
            teacher_s += seconds
            student_s += clock(run.device) - tick - seconds  # the student's forward and backward
            loss_sum += loss.detach()
        loss_value = run.global_batch_loss(loss_sum / run.accum, step)  # all ranks; stops on a non-finite loss
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
        # before a grid or a checkpoint: only finite weights, with a finite velocity on the last batch
        run.check_weights(step + 1, student, ema, (noised(batch), batch["t"], batch["context"], batch["y"], *null,
                                                   batch["w"]))
        run.record(step + 1, loss_value, optimizer.param_groups[0]["lr"], time.perf_counter() - t0,
                   teacher_s, student_s, norm)  # log.jsonl, sample grids (rank 0)
        if run.checkpoint_due(step + 1):
            run.save_checkpoint(step + 1, student, ema, optimizer)
    return run.finish(student, ema)  # the final files (run/final_files.py)


def main(args, dataset=None):
    """Train; returns the path of the final student checkpoint (the EMA weights with --ema).
    dataset: optional, a Dataset of {"latents", "context", "y", ...} items with .null() that
    replaces --data / the toy world's data (tests, notebooks). With --full (toy world only):
    every student and one table (training.distill_every_student)."""
    if getattr(args, "full", False):
        if dataset is not None:
            raise ValueError("--full trains on the toy world's own data: it takes no dataset")
        return training.distill_every_student(args, main)
    with training.Run(args, dataset) as run:  # bad input refused here, before anything heavy loads
        if run.finished is not None:  # a relaunch of a finished run: every final file is there
            return run.finished
        return distill(run, args)


if __name__ == "__main__":
    cli.run(main, build_parser())
