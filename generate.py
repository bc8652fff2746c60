"""
Text to image: prompts -> PNGs with any sampler of the paper, on SD3 or on the toy world.

    python generate.py --model /w/stable-diffusion-3-medium-diffusers --method cfg --w 5 --steps 50 \\
        --prompt "a photo of a cat" --n-per-prompt 4 --out runs/gen/cfg
    python generate.py --model /w/sd3_medium.safetensors --text-encoders /w/stable-diffusion-3-medium-diffusers \\
        --method student --student runs/teefusion/student.safetensors --w 5 --prompts prompts.txt --out runs/gen/st
    python generate.py --toy --method student --student runs/toy/student.safetensors \\
        --prompt "a red plus left of a blue square"        # after `python distill.py`; -> runs/generate
    python generate.py --model /w/stable-diffusion-3-medium-diffusers --method student \\
        --lora runs/lora/lora.safetensors --prompt "a photo of a cat"   # a LoRA student over --model's MMDiT

Methods (samplers.py). --w is the paper's w everywhere (Eq. 2: (1 + w) v(c) - w v(null)), so diffusers'
guidance_scale is g = 1 + w. The authors' released TeEFusion pipeline is the exception: its
`guidance_scale` IS the paper's w (fed to psi directly), so `--method student --w 5` matches its
guidance_scale=5, and `--w-rounding model` forms 1000 w in the model dtype as it does (bf16: 4992), where training formed it in
float32 (`python -m evaluation.toy_study rounding --student FILE` measures what that changes).

    euler      the unguided teacher (diffusers' guidance_scale 1: the conditional model alone); no --w
    cfg        Euler + CFG (Eq. 2)
    zsampling  Z-Sampling + CFG (Eq. 3-4), reflection settings --preset flow (default) | sdxl
    w2sd       W2SD + CFG: denoise with a strong model, invert with a weak one, move with the strong one
               (Eq. 4), or with main = base + 0.8 delta (--w2sd-main). The pair: --strong/--weak, or as
               the W2SD release, --w2sd-finetuned F: delta = F - base, strong / weak = base +- 1.5 delta
    student    a student written by distill.py (--student; its method from the file's metadata,
               student_file.load_student): ONE forward per step with z of Eq. 7. Or --lora PATH: an adapter
               (distill.py --lora, diffusers' SD3 LoRA format) over --model's MMDiT (the toy teacher with
               --toy), merged in float32 as it loads (lora.load_student)

The negative prompt (default: the empty string, the paper's null prompt) is the null branch of CFG and
of the reflection samplers; for the student it is y_null of Eq. 7 (its pooled vector only). A student is
trained with the empty string as y_null only (Algorithm 1, as the release does): a negative prompt at
generation puts it where it was never trained, and what it does there is untested.

Noise (docs/DESIGN.md, "The sampling schedule"): image k of a prompt starts from torch.randn(1, 16, H/8, W/8,
generator=torch.Generator("cpu").manual_seed(seed + k)) in float32, moved to the device. That is what
diffusers' StableDiffusion3Pipeline draws with generator=torch.Generator("cpu").manual_seed(seed + k), so
a seed gives the same image in both (tests/test_generate.py: within 1e-4 at a tiny size), and the same
image on CPU and GPU up to the dtype. Image sizes: --res R for R x R, or --height H --width W (multiples
of 16, each side within the MMDiT's position table: 192 patches of 16 px, 3072 px, for SD3-medium); a
non-square image is drawn the same way, its noise (1, 16, H/8, W/8) (tests/test_generate.py: 64 x 96 and
96 x 64 against diffusers).

Order of work, so that SD3-medium with T5 fits a 24 GB GPU in bf16 (an ESTIMATE, no GPU was at hand:
`python benchmarks/memory_generate.py` gives 11.6 GB while the text encoders run, then 6.4 GB for one
MMDiT and the VAE, 14.5 GB for W2SD with --w2sd-main; 17.5 GB and 25.6 GB if all were held at once):
    1. the text encoders encode every prompt that still needs an image, and the negative prompt; they
       are freed, the embeddings wait on the CPU (2.7 MB per prompt in bf16 with T5's 256 tokens);
    2. the MMDiT(s) and the VAE load; per batch of --batch images: noise, samplers.sample, VAE decode,
       PNGs written atomically (a temporary file renamed: a killed run leaves no half image);
    3. the contact sheet OUT/contact.png, then OUT/index.jsonl (every image's record, in job order).

Output: OUT/images/PPPPP-KK.png (prompt P, image K, seed + K) with the prompt, negative prompt, method,
w, steps, seed, height, width, NFE, model file name, seconds per image (sampling + decoding) in its PNG text metadata;
OUT/index.jsonl holds the same records with each PNG's size ("bytes"). Relaunching the same command
finishes the job: images already there are skipped if made with the same settings (else: an error), and
trusted when a record lists them with their size (run/image_folder.py: a truncated or empty PNG is made
again); a finished run relaunched writes nothing. --toy: the toy world of toy.py (its cached teacher,
W2SD pair and text encoders; images are its 16 x 16 latents, saved 8x larger with nearest neighbour).

Many GPUs (torchrun; gloo on CPU, NCCL on CUDA), one shared --out: the images still to make are cut into
batches of --batch as one process would cut them, and rank r makes batches r, r + N, r + 2N, ...; each
image is written by one rank, each as in one process (its noise comes from seed + k alone; its batch and
its prompt's text-encoder chunk are those of one process), and rank 0 merges the records into index.jsonl
in job order at the end. A kill of the whole job is resumed by the same command line.
    torchrun --nproc_per_node 8 generate.py --model /w/stable-diffusion-3-medium-diffusers --method w2sd \
        --w2sd-finetuned /w/sd3_finetune.safetensors --prompts prompts.txt --n-per-prompt 4 --out runs/gen/w2sd

Shape legend: B batch, C latent channels, h w latent size, L tokens, Dc context width, Dy pooled width.
"""

import argparse
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from run import cli
import embed
from run import image_folder
from sd3 import lora
import mmdit
from run import ranks
import samplers
from sd3 import vae
from sd3.checkpoint import atomic_write  # the project's one atomic-write mechanism
from evaluation.plots import image_grid
from sd3 import student_file, text_encoders

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CLIP_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
DEFAULT_W = 5.0  # the w of the authors' released inference example
TOY_VIEW = 8  # toy images are saved this many times larger (nearest neighbour)
SHEET = (8, 8)  # the contact sheet: at most this many prompts x images per prompt
ENCODE_CHUNK = 16  # prompts through the text encoders at once
SD3_TOKENS = 77 + 256  # text tokens per prompt: CLIP's 77, then T5's 256 (zeros with --no-t5)
RECORD_BYTES = 1000  # memory of one image's record (a dict of about 25 fields), a lower bound
# the fields of a PNG's record that must match for an existing image to count as done
SETTINGS = ("prompt", "negative_prompt", "method", "w", "steps", "seed", "model", "student", "student_method",
            "height", "width", "dtype", "preset", "w_rounding", "no_t5", "w2sd", "lora", "weights")
WEIGHTS = ("model", "student", "lora", "strong", "weak", "w2sd_finetuned", "vae", "text_encoders")  # their fingerprints: "weights"


# -----------------------------------------------------------------------------
# Prompts and pictures


def load_prompts(path):
    """A list of prompts from a .txt (one per line), .json (a list of strings) or .jsonl (one object per
    line with a string "prompt"). Anything else in the file (null, a number, an object where a string
    belongs, a JSON syntax error, text that is not UTF-8) is refused with the file and the entry named:
    a prompt is never made up from a value that is not one."""
    cli.regular_file(path, f"prompts {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts: no file {path!r} (expected .txt one prompt per line, a .json list, "
                                f"or .jsonl with a 'prompt' field)")
    name = f"prompts {path}"
    text = cli.read_text(path, name)
    if path.endswith(".jsonl"):
        prompts = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                with cli.reading(path, f"{name} line {n}"):
                    row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{name} line {n}: expected an object with a string \"prompt\", got "
                                     f"{_excerpt(row)}")
                prompts.append(row["prompt"])
    elif path.endswith(".json"):
        with cli.reading(path, name):
            data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{name}: not a JSON list of strings (got {type(data).__name__})")
        bad = [(i, p) for i, p in enumerate(data) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"{name}: entry {bad[0][0]} is {_excerpt(bad[0][1])}, not a string (a JSON list of "
                             f"prompt strings is expected; {len(bad)} such entries)")
        prompts = data
    else:
        prompts = [line for line in text.split("\n") if line.strip()]
    if not prompts:
        raise ValueError(f"prompts: {path!r} holds no prompts")
    return prompts


def _excerpt(value, n=40):
    text = json.dumps(value)
    return text if len(text) <= n else text[:n] + "..."


def write_text(path, text):
    """A text file, atomically; left as it is when it already holds `text` (a relaunch changes nothing)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, keep_same=True)


def save_png(image, path, record):
    """A PIL image with `record` in its text metadata (each field, and all of it as JSON under
    "teefusion"), written atomically."""
    info = PngInfo()
    for k, v in record.items():
        info.add_text(k, "" if v is None else str(v))
    info.add_text("teefusion", json.dumps(record))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_record(path):
    with Image.open(path) as im:
        text = im.info.get("teefusion")
    if text is None:
        raise ValueError(f"{path}: a PNG without generate.py's metadata; use another --out")
    return json.loads(text)


# -----------------------------------------------------------------------------
# Arguments, and every check that can be made before anything heavy loads


def add_arguments(parser, exclude=()):
    """The generation arguments (shared with `evaluate.py table4`, which leaves out `exclude`)."""
    def add(*names, **kw):
        if names[0] not in exclude:
            parser.add_argument(*names, **kw)

    add("--model", help="SD3 MMDiT: a diffusers pipeline folder (its text encoders and VAE are the defaults), "
        "a transformer folder or a Stability single file (whose first_stage_model.* VAE is the default)")
    add("--text-encoders", help="a folder in the diffusers layout: text_encoder, tokenizer, text_encoder_2, "
        "tokenizer_2 (CLIP-L, CLIP-G), text_encoder_3, tokenizer_3 (T5) (default: --model's)")
    add("--vae", help="SD3 VAE: a Stability file, VAE file or diffusers vae/ folder (default: --model's)")
    add("--toy", action="store_true", help="the toy world of toy.py instead of SD3 (built, or reused, in "
        "--toy-cache): its teacher, W2SD pair and text encoders; no --model")
    add("--toy-cache", default="cache/toy", help="where the toy world is cached (default cache/toy)")
    add("--method", default="cfg", choices=samplers.METHODS, help="the sampler (default cfg)")
    add("--w", type=float, help=f"the paper's guidance w >= 0 (Eq. 2; diffusers' guidance_scale is 1 + w; the "
        f"released TeEFusion pipeline's guidance_scale is w itself); default {DEFAULT_W}; none for euler")
    add("--steps", type=int, default=50, help="sampling steps (default 50, the released student's)")
    add("--prompt", action="append", help="a prompt (repeat for several)")
    add("--prompts", help="a prompt file: .txt one per line, .json list, .jsonl with a 'prompt' field")
    add("--negative-prompt", default="", help="the null branch of CFG and of the reflection samplers; for the "
        "student, y_null of Eq. 7 (its pooled vector only; students are trained with the empty string alone, so "
        "another y_null is untrained). Default: the empty string (the paper's null prompt)")
    add("--seed", type=int, default=0, help="image k of every prompt uses seed + k (as diffusers' generator)")
    add("--n-per-prompt", type=int, default=1, help="images per prompt")
    add("--res", type=int, help="a square image's side in pixels, a multiple of 16 (default 1024; the toy world has its "
        "own): the shorthand for --height RES --width RES")
    add("--height", type=int, help="image height in pixels, a multiple of 16 within the MMDiT's position table "
        "(default --res)")
    add("--width", type=int, help="image width in pixels, a multiple of 16 within the MMDiT's position table "
        "(default --res)")
    add("--out", default="runs/generate", help="output folder: OUT/images/*.png, OUT/index.jsonl, OUT/contact.png "
        "(default runs/generate)")
    add("--student", help="--method student: the student's MMDiT as distill.py writes it (fusion.safetensors "
        "beside it for distillcfg / dice), or a diffusers transformer folder with txt_align_guidance")
    add("--lora", help="--method student: a LoRA student, its adapter file (distill.py --lora writes lora.safetensors; "
        "diffusers' SD3 LoRA format) over --model's MMDiT, or the toy teacher with --toy")
    add("--student-method", choices=sorted(embed.FUSIONS), help="the student's method, for files whose "
        "metadata does not say it (default: the metadata's teefusion_method)")
    add("--w-rounding", choices=("float32", "model"), default="float32", help="student only: form 1000 w in "
        "float32 (this project's students) or in the model dtype, as the authors' released pipeline does "
        "(to reproduce images of their released bf16 weights)")
    add("--strong", help="w2sd: the strong model (default: --model's transformer)")
    add("--weak", help="w2sd: the weak model")
    add("--w2sd-finetuned", help="w2sd: a fine-tune of --model's transformer; the pair is built from "
        "delta = fine-tune - base (W2SD's release): strong = base + 1.5 delta, weak = base - 1.5 delta")
    add("--strong-scale", type=float, default=1.5, help="w2sd with --w2sd-finetuned: strong = base + s delta")
    add("--weak-scale", type=float, default=-1.5, help="w2sd with --w2sd-finetuned: weak = base + s delta")
    add("--w2sd-main", action="store_true", help="w2sd: move after the reflection with a main model (the W2SD "
        "release: base + 0.8 delta with --w2sd-finetuned, else --model) instead of the strong one (Eq. 4)")
    add("--main-scale", type=float, default=0.8, help="w2sd with --w2sd-finetuned --w2sd-main")
    add("--preset", choices=sorted(samplers.PRESETS), default="flow", help="zsampling's reflection "
        "settings: flow (the Z-Sampling authors' SD3.5 code, default) or sdxl; w2sd inverts at t (Eq. 3)")
    add("--no-t5", action="store_true", help="run without T5 (its tokens are zeros, as SD3 allows)")
    add("--dtype", choices=sorted(DTYPES), help="bf16 (default on CUDA) | fp16 | fp32 (default on CPU); "
        "T5 never runs in fp16 (bf16 instead), the VAE runs in fp32 under fp16")
    add("--device", help="cuda or cpu (default: cuda when available)")
    add("--batch", type=int, default=1, help="images sampled at once (default 1)")


def build_parser():
    parser = cli.parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


@dataclass
class Plan:
    """Everything checked and resolved before anything heavy loads."""
    args: argparse.Namespace
    prompts: list
    jobs: list  # (prompt index, image index k) of every image of the run
    done: dict  # job -> record of the images already there (rank 0's view under torchrun; None on other ranks)
    size: tuple  # (height, width) in pixels
    device: torch.device
    dtype: torch.dtype
    record: dict  # the settings every image of the run carries
    text_encoders: str = None
    vae: str = None
    student_method: str = None
    world: object = field(default=None, repr=False)
    broken: list = field(default_factory=list)  # (job, why) of the files there that are truncated or unreadable
    finished: bool = False  # set by run: every output was already there, nothing was written


def _need(path, flag):
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"{flag}: no file or folder {path!r}")


def _holds_vae(path):
    """Does a safetensors file hold a VAE (Stability single file: first_stage_model.*)? Header only."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return any(k.startswith("first_stage_model.") for k in f.keys())


def _sources(a):
    """(text-encoder folder, VAE path) from --text-encoders / --vae, else from what --model holds."""
    pipeline = os.path.isdir(a.model) and os.path.isdir(os.path.join(a.model, "transformer"))
    encoders = a.text_encoders or (a.model if pipeline else None)
    if encoders is None:
        raise FileNotFoundError(f"--text-encoders: --model {a.model!r} holds no text encoders (a transformer folder "
                                "or a single file); pass a folder in the diffusers layout")
    for part in CLIP_PARTS + (() if a.no_t5 else T5_PARTS):
        if not os.path.isdir(os.path.join(encoders, part)):
            hint = " (or --no-t5 to run without T5)" if part in T5_PARTS else ""
            raise FileNotFoundError(f"--text-encoders: no folder {os.path.join(encoders, part)!r}{hint}")
    vae_path = a.vae
    if vae_path is None:
        if pipeline and os.path.isdir(os.path.join(a.model, "vae")):
            vae_path = os.path.join(a.model, "vae")
        elif os.path.isfile(a.model) and _holds_vae(a.model):
            vae_path = a.model
        else:
            raise FileNotFoundError(f"--vae: --model {a.model!r} holds no VAE (no vae/ folder, no "
                                    "first_stage_model.* tensors); pass --vae")
    _need(vae_path, "--vae")
    return encoders, vae_path


def requested_size(a):
    """(height, width) in pixels from --res, --height, --width (--res is the square shorthand; default 1024)."""
    if a.res is not None and (a.height is not None or a.width is not None):
        raise ValueError("--res is the shorthand for --height RES --width RES: give --res, or --height and --width")
    side = 1024 if a.res is None else a.res
    return (side if a.height is None else a.height), (side if a.width is None else a.width)


def _check_size(size, configs, square):
    """Each side a positive multiple of the VAE's 8 x the patch size, and within every MMDiT's position table."""
    for name, side in zip(("--height", "--width"), size):
        name = "--res" if square else name
        for flag, cfg in configs:
            p = cfg.patch_size
            if side < 8 * p:
                raise ValueError(f"{name} {side}: must be a positive multiple of {8 * p} (the VAE's 8 x the MMDiT's "
                                 f"{p} x {p} patches)")
            if side % (8 * p):
                raise ValueError(f"{name} {side} is not a multiple of {8 * p} (the VAE's 8 x the MMDiT's {p} x {p} "
                                 "patches)")
            if side // (8 * p) > cfg.pos_embed_max_size:
                raise ValueError(f"{name} {side} is beyond the position table of {flag} ({cfg.pos_embed_max_size} "
                                 f"patches per side): at most {cfg.pos_embed_max_size * 8 * p}")


def _check_writable(out):
    """--out can be written (a probe file in it, or in the folder it would be made in), creating nothing:
    a refused run leaves no empty folder behind; OUT/images is made when the run starts (_run)."""
    if os.path.isdir(os.path.join(out, "images")):
        cli.output_folder(os.path.join(out, "images"), "--out", create=False)
    cli.output_folder(out, "--out", create=False)


def _name(path):
    return os.path.basename(os.path.normpath(path)) if path else None


def _fingerprints(a):
    """The identity of every weights file given (checkpoint.fingerprint), so that a relaunch into the
    same --out with another file of the same name (a later student.safetensors) is refused, not mixed."""
    from sd3.checkpoint import fingerprint

    return {f: fingerprint(getattr(a, f)) for f in WEIGHTS if getattr(a, f, None)} or None


def _check_method(a, toy_world):
    """The method's own flags; returns the w the images are made at (None for euler)."""
    if a.method == "euler" and a.w is not None:
        raise ValueError("--w: euler is the unguided sampler (diffusers' guidance_scale 1) and takes no --w")
    w = None if a.method == "euler" else (DEFAULT_W if a.w is None else a.w)
    if w is not None and not (math.isfinite(w) and w >= 0):
        raise ValueError(f"--w {w}: the paper's guidance must be finite and >= 0 (Eq. 2: (1 + w) v(c) - w v(null); "
                         "diffusers' guidance_scale is 1 + w)")
    if a.student is not None and a.lora is not None:
        raise ValueError("--student and --lora: give one student, a full one (--student) or an adapter (--lora)")
    given = a.student if a.student is not None else a.lora
    if (a.method == "student") != (given is not None):
        raise ValueError("--method student needs --student PATH or --lora PATH" if given is None
                         else f"--{'student' if a.student else 'lora'} is for --method student, not {a.method}")
    if a.w_rounding == "model" and a.method != "student":
        raise ValueError("--w-rounding applies to --method student")
    pair = [f for f in ("strong", "weak", "w2sd_finetuned") if getattr(a, f)] + (["w2sd_main"] if a.w2sd_main else [])
    if a.method != "w2sd" and pair:
        raise ValueError(f"--{pair[0].replace('_', '-')} is for --method w2sd")
    if a.method == "w2sd" and a.w2sd_finetuned and (a.strong or a.weak):
        raise ValueError("w2sd: give --w2sd-finetuned or --strong/--weak, not both")
    if a.method == "w2sd" and not (a.weak or a.w2sd_finetuned or toy_world):
        raise ValueError("w2sd needs a model pair: --weak PATH (and --strong, default --model) or --w2sd-finetuned")
    return w


def _check_models(a, toy_world):
    """Every checkpoint and folder, from headers only: (image side, text-encoder folder, VAE path)."""
    for flag in ("student", "strong", "weak", "w2sd_finetuned", "lora"):
        _need(getattr(a, flag), "--" + flag.replace("_", "-"))
    if toy_world:
        given = [f for f in ("model", "text_encoders", "vae", "res", "height", "width") if getattr(a, f) is not None]
        if given or a.no_t5:
            raise ValueError(f"--{(given or ['no-t5'])[0].replace('_', '-')}: the toy world brings its own models, "
                             "text encoders and image size")
        import toy  # only here: the SD3 path does not need the toy world
        toy.check_cache_dir(a.toy_cache, "--toy-cache")
        if a.lora:
            lora.check_adapter(a.lora, toy.TEACHER_CONFIG)
        for flag in ("student", "strong", "weak", "w2sd_finetuned"):  # each must be a toy-world MMDiT
            if getattr(a, flag):
                toy.check_network(getattr(a, flag), "--" + flag.replace("_", "-"))
                mmdit.check_values(getattr(a, flag))  # a toy network is 0.3 M numbers: read before the world
        return (toy.H, toy.W), None, None
    if a.model is None:
        raise ValueError("--model is required (an SD3 checkpoint), or --toy for the toy world")
    _need(a.model, "--model")
    text_encoders, vae_path = _sources(a)
    base = mmdit.read_config(a.model)
    if a.lora:
        lora.check_adapter(a.lora, base, a.model, "--model")  # its layers, shapes and base, from the headers
    configs = [("--model", base)] + [("--" + f.replace("_", "-"), mmdit.read_config(getattr(a, f)))
                                     for f in ("student", "strong", "weak", "w2sd_finetuned") if getattr(a, f)]
    for flag, cfg in configs[1:]:
        if (cfg.in_channels, cfg.context_dim, cfg.pooled_dim) != (base.in_channels, base.context_dim, base.pooled_dim):
            raise ValueError(f"{flag} does not take --model's inputs: {cfg.in_channels} latent channels, context "
                             f"{cfg.context_dim}, pooled {cfg.pooled_dim} vs {base.in_channels}, "
                             f"{base.context_dim}, {base.pooled_dim}")
    size = requested_size(a)
    _check_size(size, configs, square=a.height is None and a.width is None)
    vae_config = vae.read_config(vae_path)  # from its header: a file that is no VAE is refused before the encoders
    if vae_config.latent_channels != base.in_channels:
        raise ValueError(f"--vae {vae_path}: its latents have {vae_config.latent_channels} channels, --model's MMDiT "
                         f"takes {base.in_channels}: not the VAE of this model")
    return size, text_encoders, vae_path


def check(args, world=None):
    """Check every argument (files, folders, sizes, the checkpoint headers, --out, the images already
    there) and return a Plan; loads no model. world: a toy.ToyWorld already built (for Python callers;
    --toy builds or reuses one when the images are made)."""
    a = argparse.Namespace(**vars(args))
    if (a.prompt is None) == (a.prompts is None):
        raise ValueError("give --prompt (one or more) or --prompts FILE, not both" if a.prompt
                         else "no prompt: give --prompt TEXT or --prompts FILE")
    prompts = list(a.prompt) if a.prompt is not None else load_prompts(a.prompts)
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt: an empty prompt")
    for flag in ("steps", "n_per_prompt", "batch"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(a, flag)} must be at least 1")
    cli.check_seed(a.seed, "--seed", a.seed + a.n_per_prompt - 1, "image k of a prompt starts from seed + k, and "
                   "seed + (--n-per-prompt - 1)")
    cli.check_memory(8 * (a.steps + 1), f"the schedule of {a.steps} steps (its N + 1 times)", "--steps")
    for flag in ("strong_scale", "weak_scale", "main_scale"):
        cli.finite(getattr(a, flag), "--" + flag.replace("_", "-"), why="W2SD's blend base + s (fine-tune - base)")
    # every image's record stays in memory until OUT/index.jsonl is written: about RECORD_BYTES each
    cli.check_memory(len(prompts) * a.n_per_prompt * RECORD_BYTES, f"the records of {len(prompts)} x "
                     f"{a.n_per_prompt} images", "--n-per-prompt (or fewer prompts)")
    device = cli.check_device(a.device)
    toy_world = a.toy or world is not None
    if toy_world:
        import toy  # only here: the SD3 path does not need the toy world
    w = _check_method(a, toy_world)
    size, text_encoders, vae_path = _check_models(a, toy_world)
    if a.lora and a.student_method not in (None, *lora.METHODS):
        raise ValueError(f"--student-method {a.student_method}: a LoRA student is one of {', '.join(lora.METHODS)}")
    student_method = student_file.student_files(a.student or a.lora, a.student_method)[0] if a.method == "student" else None
    if a.lora and student_method not in lora.METHODS:
        raise ValueError(f"--lora {a.lora}: a LoRA student is one of {', '.join(lora.METHODS)}, not {student_method!r}")
    if a.w_rounding == "model" and student_method != "teefusion":
        raise ValueError(f"--w-rounding model applies to TeEFusion students, not {student_method!r}")
    if student_method == "dice":
        w = embed.DICE_W  # DICE samples at the one guidance it was trained for
    device = ranks.device_for(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # torchrun: LOCAL_RANK
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    inputs = [("--prompts", a.prompts)] + [("--" + f.replace("_", "-"), getattr(a, f)) for f in
                                           ("model", "student", "lora", "strong", "weak", "w2sd_finetuned", "vae",
                                            "text_encoders")]
    if toy_world:
        inputs.append(("--toy-cache", a.toy_cache))
    cli.not_an_input([("--out", os.path.join(a.out, name)) for name in ("index.jsonl", "contact.png")], inputs)
    for name in ("index.jsonl", "contact.png", "images"):  # what the run writes: a file, a folder
        path = os.path.join(a.out, name)
        if os.path.lexists(path) and os.path.isdir(path) != (name == "images"):
            raise cli.InputError(f"--out {a.out}: {path} is {'not ' if name == 'images' else ''}a folder, where the "
                                 f"run writes {'its images' if name == 'images' else 'its ' + name}; give another --out")
    _check_writable(a.out)
    record = dict(negative_prompt=a.negative_prompt, method=a.method, w=w, steps=a.steps,
                  model="toy world" if toy_world else _name(a.model), student=_name(a.student),
                  student_method=student_method, height=size[0], width=size[1], dtype=str(dtype).split(".")[-1],
                  preset=a.preset if a.method in ("zsampling", "w2sd") else None,
                  w_rounding=a.w_rounding if a.method == "student" else None, no_t5=a.no_t5,
                  w2sd=_w2sd_description(a) if a.method == "w2sd" else None, lora=_name(a.lora),
                  weights=_fingerprints(a))
    jobs = [(i, k) for i in range(len(prompts)) for k in range(a.n_per_prompt)]
    plan = Plan(a, prompts, jobs, {}, size, device, dtype, record, text_encoders, vae_path, student_method, world)
    if ranks.from_environment()[0] == 0:  # under torchrun rank 0 looks, and tells the others (run)
        plan.done, plan.broken = scan(plan)
    else:
        plan.done = None
    # a batch's images leave the decoder as float32 (B, 3, H, W) and are kept on the CPU until saved
    side = (toy.H * toy.W) if toy_world else size[0] * size[1]
    batch = min(a.batch, max(1, len(jobs) - len(plan.done or {})))
    cli.check_memory(batch * 3 * side * 4, f"a batch of {batch} decoded images", "--batch")
    # the text embeddings of every prompt still to draw wait on the CPU while the MMDiT samples (`encode`)
    todo = len({i for i, k in jobs if (i, k) not in (plan.done or {})})
    cfg = toy.TEACHER_CONFIG if toy_world else mmdit.read_config(a.model)
    text_tokens = toy.TOKENS if toy_world else SD3_TOKENS
    width = text_tokens * cfg.context_dim + cfg.pooled_dim
    nbytes = torch.finfo(dtype).bits // 8
    cli.check_memory(todo * width * nbytes, f"the text embeddings of {todo} prompts "
                     f"({nbytes} bytes x {width} numbers each)", "the number of prompts")
    # what lives at once while a batch samples: the records, the batch's decoded images, the embeddings
    # waiting, and one hidden state of the MMDiT's joint attention (batch x (image + text tokens) x width)
    latent = (toy.H, toy.W) if toy_world else (size[0] // 8, size[1] // 8)
    tokens = latent[0] * latent[1] // cfg.patch_size ** 2 + text_tokens
    together = (len(jobs) * RECORD_BYTES + batch * 3 * side * 4 + todo * width * nbytes
                + batch * tokens * cfg.hidden_size * nbytes)
    cli.check_memory(together, f"a batch of {batch} images sampled (one MMDiT hidden state of {tokens} tokens x "
                     f"{cfg.hidden_size} each) with the records, decoded images and text embeddings of the run",
                     "--batch (or --n-per-prompt)")
    return plan


def scan(plan):
    """The images of the plan already made: ({job: record with its PNG's size}, [(job, why) of files that
    are there but truncated, empty or unreadable: made again]). Trusted: a record of index.jsonl or of a
    rank file whose file has the recorded size; else the PNG's own record, once it decoded to the last
    pixel (run/image_folder.py). Refuses an image made with other settings."""
    known = image_folder.recorded(plan.args.out)
    done, broken = {}, []
    for job in plan.jobs:
        path, new = image_path(plan, job), expected(plan, job)
        if not os.path.isfile(path):
            continue
        old = known.get(new["file"])
        if old is None or not image_folder.trusted(plan.args.out, old):
            view = TOY_VIEW if plan.record["model"] == "toy world" else 1  # toy images are saved enlarged
            old, why = image_folder.read_image(path, (plan.size[1] * view, plan.size[0] * view))
            if old is None:
                broken.append((job, why))
                continue
            old["bytes"] = os.path.getsize(path)
        bad = [k for k in SETTINGS if old.get(k) != new.get(k)]
        if bad == ["weights"]:
            was, now = old.get("weights") or {}, new.get("weights") or {}
            flags = [f"--{f.replace('_', '-')}" for f in WEIGHTS if was.get(f) != now.get(f)]
            raise FileExistsError(f"{path} was made by other weights of the same name ({', '.join(flags)} "
                                  f"{'differ' if len(flags) > 1 else 'differs'} from the file that made it): give "
                                  "another --out for these weights")
        if bad:
            raise FileExistsError(f"{path} was made with {bad[0]}={old.get(bad[0])!r}, not {new.get(bad[0])!r}: "
                                  "give another --out for other settings")
        done[job] = old
    return done, broken


def _w2sd_description(a):
    main = f", main {a.main_scale:+g}" if a.w2sd_main else ""
    if a.w2sd_finetuned:
        return f"finetune {_name(a.w2sd_finetuned)} strong {a.strong_scale:+g}, weak {a.weak_scale:+g}{main}"
    toy = "the toy world's"  # without --model: the toy world's teacher (strong, main) and weak model
    return f"strong {_name(a.strong or a.model) or toy}, weak {_name(a.weak) or toy}{main and ', main --model'}"


def image_path(plan, job):
    i, k = job
    return os.path.join(plan.args.out, "images", f"{i:05d}-{k:02d}.png")


def expected(plan, job):
    i, k = job
    return dict(file=os.path.join("images", os.path.basename(image_path(plan, job))), prompt=plan.prompts[i],
                prompt_index=i, image_index=k, seed=plan.args.seed + k, **plan.record)


# -----------------------------------------------------------------------------
# The heavy part: text encoders, then MMDiT(s) and VAE


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device):
    """Wait for the device's queued work (CUDA runs asynchronously), so that wall times are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode(plan, indices):
    """The prompts' (context (P, L, Dc), y (P, Dy)) and the negative prompt's (1, L, Dc), (1, Dy), on
    the CPU. The text encoders (SD3's, from disk) are freed before returning."""
    a = plan.args
    if plan.world is not None:
        encoders = plan.world.encoders
    else:
        context_dim = mmdit.read_config(a.model).context_dim
        encoders = text_encoders.TextEncoders.from_pretrained(plan.text_encoders, plan.device, plan.dtype, use_t5=not a.no_t5,
                                                      context_dim=context_dim)
    # the prompts go through the encoders in fixed chunks of the prompt list (prompts c*16 to c*16 + 15), so
    # that a prompt's embedding does not depend on which prompts a rank, or a resumed run, still needs
    rows, wanted = {}, set(indices)
    for c in sorted({i // ENCODE_CHUNK for i in indices}):
        chunk = range(c * ENCODE_CHUNK, min((c + 1) * ENCODE_CHUNK, len(plan.prompts)))
        context, y = encoders.encode([plan.prompts[i] for i in chunk])  # (16, L, Dc), (16, Dy)
        rows.update({i: (context[r].cpu(), y[r].cpu()) for r, i in enumerate(chunk) if i in wanted})
    context = torch.stack([rows[i][0] for i in indices])  # (P, L, Dc)
    y = torch.stack([rows[i][1] for i in indices])  # (P, Dy)
    context_null, y_null = encoders.encode_null() if a.negative_prompt == "" else encoders.encode([a.negative_prompt])
    null = context_null.cpu(), y_null.cpu()  # (1, L, Dc), (1, Dy)
    del encoders, rows
    free_memory(plan.device)
    return context, y, null


def load_models(plan):
    """{model, weak, main, fusion} for samplers.sample, on the device in the run's dtype."""
    a, dev, dt = plan.args, plan.device, plan.dtype
    world = plan.world
    base = world.teacher_path if world is not None else a.model

    def load(path):
        return mmdit.load_mmdit(path, dev, dt).requires_grad_(False)

    def blend(scale):
        return mmdit.load_mmdit_blend(base, a.w2sd_finetuned, scale, dev, dt).requires_grad_(False)

    m = dict(model=None, weak=None, main=None, fusion=None)
    if a.method == "student" and a.lora:  # the adapter merged into --model's MMDiT (the toy teacher)
        m["model"] = lora.load_student(base, a.lora, dev, dt)
        w_dtype = {"w_dtype": dt} if a.w_rounding == "model" else {}  # TeEFusion only (checked)
        m["fusion"] = embed.make_fusion(plan.student_method, m["model"].config, **w_dtype).to(dev).eval()
    elif a.method == "student":
        w_dtype = dt if a.w_rounding == "model" else None
        m["model"], m["fusion"] = student_file.load_student(a.student, plan.student_method, dev, dt, w_dtype=w_dtype)
    elif a.method == "w2sd" and a.w2sd_finetuned:
        m["model"], m["weak"] = blend(a.strong_scale), blend(a.weak_scale)
        m["main"] = blend(a.main_scale) if a.w2sd_main else None
    elif a.method == "w2sd":
        m["model"] = load(a.strong or (world.strong_path if world is not None else a.model))
        m["weak"] = load(a.weak or world.weak_path)
        m["main"] = load(base) if a.w2sd_main else None
    else:
        m["model"] = load(base)
    return m


def iter_images(plan, jobs):
    """Yield (jobs of a batch, images (B, 3, H, W) float32 in [-1, 1] on the CPU, NFE per image, seconds
    per image), --batch jobs at a time: the text encoders run first and are freed, then the MMDiT(s)
    and the VAE load."""
    a, device = plan.args, plan.device
    indices = sorted({i for i, _ in jobs})
    row = {i: r for r, i in enumerate(indices)}
    context, y, (context_null, y_null) = encode(plan, indices)
    models = load_models(plan)
    cfg = models["model"].config
    if plan.world is not None:  # the toy world: the images are the latents (identity VAE), H x W pixels
        import toy
        hw, decode = (toy.H, toy.W), (lambda x: x)
    else:
        decoder = vae.load_vae(plan.vae, device, torch.float32 if plan.dtype == torch.float16 else plan.dtype)
        hw, decode = tuple(side // decoder.config.downsample for side in plan.size), decoder.decode  # (h, w)
    ctx_null, yn = context_null.to(device), y_null.to(device)
    for b in range(0, len(jobs), a.batch):
        batch = jobs[b:b + a.batch]
        # image k of a prompt starts from seed + k, drawn on the CPU in float32 (diffusers' convention)
        noise = torch.cat([torch.randn(1, cfg.in_channels, *hw, generator=torch.Generator("cpu").manual_seed(
            a.seed + k)) for _, k in batch]).to(device)  # (B, C, h, w)
        rows = torch.tensor([row[i] for i, _ in batch])
        ctx, yy = context[rows].to(device), y[rows].to(device)  # (B, L, Dc), (B, Dy)
        synchronize(device)
        start = time.perf_counter()
        x0, nfe = samplers.sample(a.method, models["model"], noise, ctx, yy, ctx_null, yn, w=plan.record["w"],
                                  steps=a.steps, preset=a.preset, weak=models["weak"], main=models["main"],
                                  fusion=models["fusion"])
        images = decode(x0)  # (B, 3, H, W)
        synchronize(device)
        seconds = (time.perf_counter() - start) / len(batch)
        if not torch.isfinite(images).all():
            w = plan.record["w"]
            hint = ("try --dtype fp32" if plan.dtype != torch.float32 else
                    "float32 already: the guided velocity (1 + w) v(c) - w v(null) overflowed, try a smaller --w"
                    if w else "float32 already: the model itself gives non-finite velocities")
            raise FloatingPointError(f"non-finite image for prompt {batch[0][0]} ({a.method}, w = {w}, "
                                     f"{str(plan.dtype).split('.')[-1]}): nothing was written for it; {hint}")
        yield batch, images.float().cpu(), nfe, seconds
    del models
    free_memory(device)


def run(plan, progress=True, group=None):
    """Make the images of a checked plan that are not there yet; then the contact sheet and OUT/index.jsonl.
    group: the ranks.Ranks of a torchrun job (each rank makes its share of the batches, rank 0 merges);
    default: this process alone. Rank 0 holds --out's lock (cli.FolderLock). Returns the records of all
    the plan's images, in job order, on every rank."""
    group = group or ranks.Ranks(one=True)
    lock = cli.FolderLock(plan.args.out, "--out").acquire() if group.rank == 0 else None
    try:
        return _run(plan, progress, group)
    finally:
        if lock is not None:
            lock.release()


def _run(plan, progress, group):
    a = plan.args
    state = None
    if group.rank == 0:  # under the lock: what a killed run left, what is done, and whether all of it is
        os.makedirs(os.path.join(a.out, "images"), exist_ok=True)
        removed = image_folder.remove_temporaries(a.out)
        if removed:
            print(f"removed {len(removed)} temporary file(s) left by a killed run: {', '.join(removed[:10])}"
                  + (", ..." if len(removed) > 10 else ""))
        if plan.broken:
            names = ", ".join(os.path.basename(image_path(plan, job)) for job, _ in plan.broken[:10])
            print(f"{len(plan.broken)} image(s) in {os.path.join(a.out, 'images')} are truncated, unreadable or resized "
                  f"({plan.broken[0][1]}), made again: {names}" + (", ..." if len(plan.broken) > 10 else ""))
        made = [plan.done[job] for job in plan.jobs if job in plan.done]
        finished = len(made) == len(plan.jobs) and image_folder.finished(a.out, made)
        if not finished:
            image_folder.consolidate(a.out, made)
        state = (plan.done, finished)
    plan.done, plan.finished = group.broadcast(state)  # rank 0's view, on every rank
    if plan.finished:
        return [plan.done[job] for job in plan.jobs]
    # the batches of one process, shared out: rank r makes batches r, r + N, ... (each image by one rank)
    missing = [job for job in plan.jobs if job not in plan.done]
    batches = [missing[b:b + a.batch] for b in range(0, len(missing), a.batch)]
    mine = [job for batch in batches[group.rank::group.size] for job in batch]
    made = {}
    if missing:
        if a.toy and plan.world is None:
            import toy
            if group.rank != 0:
                group.barrier()  # rank 0 builds (or trains) the toy world first; the others then read its cache
            plan.world = toy.build_world(cache_dir=a.toy_cache, progress=progress and group.rank == 0)
            if group.rank == 0:
                group.barrier()
        threads = torch.get_num_threads()
        if plan.world is not None:  # the toy's tensors are tiny: a second CPU thread costs more than it brings
            torch.set_num_threads(1)
        try:
            bar = tqdm(total=len(mine), unit="image", desc=f"generate {a.method}", disable=not progress or group.rank != 0)
            for batch, images, nfe, seconds in iter_images(plan, mine) if mine else ():
                for job, pil in zip(batch, vae.to_pil(images)):
                    if plan.world is not None:
                        pil = pil.resize((pil.width * TOY_VIEW, pil.height * TOY_VIEW), Image.NEAREST)
                    record = dict(expected(plan, job), nfe=nfe, seconds=round(seconds, 6))
                    save_png(pil, image_path(plan, job), record)
                    made[job] = dict(record, bytes=os.path.getsize(image_path(plan, job)))
                # recorded once its PNGs are in place: a relaunch trusts what this file lists
                image_folder.write_records(image_folder.rank_file(a.out, group.rank), list(made.values()))
                bar.update(len(batch))
            bar.close()
        finally:
            torch.set_num_threads(threads)
    records = dict(plan.done)
    for share in group.gather(made):
        records.update(share)
    records = [records[job] for job in plan.jobs]
    if group.rank == 0:
        image_folder.merge(a.out, records, lambda rs: contact_sheet(plan, rs))
    group.barrier()  # the folder is complete when any rank returns
    return records


def contact_sheet(plan, records):
    """OUT/contact.png: the first prompts (rows, labelled with the prompt) x their images (seeds)."""
    n_prompts, n_images = SHEET
    rows, labels = [], []
    for r in records:
        if r["prompt_index"] < n_prompts and r["image_index"] < n_images:
            if r["image_index"] == 0:
                rows.append([])
                labels.append(r["prompt"])
            with Image.open(os.path.join(plan.args.out, r["file"])) as im:
                rows[-1].append(im.convert("RGB"))
    cell = min(256, max(rows[0][0].size))
    seeds = [f"seed {plan.args.seed + k}" for k in range(min(n_images, plan.args.n_per_prompt))]
    w = "" if plan.record["w"] is None else f", w {plan.record['w']:g}"
    seeds[0] = f"{plan.args.method}{w}: {seeds[0]}"
    image_grid(rows, os.path.join(plan.args.out, "contact.png"), labels, seeds, cell,
               Image.NEAREST if plan.world is not None else Image.BICUBIC)


def generate(prompts, out, world=None, progress=True, **options):
    """Python entry: generate(["a photo of a cat"], "out/cfg", model="/w/sd3", method="cfg", w=5.0, ...).
    options: the command-line arguments by their dest names (n_per_prompt=4, negative_prompt=...).
    world: a toy.ToyWorld already built (instead of toy=True). Returns the records of the images."""
    args = build_parser().parse_args([])
    for k, v in options.items():
        if not hasattr(args, k) or k in ("prompt", "prompts", "out"):
            raise TypeError(f"generate() got an unexpected option {k!r}")
        setattr(args, k, v)
    args.prompt, args.out = [prompts] if isinstance(prompts, str) else list(prompts), out
    return run(check(args, world), progress)


def main(args):
    plan = check(args)
    with ranks.Ranks(plan.device) as group:  # under torchrun: the job's processes; else this one
        records = run(plan, group=group)
    if group.rank == 0 and plan.finished:
        print(f"{plan.args.out} is already finished: its {len(records)} images, index.jsonl and contact.png are "
              "there; nothing was written")
    elif group.rank == 0:
        made = len(plan.jobs) - len(plan.done)
        print(f"{made} images made, {len(plan.done)} already there: {os.path.join(plan.args.out, 'images')} "
              f"(index.jsonl, contact.png beside it); NFE {records[0]['nfe']} per image")
    return records


if __name__ == "__main__":
    cli.run(main, build_parser())
