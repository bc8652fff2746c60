"""
Watching a distillation run while it trains: sample grids, the gradient norm, and an optional
TensorBoard log. run/training.py calls `Monitor` once per step of distill.py; nothing here changes what it
trains.

    python distill.py --sample-every 250 --out runs/toy      # toy world: runs/toy/samples/step-NNNNNNN.png
    torchrun --nproc_per_node=8 distill.py --teacher T --data D ... --sample-prompts prompts.txt \\
        --report-to tensorboard                              # then: tensorboard --logdir runs/teefusion/tensorboard

A sample grid (OUT/samples/step-NNNNNNN.png, one per sampled step, written atomically by rank 0):

    rows     the sample prompts: --sample-prompts FILE (a .txt, .json or .jsonl, as generate.py reads
             them); without it, in the toy world 4 held-out DEV prompts (never trained on), with a real
             teacher the first 4 captions of --data (their text embeddings are in the shards, so no text
             encoder has to load; they are TRAINING captions: give a FILE for held-out ones)
    columns  the teacher with its sampler (--teacher-sampler, its reflection settings and W2SD pair) at
             w | the student at the same seed and w | the student at --w-min | the student at --w-max,
             where w is 5 (the released student's w) clipped into [--w-min, --w-max]

Every image starts from torch.Generator("cpu").manual_seed(--seed) (generate.py's image 0 of a prompt)
and is sampled with samplers.sample on SD3's shifted schedule with --teacher-steps steps: the student
with "student" (samplers.student_steps, one forward per step, z of Eq. 7), the EMA weights with --ema.
So every grid of a run shows the same noise, and a student cell equals
`generate.py --method student --seed SEED --steps N` on that step's checkpoint. The teacher column does
not change during a run: it is sampled at the first grid of a launch and reused. With a real teacher the
images are decoded by the SD3 VAE (--vae, else the teacher's own: a pipeline folder's vae/ or a single
file's first_stage_model.*, else the VAE prepare.py recorded in --data/index.json); prompts from a FILE
are encoded by the text encoders of --text-encoders, the teacher's pipeline folder, or index.json, once
at the start (then freed). The seconds a grid took are the step's `sample_s` in log.jsonl.

Sampling leaves the training bitwise unchanged: its noise comes from its own generators (the global torch
RNG is never drawn from), the student is put in eval mode for it and back in train mode after, and it runs
without gradients (tests/run/test_monitor.py trains 3 steps with and without grids: equal checkpoints). Under
torchrun only rank 0 samples; the other ranks wait for it at their next collective.

--report-to tensorboard writes OUT/tensorboard/ (torch.utils.tensorboard, which needs the `tensorboard`
package: only imported when asked for, refused with one `error:` line when it is missing): per step the
loss, lr, gradient norm, teacher and student milliseconds and samples per second (the fields of
log.jsonl), and every sample grid as an image.
"""

import gc
import os
import time
from contextlib import nullcontext

import torch
from PIL import Image
from tqdm import tqdm

import samplers
from evaluation.plots import image_grid
from sd3 import text_encoders

GRID_PROMPTS = 4  # rows of a grid when no --sample-prompts FILE is given
GRID_W = 5.0  # the released student's w: the teacher's column and the student's first one
CELL = 256  # the widest a cell is drawn (SD3 images are scaled down to it; toy images scaled up)
TOY_CELL = 128  # toy images (8 x 16) are drawn 8x larger, nearest neighbour
REPORT_TO = ("tensorboard",)


# -----------------------------------------------------------------------------
# Command line (run/options.py adds these to distill.py's parser and calls check_arguments)


def add_arguments(p):
    p.add_argument("--sample-every", type=int, default=None, metavar="N",
                   help="a sample grid every N steps and at the last one, into OUT/samples/ (default: at each "
                        "checkpoint, where a VAE is at hand; 0: none). Rows: the prompts; columns: the teacher at w "
                        "= 5 | the student at w = 5 (same seed) | the student at --w-min | at --w-max")
    p.add_argument("--sample-prompts", default=None, metavar="FILE",
                   help="the grid's prompts (.txt one per line, .json list, .jsonl with 'prompt'); default: 4 "
                        "held-out DEV prompts in the toy world, the first 4 captions of --data with --teacher")
    p.add_argument("--vae", default=None, help="--teacher: the SD3 VAE that decodes the grids (default: the "
                                                "teacher's own, else the one --data/index.json names)")
    p.add_argument("--text-encoders", default=None, help="--teacher with --sample-prompts: a folder in the diffusers "
                   "layout (default: the teacher's pipeline folder, else the one --data/index.json names)")
    p.add_argument("--report-to", default=None, choices=REPORT_TO,
                   help="also log to TensorBoard in OUT/tensorboard (needs `pip install tensorboard`)")


def check_arguments(args):
    """Before anything heavy: the sampling flags, the files they name, and the TensorBoard package.
    Decides args.sample_every (0 when no grid will be drawn). A real teacher's grids need a VAE:
    asked for explicitly (--sample-every N > 0, --sample-prompts, --vae) and none is found, it is an
    error; by default the run goes on without grids, and its first lines say so (Monitor)."""
    if args.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard's backend)
        except ImportError:
            raise ValueError("--report-to tensorboard needs the `tensorboard` package, which is not installed: "
                             "pip install tensorboard (or leave --report-to out)") from None
    if args.sample_every is not None and args.sample_every < 0:
        raise ValueError(f"--sample-every {args.sample_every}: give a number of steps >= 1, or 0 for no grids")
    asked = bool(args.sample_every) or args.sample_prompts is not None or args.vae is not None
    if args.sample_every == 0:
        if args.sample_prompts is not None:
            raise ValueError("--sample-prompts goes with sample grids, and --sample-every 0 turns them off")
        return args
    if args.sample_prompts is not None:
        import generate  # its prompt-file reader; nothing heavy

        generate.load_prompts(args.sample_prompts)  # refuses a missing or empty file
    for flag in ("vae", "text_encoders"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    if args.teacher is None:
        if args.vae is not None or args.text_encoders is not None:
            raise ValueError("--vae and --text-encoders go with --teacher: the toy world's images need no VAE and it "
                             "brings its own text encoders")
    else:
        if vae_source(args) is None:
            if asked:
                raise FileNotFoundError(f"--teacher {args.teacher} holds no VAE and --data/index.json names none: the "
                                        "sample grids need one to decode, give --vae PATH (or --sample-every 0)")
            args.sample_every = 0
            return args
        if args.sample_prompts is not None and text_encoders_source(args) is None:
            raise FileNotFoundError(f"--sample-prompts {args.sample_prompts}: no text encoders to encode them (the "
                                    "teacher is not a pipeline folder and --data/index.json names none); give "
                                    "--text-encoders FOLDER")
    if args.sample_every is None:
        args.sample_every = args.ckpt_every
    return args


def _index_sources(data):
    """What prepare.py recorded in --data/index.json about the VAE and text encoders ({} if nothing)."""
    import json

    try:
        with open(os.path.join(data, "index.json"), encoding="utf-8") as f:
            sources = json.load(f).get("sources")
    except (OSError, ValueError, AttributeError):
        return {}
    return sources if isinstance(sources, dict) else {}


def _holds_vae(path):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return any(k.startswith("first_stage_model.") for k in f.keys())
    except Exception:  # not a safetensors file: load_mmdit names the problem later
        return False


def vae_source(args):
    """The VAE that decodes a real teacher's grids: --vae, the teacher's own, or index.json's; None if none."""
    if args.vae is not None:
        return args.vae
    if os.path.isdir(os.path.join(args.teacher, "vae")):
        return os.path.join(args.teacher, "vae")
    if os.path.isfile(args.teacher) and _holds_vae(args.teacher):
        return args.teacher
    path = _index_sources(args.data).get("vae") if args.data else None
    return path if isinstance(path, str) and os.path.exists(path) else None


def text_encoders_source(args):
    """The folder whose text encoders encode --sample-prompts with a real teacher; None if none."""
    if args.text_encoders is not None:
        return args.text_encoders
    if os.path.isdir(os.path.join(args.teacher, "text_encoder")):
        return args.teacher
    path = _index_sources(args.data).get("text_encoders") if args.data else None
    return path if isinstance(path, str) and os.path.isdir(path) else None


# -----------------------------------------------------------------------------
# The gradient norm (log.jsonl's grad_norm)


def grad_norm(params):
    """The global L2 norm of the gradients (what clip_grad_norm_ returns), without changing them. With
    --fsdp the gradients are shards (DTensor): their norm is a collective, so every rank calls this."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


# -----------------------------------------------------------------------------
# TensorBoard


def tensorboard_writer(folder, purge_step):
    """torch.utils.tensorboard's SummaryWriter (imported here: only a run that asks for it needs the package)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(folder, purge_step=purge_step)


SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "samples_per_s": "speed/samples_per_s", "sample_s": "speed/sample_grid_s"}
MILLISECONDS = {"teacher_s": "speed/teacher_ms", "student_s": "speed/student_ms", "step_s": "speed/step_ms"}


class TensorBoard:
    """log.jsonl's records as TensorBoard scalars, and the sample grids as images."""

    def __init__(self, folder, start):
        # purge_step: a resumed run drops the events of the steps it trains again
        self.writer = tensorboard_writer(folder, start if start > 0 else None)

    def record(self, record):
        step = record["step"]
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        for key, tag in MILLISECONDS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, 1000 * record[key], step)

    def image(self, tag, image, step):
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")  # (H, W, 3) uint8

    def close(self):
        self.writer.flush()
        self.writer.close()


# -----------------------------------------------------------------------------
# Sample grids


class Monitor:
    """distill.py's hook: after each optimizer step, `step(done, record)` draws the sample grid when one is
    due (returning {"sample_s": seconds} to add to the step's log record) and sends the record to TensorBoard.
    Only rank 0 builds anything; on the other ranks every call does nothing.

    nets: {"student": the Student module to sample (the EMA's with --ema), "teacher", "weak", "main"} as
    distill.py holds them; null: (context_null (1, L, Dc), y_null (1, Dy)) on the device; bf16: (teacher,
    student) run under bf16 autocast, as in training; world: the toy world or None."""

    def __init__(self, args, rank, start, dataset, world, nets, null, bf16, device):
        self.args, self.active = args, rank == 0
        self.every = args.sample_every or 0
        if self.every and getattr(args, "fsdp", False):
            # rank 0 alone cannot run a sharded student: sampling would need every rank (not built)
            self.every = 0
            if rank == 0:
                print("sample grids: none with --fsdp (a sharded student samples only with every rank taking part, "
                      "which the grids do not do); generate.py on a checkpoint's student shows the same")
        self.board = None
        self.grid_inputs, self.teacher_images = None, None
        if not self.active:
            return
        self.nets, self.null, self.bf16, self.device, self.world = nets, null, bf16, device, world
        if args.report_to == "tensorboard":
            self.board = TensorBoard(os.path.join(args.out, "tensorboard"), start)
        if self.every:
            self.grid_inputs = self._inputs(dataset)
        elif args.teacher is not None and vae_source(args) is None:
            print("sample grids: none, the teacher holds no VAE and --data/index.json names none (give --vae PATH)")

    def due(self, step):
        return bool(self.every) and (step % self.every == 0 or step == self.args.steps)

    def step(self, done, record):
        """After optimizer step `done` (rank 0's log record of it): the grid if due, TensorBoard."""
        extra = {}
        if self.active and self.due(done):
            extra["sample_s"] = self.grid(done)
        if self.board is not None:
            self.board.record({**record, **extra})
        return extra

    def close(self):
        if self.board is not None:
            self.board.close()
            self.board = None

    # --- what a grid is made of

    def _inputs(self, dataset):
        """The grid's prompts (labels, context (P, L, Dc), y (P, Dy), on the CPU), the noise and the decoder."""
        args = self.args
        if args.sample_prompts is not None:
            import generate

            labels = generate.load_prompts(args.sample_prompts)
            context, y = self._encode(labels, dataset)
        elif self.world is not None:
            import toy

            spread = toy.DEV_PROMPTS[::len(toy.DEV_PROMPTS) // GRID_PROMPTS][:GRID_PROMPTS]  # across the sorted list
            labels = [toy.caption(*p) for p in spread]  # held out: never trained on
            context, y = self.world.encoders.encode(labels)  # (P, L, Dc), (P, Dy)
        else:  # the first captions of --data, with their stored text embeddings
            items = [dataset[i] for i in range(min(GRID_PROMPTS, len(dataset)))]
            labels = [item.get("caption", f"sample {i}") for i, item in enumerate(items)]
            context = torch.stack([item["context"] for item in items]).float()  # (P, L, Dc)
            y = torch.stack([item["y"] for item in items]).float()  # (P, Dy)
        C, H, W = dataset[0]["latents"].shape  # the training data's latent size (toy: the 3 x 8 x 16 image)
        cfg = self.nets["teacher"].config
        if C != cfg.in_channels:
            raise ValueError(f"the data's latents have {C} channels, the teacher takes {cfg.in_channels}")
        # generate.py's noise for image 0 of a prompt: seed, on the CPU in float32; never the global RNG
        noise = torch.randn((1, C, H, W), generator=torch.Generator("cpu").manual_seed(args.seed))  # (1, C, H, W)
        decoder = None
        if self.world is None:
            from sd3 import vae

            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            decoder = vae.load_vae(vae_source(args), self.device, dtype)
            if decoder.config.latent_channels != C:
                raise ValueError(f"the VAE {vae_source(args)} decodes {decoder.config.latent_channels} latent channels, "
                                 f"the data has {C}")
        return dict(labels=labels, context=context.cpu(), y=y.cpu(), noise=noise.expand(len(labels), -1, -1, -1),
                    decoder=decoder)

    def _encode(self, prompts, dataset):
        """--sample-prompts through the text encoders (toy world: its own; SD3: loaded, used, freed)."""
        if self.world is not None:
            return self.world.encoders.encode(prompts)

        context_null = dataset.null()[0]  # (1, L, Dc): the data's token count and width
        sources = _index_sources(self.args.data)
        use_t5 = bool(sources.get("use_t5", True))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        encoders = text_encoders.TextEncoders.from_pretrained(text_encoders_source(self.args), self.device, dtype, use_t5=use_t5,
                                                      max_t5_tokens=context_null.shape[1] - 77,
                                                      context_dim=context_null.shape[2])
        context, y = encoders.encode(prompts)  # (P, L, Dc), (P, Dy)
        del encoders
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if context.shape[1:] != context_null.shape[1:]:
            raise ValueError(f"--sample-prompts encode to context {tuple(context.shape[1:])}, the data's is "
                             f"{tuple(context_null.shape[1:])}: give the --text-encoders --data was prepared with")
        return context.float().cpu(), y.float().cpu()

    def columns(self):
        """[(label, method, w)] of the grid: the teacher at w, the student at w, w_min and w_max."""
        a = self.args
        w = min(max(GRID_W, a.w_min), a.w_max)
        return [(f"teacher {a.teacher_sampler} w={w:g}", a.teacher_sampler, w), (f"student w={w:g}", "student", w),
                (f"student w={a.w_min:g}", "student", a.w_min), (f"student w={a.w_max:g}", "student", a.w_max)]

    def sample(self, method, w):
        """Images (P, 3, H, W) in [-1, 1] on the CPU, float32: the teacher with its sampler, or the student."""
        a, g, nets = self.args, self.grid_inputs, self.nets
        dev = self.device
        context, y, noise = g["context"].to(dev), g["y"].to(dev), g["noise"].to(dev)  # (P, L, Dc), (P, Dy), (P, C, H, W)
        context_null, y_null = self.null
        if method == "student":
            student = nets["student"]
            net, extra, bf16 = student.model, dict(fusion=student.fusion), self.bf16[1]
        else:
            net, bf16 = nets["teacher"], self.bf16[0]
            extra = dict(weak=nets["weak"], main=nets["main"], preset=a.preset, w_inv=a.w_inv, tau=a.tau,
                         w_weak=a.w_weak, w_strong=a.w_strong)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.no_grad(), amp:
            x0, _ = samplers.sample(method, net, noise, context, y, context_null, y_null, w=w, steps=a.teacher_steps,
                                    shift=a.shift, **extra)  # (P, C, H, W)
            images = x0.float() if g["decoder"] is None else g["decoder"].decode(x0.float())  # (P, 3, H', W')
        return images.float().cpu()

    def grid(self, step):
        """Draw OUT/samples/step-NNNNNNN.png; returns the seconds it took."""
        from sd3 import vae

        start = time.perf_counter()
        student = self.nets["student"]
        mode = student.training
        student.eval()  # the MMDiT has no dropout or batch norm: eval() changes no number, it says what happens
        try:
            cells = []
            for label, method, w in self.columns():
                if method != "student" and self.teacher_images is not None:
                    cells.append(self.teacher_images)  # the teacher does not change during a run
                    continue
                images = self.sample(method, w)
                if method != "student":
                    self.teacher_images = images
                cells.append(images)
        finally:
            student.train(mode)
        P = len(self.grid_inputs["labels"])
        pictures = [vae.to_pil(images) for images in cells]  # per column, P PIL images
        rows = [[column[i] for column in pictures] for i in range(P)]  # prompts x columns
        first = rows[0][0]
        toy_world = self.world is not None
        cell = TOY_CELL if toy_world else min(CELL, first.width)
        path = os.path.join(self.args.out, "samples", f"step-{step:07d}.png")
        grid = image_grid(rows, path, self.grid_inputs["labels"], [label for label, _, _ in self.columns()], cell,
                          Image.NEAREST if toy_world else Image.BICUBIC)
        seconds = time.perf_counter() - start
        if self.board is not None:
            self.board.image("samples", grid, step)
        tqdm.write(f"sample grid: {path} ({seconds:.1f} s)")
        return seconds
