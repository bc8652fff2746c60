"""
distill.py's command line: the settings a run of Algorithm 1 is given, their defaults (the paper's
for SD3, small ones for the CPU toy world, DICE's own for --method dice, the LoRA student's learning
rate), and every refusal made before anything heavy loads (check_args; run/cli.py turns each into one
`error: ...` line, exit status 2).

    python distill.py --help
    args = options.parse_args([...]); micro = options.check_args(args, world_size)   # distill.main's start

Defaults (fill_defaults; a flag that is given always wins):
    SD3 (--teacher)   the paper's Sec. 6.1: a W2SD + CFG teacher, AdamW lr 5e-6, global batch 128, 10k steps,
                      w ~ U[2, 14], the teacher's step on the released student's 50-step schedule
    toy world         a W2SD + CFG teacher, lr 1e-3, batch 32, 1500 steps, the report's 20-step schedule
    --method dice     an Euler + CFG teacher (DICE's CFG supervision), lr 2e-4 and w = 4 only (its release)
    --lora RANK       lr 1e-4 (SD3), 1e-3 (toy)
"""

import copy
import os

from run import cli
import embed
from sd3 import export
from sd3 import lora
import mmdit
from run import monitor
import samplers

METHODS = tuple(embed.FUSIONS)  # teefusion, gonly, distillcfg, dice
# the paper's settings (Sec. 6.1: a W2SD + CFG teacher, AdamW lr 5e-6, batch 128, ~10k steps, w in
# [2, 14], the released student's 50 steps); the toy world's are small enough to finish in minutes on
# a CPU, and the toy world also distills from its W2SD + CFG teacher by default (its pair is built in)
SD3_DEFAULTS = dict(steps=10000, global_batch=128, lr=5e-6, out="runs/distill", teacher_sampler="w2sd",
                    method="teefusion", teacher_steps=50, fused_scale=embed.RELEASED_SCALE)
# DICE trains its enhancer alone, from scratch, at ONE guidance (its release: Adam lr 2e-4, diffusers'
# scale 5 = w 4); these apply to --method dice in both worlds unless given
# and from a CFG teacher: DICE's Sec. 3.1 / Eq. 10 supervise it with CFG at that one scale
METHOD_DEFAULTS = {"dice": dict(lr=2e-4, w_min=embed.DICE_W, w_max=embed.DICE_W, teacher_sampler="cfg")}
W_RANGE = dict(w_min=2.0, w_max=14.0)  # Algorithm 1's w ~ U[2, 14] (the paper's range)
# Eq. 7's factor in the toy world. At the released 1/256 the fused term starts at 1e-5 to 2e-4 of |c| in the
# width-64 toy MMDiT (`python -m evaluation.toy_study ratio`), and a 1500-step student did not follow w at all (0.02 of
# its teacher's amplitude, DEV); among 1/256, 1/64, 1/16, 1/4 and 1 (the paper's Eq. 7, no factor), 1/4 gave
# the lowest RMSE to the W2SD teacher on the DEV prompts (0.330 [0.311, 0.348]; 1/16 and 1 within its CI) and
# follows w at 0.71 of the teacher (`python -m evaluation.toy_study runs --budgets 1500 --config teefusion:1/256 ...`,
# docs/TOY.md). SD3 keeps the released 1/256 (SD3_DEFAULTS), which released weights need.
TOY_FUSED_SCALE = 0.25
# the toy world: 1500 steps of batch 32 at lr 1e-3 distill a student in about 3 CPU minutes, so that the
# whole default command (teacher, student, report) fits 10 minutes on 2 cores; what more steps give: the
# budget curves of docs/TOY.md (evaluation/toy_study.py runs --budgets 500,...,12000)
TOY_DEFAULTS = dict(steps=1500, global_batch=32, lr=1e-3, out="runs/toy", teacher_sampler="w2sd", method="teefusion",
                    teacher_steps=20,  # toy_report samples with 20 steps
                    fused_scale=TOY_FUSED_SCALE)
# --lora RANK: the adapters learn at a higher rate than full fine-tuning. SD3: 1e-4, the default of diffusers'
# SD3 LoRA DreamBooth script (train_dreambooth_lora_sd3.py; not tuned here: no GPU); toy: as the full student's
LORA_LR = {"sd3": 1e-4, "toy": 1e-3}
# --full (toy world): every student of the paper's Tables 3 and 4, as (subfolder of --out, --method,
# --teacher-sampler); the Table 3 ablations learn from the W2SD + CFG teacher, like the main student (G only
# twice: the paper's unscaled row, and at Eq. 7's scale), DICE from Euler + CFG, as its paper trains it
FULL = (("teefusion-cfg", "teefusion", "cfg"), ("teefusion-zsampling", "teefusion", "zsampling"),
        ("teefusion-w2sd", "teefusion", "w2sd"), ("gonly-w2sd", "gonly", "w2sd"),
        ("gonly-scaled-w2sd", "gonly-scaled", "w2sd"), ("distillcfg-w2sd", "distillcfg", "w2sd"),
        ("dice-cfg", "dice", "cfg"))


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser():
    p = cli.parser("TeEFusion distillation (Algorithm 1), one process or torchrun.")
    p.add_argument("--method", default=None, choices=METHODS, help="the student's inputs (default teefusion)")
    p.add_argument("--teacher-sampler", default=None, choices=samplers.TEACHERS,
                   help="the teacher Algorithm 1 distills (default: w2sd, the paper's Sec. 6.1, in both worlds; cfg "
                        "for --method dice, whose paper supervises it with CFG)")
    p.add_argument("--target", default="step", choices=samplers.TARGETS,
                   help="what a reflection teacher's step gives the student to regress on (samplers.teacher_target): "
                        "step, the effective velocity of the whole teacher step (x_next - x_t) / (t_next - t); "
                        "reflected, the final model's guided velocity at the reflected point x~_t (Eq. 4)")
    p.add_argument("--fused-scale", type=float, default=None, metavar="S",
                   help="the factor on Eq. 7's fused term G(psi(w)) * F(y - y_null) (and on gonly-scaled's G(psi(w))): "
                        f"default 1/256 as released for SD3, {TOY_DEFAULTS['fused_scale']:g} in the toy world "
                        "(docs: why)")
    p.add_argument("--teacher", default=None,
                   help="teacher MMDiT (.safetensors or diffusers folder); none: the toy world (toy.py). For w2sd: "
                        "the strong model unless --strong is given, the main model with --w2sd-final main, the base "
                        "of the pair with --w2sd-finetuned")
    p.add_argument("--weak", default=None, help="W2SD's weak model (inverts)")
    p.add_argument("--strong", default=None, help="W2SD's strong model (denoises and, by Eq. 4, moves after the "
                                                  "reflection); default: --teacher")
    p.add_argument("--w2sd-finetuned", default=None, metavar="PATH",
                   help="build W2SD's pair from a fine-tune of --teacher, as the W2SD release does: with delta = "
                        "PATH - teacher, strong = teacher + STRONG_SCALE delta, weak = teacher + WEAK_SCALE delta "
                        "(and main = teacher + MAIN_SCALE delta), each streamed tensor by tensor")
    p.add_argument("--strong-scale", type=float, default=1.5)
    p.add_argument("--weak-scale", type=float, default=-1.5)
    p.add_argument("--main-scale", type=float, default=0.8)
    p.add_argument("--w2sd-final", default="strong", choices=("strong", "main"),
                   help="the model that moves after the reflection: the strong one (TeEFusion's Eq. 4, default) or "
                        "a main model (the W2SD SDXL LoRA release: --teacher, or the blend at --main-scale); the "
                        "student starts from it")
    p.add_argument("--data", default=None, help="a folder written by prepare.py (with text embeddings)")
    p.add_argument("--out", default=None, help="default: runs/distill (SD3), runs/toy (toy world)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in all (default: 10000 SD3, "
                                                           f"{TOY_DEFAULTS['steps']} toy)")
    p.add_argument("--global-batch", type=int, default=None,
                   help=f"samples per optimizer step, all ranks (default: 128 SD3, {TOY_DEFAULTS['global_batch']} toy)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per forward per rank "
                                                                  "(default: the global batch / world size)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW (default: 5e-6 SD3, {TOY_DEFAULTS['lr']:g} toy)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's decoupled weight decay (default 0: the paper states none, and a decay pulls the "
                        "student's pretrained weights toward zero rather than toward its teacher; PyTorch's AdamW "
                        "default would be 0.01)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm; 0: off")
    p.add_argument("--w-min", type=float, default=None, help="default 2 (4 for dice)")
    p.add_argument("--w-max", type=float, default=None, help="default 14 (4 for dice)")
    p.add_argument("--t-sampling", default="uniform", choices=("uniform", "logit-normal"))
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="N of the sampler the student will be used with (default 50 SD3, 20 toy): the teacher takes "
                        "that sampler's step from t on the shifted schedule, and does not reflect on its last step")
    p.add_argument("--shift", type=float, default=3.0, help="the schedule's time shift (SD3: 3)")
    p.add_argument("--teacher-step", default="schedule", choices=("schedule", "uniform"),
                   help="schedule: the sampler's step (samplers.schedule_step); uniform: t -> max(t - 1/N, 0) with a "
                        "reflection everywhere (for comparison)")
    p.add_argument("--preset", default="flow", choices=tuple(samplers.PRESETS),
                   help="Z-Sampling's reflection settings: flow (its authors' SD3.5 code: w_inv -0.5, tau t - 1/N) or "
                        "sdxl (their SDXL release: w_inv -1, tau t); W2SD inverts at tau t (Eq. 3) unless --tau is given")
    p.add_argument("--w-inv", type=float, default=None, help="zsampling: the inversion's guidance (default: preset)")
    p.add_argument("--w-weak", type=float, default=samplers.W2SD_WEAK_W, help="w2sd: the weak model's guidance")
    p.add_argument("--w-strong", type=float, default=None, help="w2sd: the strong model's guidance (default: w)")
    p.add_argument("--tau", default=None, help='reflection inversion label: "t", "t_next", "t-1/N" or an offset '
                                               '(default: the preset\'s for zsampling, "t" for w2sd: Eq. 3)')
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the student (fp32 master weights)")
    p.add_argument("--teacher-dtype", default=None, choices=("bf16", "fp32"),
                   help="weights of the frozen teacher (and W2SD pair); default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the student, its gradients, AdamW state and EMA across the ranks "
                        "(torch's fully_shard, run/parallel.py) instead of DDP's whole copy per rank; the teachers stay "
                        "whole per rank (--fsdp-teachers shards them); checkpoints keep the one-process format")
    p.add_argument("--fsdp-teachers", action="store_true",
                   help="with --fsdp: shard the frozen teachers too (each forward all-gathers them block by block): "
                        "less memory per GPU, more communication")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints kept on disk (the newest)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/latest if there is one (or "
                                                         "the newest complete checkpoint, with a warning)")
    p.add_argument("--export-diffusers", action="store_true",
                   help="also write DIR/diffusers/transformer for the authors' released TeEFusion pipeline "
                   "(txt_align_guidance: Eq. 7 at 1/256). That pipeline forms 1000 w in the transformer's dtype "
                   "(bf16: psi(4992) at w = 5, psi(7488) at 7.5) where training formed it in float32; on the toy "
                   "student that moves an image about a ninth as far as w -> w + 1 does at w = 5, a third at 7.5 "
                   "(docs/SAMPLERS.md; generate.py --w-rounding model reproduces it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4 on CUDA, 0 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-report", action="store_true", help="toy world: skip the Table 4 report at the end")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="train low-rank adapters of this rank (sd3/lora.py) over the frozen student start instead of "
                        "every weight; writes lora.safetensors (diffusers' SD3 LoRA format)")
    lora.add_arguments(p)
    monitor.add_arguments(p)  # sample grids, TensorBoard
    p.add_argument("--full", action="store_true", help="toy world: distill every student of FULL (a TeEFusion "
                                                        "student per teacher, the Table 3 ablations, DICE), each "
                                                        "into --out/NAME, then print one table of them all")
    return p


def fill_defaults(args):
    """The paper's settings for a real teacher; small ones that finish in minutes on a CPU for the toy world;
    DICE's own (METHOD_DEFAULTS) for --method dice."""
    world = SD3_DEFAULTS if args.teacher is not None else TOY_DEFAULTS
    method = args.method or world["method"]
    if getattr(args, "lora", None) is not None and args.lr is None:
        args.lr = LORA_LR["sd3" if args.teacher is not None else "toy"]
    for defaults in (METHOD_DEFAULTS.get(method, {}), world, W_RANGE):
        for k, v in defaults.items():
            if getattr(args, k) is None and (k != "fused_scale" or method in embed.SCALED):
                setattr(args, k, v)  # Eq. 7's scale only for the methods that have one
    return args


def check_lora(args):
    """--lora RANK and its settings (lora.settings), normalised in args (so that a resume compares like
    with like); the flags of LoRA refused without it."""
    given = [f for f in ("lora_alpha", "lora_targets", "lora_full", "lora_dtype") if getattr(args, f, None) is not None]
    if getattr(args, "lora", None) is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} sets up a LoRA student: it needs --lora RANK")
        return None
    if args.method not in lora.METHODS:
        why = ("DICE keeps the MMDiT frozen: there is nothing to adapt" if args.method == "dice" else
               "its new guidance MLP is no part of SD3, so an SD3 LoRA file cannot carry it")
        raise ValueError(f"--lora does not combine with --method {args.method}: {why}; use "
                         f"{' or '.join(lora.METHODS)}, or train the full student")
    if args.w2sd_finetuned is not None:
        raise ValueError("--lora ships an adapter over a checkpoint file, and with --w2sd-finetuned the student "
                         "would start from a blend of two files; give the W2SD pair as files (--weak, and --strong "
                         "which defaults to --teacher), or train the full student")
    if args.export_diffusers:
        raise ValueError("--export-diffusers writes a full transformer; a LoRA run writes lora.safetensors "
                         "(diffusers' SD3 LoRA format): merge it with `python -m sd3.lora merge` for a full student")
    spec = lora.settings(args.lora, args.lora_alpha, args.lora_targets, args.lora_full)
    if not spec["targets"] and not spec["full"]:
        raise ValueError("--lora-targets none and --lora-full none: nothing would be trained")
    args.lora_alpha, args.lora_dtype = spec["alpha"], args.lora_dtype or "fp32"
    args.lora_targets, args.lora_full = (",".join(spec[k]) or "none" for k in ("targets", "full"))
    return spec


def check_fsdp(args):
    """--fsdp shards a full student across the processes of torchrun; --fsdp-teachers its teachers too."""
    if getattr(args, "fsdp_teachers", False):
        if not args.fsdp:
            raise ValueError("--fsdp-teachers shards the teachers beside a sharded student: it needs --fsdp")
        if args.teacher_sampler == "w2sd" and (args.w2sd_final == "main" or args.w_strong is not None):
            raise ValueError("--fsdp-teachers cannot run --w2sd-final main or --w-strong: their last-step move is a "
                             "teacher forward that only ranks whose batch holds a last step run, and a sharded "
                             "teacher needs every rank in each of its forwards; keep the teachers whole (drop "
                             "--fsdp-teachers)")
    if not getattr(args, "fsdp", False):
        return
    if args.lora is not None:
        raise ValueError("--fsdp does not combine with --lora: FSDP shards a full student and its AdamW state, while "
                         "a LoRA student trains small adapters over the teacher's own frozen weights, which stay whole "
                         "on every rank; train the LoRA student without --fsdp (one process or DDP)")
    if "RANK" not in os.environ:
        raise ValueError("--fsdp shards the student across the processes of torchrun: launch it with torchrun "
                         "--nproc_per_node=N, or leave --fsdp out to train in one process")


def lora_spec(args):
    return lora.settings(args.lora, args.lora_alpha, args.lora_targets, args.lora_full)


def check_args(args, world_size=1):
    """Refuse, before any work, the arguments that cannot work. Returns the micro-batch."""
    if getattr(args, "full", False):
        if args.teacher is not None:
            raise ValueError("--full is the toy world's every-student table; it cannot run with --teacher (real "
                             "SD3): distill one student per run there, with --method and --teacher-sampler")
        if args.method is not None or args.teacher_sampler is not None:
            raise ValueError("--full trains every --method and --teacher-sampler of options.FULL itself: leave "
                             "--method and --teacher-sampler out")
        if world_size > 1:
            raise ValueError("--full runs its students one after another in one process: run it with plain "
                             "python, not torchrun")
        if args.lora is not None:
            raise ValueError("--full distills full students; distill a LoRA student on its own (--lora RANK "
                             "without --full)")
    fill_defaults(args)
    check_numbers(args)
    check_lora(args)
    check_fsdp(args)
    if args.w_min > args.w_max:
        raise ValueError(f"--w-min {args.w_min:g} is larger than --w-max {args.w_max:g}")
    if args.method == "dice" and args.w_min != args.w_max:
        raise ValueError(f"--method dice is trained at ONE guidance (DICE reproduces CFG at a single scale; its "
                         f"release: w = {embed.DICE_W:g}): give --w-min = --w-max, not {args.w_min:g} and {args.w_max:g}")
    cli.at_least(args.global_batch, 1, "--global-batch", why="samples per optimizer step, over all ranks")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ValueError(f"--micro-batch {args.micro_batch}: must be >= 1 (samples per forward per rank)")
    micro = args.micro_batch or args.global_batch // world_size
    if args.global_batch < 1 or micro < 1 or args.global_batch % (world_size * micro):
        raise ValueError(f"--global-batch {args.global_batch} is not divisible by world size {world_size} x "
                         f"--micro-batch {micro} = {world_size * micro}: the accumulation rounds would not be whole")
    if args.teacher is not None and not os.path.exists(args.teacher):
        raise FileNotFoundError(f"--teacher {args.teacher}: no such file or folder")
    if args.teacher_sampler == "w2sd":
        if args.w2sd_finetuned is not None:
            if args.weak is not None or args.strong is not None:
                raise ValueError("--w2sd-finetuned builds the strong and weak models from --teacher and the fine-tune: "
                                 "leave --strong and --weak out")
            if args.teacher is None:
                raise ValueError("--w2sd-finetuned PATH needs --teacher, the base the fine-tune was made from")
        elif args.teacher is not None and args.weak is None:
            raise ValueError("--teacher-sampler w2sd needs a weak model: --weak PATH (any checkpoint; --strong defaults "
                             "to --teacher), or --w2sd-finetuned PATH to build the pair from a fine-tune of --teacher; "
                             "or choose --teacher-sampler cfg or zsampling")
    elif any(v is not None for v in (args.weak, args.strong, args.w2sd_finetuned)):
        raise ValueError("--weak, --strong and --w2sd-finetuned are W2SD's: they need --teacher-sampler w2sd")
    for name in ("weak", "strong", "w2sd_finetuned"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file or folder")
    if args.teacher is not None and args.data is None:
        raise ValueError("--teacher needs --data DIR (a folder written by prepare.py with text embeddings)")
    if args.teacher is None and args.data is not None:
        raise ValueError(f"--data {args.data}: the toy world (no --teacher) trains on its own data; --data goes "
                         "with a real --teacher")
    if args.data is not None and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such folder (a folder written by prepare.py)")
    if args.fused_scale is not None:
        if args.method not in embed.SCALED:
            raise ValueError(f"--fused-scale is the factor of Eq. 7's w term: it applies to --method "
                             f"{' or '.join(embed.SCALED)}, not {args.method}")
        cli.finite(args.fused_scale, "--fused-scale", low=0, low_open=True,
                   why=f"Eq. 7's factor on G(psi(w)) * F(y - y_null); the release's is 1/256 = {embed.RELEASED_SCALE:g}")
    if args.export_diffusers and args.method != "teefusion":
        raise ValueError(f"--export-diffusers writes the authors' txt_align_guidance pipeline format, which only "
                         f"fits --method teefusion (got {args.method}); use the safetensors files in --out")
    if args.export_diffusers and args.fused_scale != embed.RELEASED_SCALE:
        raise ValueError(f"--export-diffusers writes the authors' pipeline format, which computes Eq. 7 at 1/256; this "
                         f"student's --fused-scale is {args.fused_scale:g}: use the safetensors files in --out")
    if args.export_diffusers and export.is_pipeline(args.teacher):  # its parts join the export: all there?
        export.check_components(args.teacher)
    if args.ema is not None and not 0 < args.ema < 1:
        raise ValueError(f"--ema {args.ema}: the decay must be in (0, 1), e.g. 0.9999")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: nothing to train (the student would be the teacher); give at least 1")
    if args.ckpt_every < 1 or args.teacher_steps < 1 or args.keep < 1:
        raise ValueError("--ckpt-every, --teacher-steps and --keep must be >= 1")
    monitor.check_arguments(args)
    if args.tau is not None:
        try:
            args.tau = float(args.tau)
        except ValueError:
            pass
    try:
        samplers.check_tau(samplers.reflection_settings(args.preset, args.w_inv, args.tau, args.teacher_sampler)[1],
                           args.teacher_steps)
    except ValueError as e:
        raise cli.InputError(f"--tau {args.tau}: {e}") from None
    # Algorithm 1's draws for stream position p use seed * 2**32 + p (distill.draw_t_w_eps), p < steps x global batch
    cli.check_seed(args.seed, "--seed", args.seed * 2**32 + args.steps * args.global_batch - 1,
                   "the draws of the last sample use seed * 2**32 + steps x global batch - 1",
                   "use a smaller --seed, --steps or --global-batch")
    cli.check_device(args.device)
    cli.check_memory(8 * (args.teacher_steps + 1), f"the schedule of {args.teacher_steps} steps (its N + 1 times)",
                     "--teacher-steps")
    check_networks(args, micro)
    return micro


W_MAX = 1000  # the largest guidance trained on: psi(1000 w) <= 1e6 keeps float32 steps below 0.1 (the paper: w in [2, 14])
SHIFT_RANGE = (0.01, 100)


def check_numbers(args):
    """Every number of the command line finite and in its range (NaN and inf are refused by name)."""
    why_w = "Algorithm 1's w ~ U[w_min, w_max], the paper's w: CFG = (1 + w) v_c - w v_null, diffusers' 1 + w"
    why_w_max = f"; at most {W_MAX}: the paper trains 2-14, and psi(1000 w) keeps a float32 resolution finer than 0.1 below it"
    cli.finite(args.w_min, "--w-min", low=0, high=W_MAX, why=why_w + why_w_max)
    cli.finite(args.w_max, "--w-max", low=0, high=W_MAX, why=why_w + why_w_max)
    cli.finite(args.lr, "--lr", low=0, high=1, low_open=True,
               why="AdamW's learning rate: each step moves a weight by about lr, and weights are about 0.01-1")
    cli.finite(args.weight_decay, "--weight-decay", low=0, high=1 / args.lr,
               why=f"AdamW's decoupled weight decay: a step multiplies each weight by 1 - lr x decay, which must stay "
                   f">= 0, so at most 1 / --lr = {1 / args.lr:g}")
    cli.finite(args.clip_grad, "--clip-grad", low=0, why="the largest gradient norm; 0 turns clipping off")
    cli.finite(args.shift, "--shift", low=SHIFT_RANGE[0], high=SHIFT_RANGE[1],
               why=f"the schedule's time shift s t / (1 + (s - 1) t), SD3's 3; beyond [{SHIFT_RANGE[0]:g}, "
                   f"{SHIFT_RANGE[1]:g}] the shifted times crowd at 0 or 1 and no longer make a schedule")
    cli.at_least(args.teacher_steps, 1, "--teacher-steps", high=1000,
                 why="the teacher's schedule N: its times are labelled on SD3's 1000-step scale")
    for flag in ("strong_scale", "weak_scale", "main_scale", "w_inv"):
        if getattr(args, flag) is not None:
            cli.finite(getattr(args, flag), "--" + flag.replace("_", "-"))
    for flag in ("w_weak", "w_strong"):
        if getattr(args, flag) is not None:
            cli.finite(getattr(args, flag), "--" + flag.replace("_", "-"), low=0, high=W_MAX,
                       why="a guidance w of Eq. 2" + why_w_max)
    if args.workers is not None:
        cpus = os.cpu_count() or 1
        cli.at_least(args.workers, 0, "--workers", high=4 * cpus,
                     why=f"DataLoader worker processes; more than 4 per CPU ({cpus} here) only compete for them")


def check_networks(args, micro):
    """The teacher (and W2SD pair) from their headers, before anything loads: each a loadable MMDiT
    (every key and shape), all taking the same inputs, the fine-tune the base's own architecture, the
    data's latents, text embeddings and image size fitting them, a LoRA rank the layers allow, and no
    final file of --out that is one of them."""
    networks = [(f"--{n.replace('_', '-')}", getattr(args, n)) for n in ("teacher", "strong", "weak", "w2sd_finetuned")
                if getattr(args, n) is not None]
    outputs = ["student.safetensors", "student-ema.safetensors", "fusion.safetensors", "fusion-ema.safetensors",
               "lora.safetensors", "lora-ema.safetensors", "log.jsonl"]
    cli.not_an_input([("--out", os.path.join(args.out, name)) for name in outputs], networks)
    if not networks:  # the toy world: its teacher fits its data by construction
        import toy

        cfg = toy.TEACHER_CONFIG
        check_micro_batch_memory(micro, (cfg.in_channels, toy.H, toy.W), (toy.TOKENS, cfg.context_dim),
                                 cfg.pooled_dim)
        if args.lora is not None:
            lora.check_rank(lora_spec(args), toy.TEACHER_CONFIG, "--lora")
        return
    configs = [(flag, path, mmdit.read_config(path)) for flag, path in networks]
    flag0, path0, base = configs[0]
    for flag, path, cfg in configs[1:]:
        if (cfg.in_channels, cfg.context_dim, cfg.pooled_dim) != (base.in_channels, base.context_dim, base.pooled_dim):
            raise ValueError(f"{flag} {path} does not take {flag0}'s inputs: {cfg.in_channels} latent channels, "
                             f"context {cfg.context_dim}, pooled {cfg.pooled_dim} vs {base.in_channels}, "
                             f"{base.context_dim}, {base.pooled_dim}")
        if flag == "--w2sd-finetuned" and cfg != base:
            raise ValueError(f"--w2sd-finetuned {path} is not a fine-tune of --teacher {path0}: another architecture")
    if args.lora is not None:
        lora.check_rank(lora_spec(args), base, "--lora")
    if args.data is not None:
        check_data_fits(args.data, configs, micro)


def check_data_fits(folder, configs, micro):
    """The shards of prepare.py (index.json) against the networks: latent channels, text widths, and a
    latent size the position table and the patches allow; and a micro-batch whose float32 inputs (x0,
    eps and x_t, context, y) fit the memory there is."""
    from prepare import read_index, sample_shapes

    index = read_index(folder)
    if not index["settings"]["text"]:
        raise ValueError(f"--data {folder} holds no text embeddings (prepared without --text-encoders): "
                         "Algorithm 1 needs c and the null prompt's; run prepare.py with --text-encoders")
    shapes = sample_shapes(folder, index)
    if shapes is None:
        return  # no samples: refused where the data set is opened
    (C, h, w), (L, Dc), (Dy,) = shapes["latents"], shapes["context"], shapes["y"]
    for flag, path, cfg in configs:
        p, M = cfg.patch_size, cfg.pos_embed_max_size
        if (C, Dc, Dy) != (cfg.in_channels, cfg.context_dim, cfg.pooled_dim):
            raise ValueError(f"--data {folder} does not fit {flag} {path}: latents of {C} channels, context {Dc}, "
                             f"pooled {Dy}; the network takes {cfg.in_channels}, {cfg.context_dim}, {cfg.pooled_dim}")
        if h % p or w % p or h > M * p or w > M * p:
            raise ValueError(f"--data {folder}: latents of {h} x {w} do not fit {flag} {path}, whose position table "
                             f"holds {M} x {M} patches of {p} x {p}: at most {M * p} latent pixels per side "
                             f"({M * p * 8} px), a multiple of {p}")
    check_micro_batch_memory(micro, (C, h, w), (L, Dc), Dy)


def check_micro_batch_memory(micro, latent, context, pooled):
    """A micro-batch's float32 inputs (x0, eps and x_t of `latent` (C, h, w), the context (L, Dc), the
    pooled text (Dy,)) against the memory there is."""
    (C, h, w), (L, Dc) = latent, context
    cli.check_memory(micro * 4 * (3 * C * h * w + L * Dc + pooled), f"a micro-batch of {micro} samples in float32",
                     "--micro-batch (or --global-batch)")


def full_runs(args):
    """--full: the arguments of each student run of FULL (one per subfolder of --out, no report of
    its own). Refuses what --full cannot do (check_args)."""
    check_args(copy.copy(args), int(os.environ.get("WORLD_SIZE", 1)))
    out = args.out or "runs/full"
    runs = []
    for name, method, sampler in FULL:
        sub = copy.copy(args)
        sub.full, sub.no_report, sub.method, sub.teacher_sampler = False, True, method, sampler
        sub.out = os.path.join(out, name)
        runs.append(fill_defaults(sub))
    return out, runs
