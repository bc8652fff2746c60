"""
The toy world: a tiny text-to-image task that runs the whole TeEFusion paper on a laptop CPU.

SD3 cannot run on most readers' machines. This file builds a world small enough to train in
minutes that goes through the SAME code as SD3 (docs/DESIGN.md, "The toy world's adaptations"), and
hard enough that the paper's claims can show or fail to show in it:

    images     8x16 RGB pictures of TWO coloured shapes on black, one in each 8x8 cell, used
               directly as the "latents" (C = 3, identity VAE), in [-1, 1]
    captions   "a red plus left of a blue square": 6 colours x 4 shapes per object, "left of" /
               "right of", 1,104 prompts of 552 scenes. Attribute binding is the task: which colour
               and which shape go where. 100 scenes (200 prompts) are held out for the report
               (TEST) and 50 more for checking the world while building it (DEV); every colour,
               shape and relation, and every single object on either side, still appears in
               training: only these combinations do not.
               20% of training captions describe another picture (web-like caption noise,
               CAPTION_NOISE): the reason guidance matters, as on real data
    text       text_encoders.TextEncoders (SD3's class) over two tiny random CLIPTextModelWithProjection
               models with a word-level tokenizer made on the spot (no downloads, no T5)
    teacher    mmdit.MMDiT at a tiny size, flow matching with caption dropout to the null prompt
               (the encoded empty string) so classifier-free guidance applies; an early
               checkpoint of the same run is W2SD's weak model
    scores     read from the pixels (`scores`), per image:
               adherence  1 when both objects have the prompt's colour AND shape in their places
                          (each cell's shape: the nearest one the world can draw)
               clean      1 when both cells hold a drawing within 4 pixels of a shape the world
                          can draw (the drawing's quality, whatever the prompt)
               fidelity   graded: the best intersection over union, over every way the prompt
                          can be drawn, of the pixels whose colour is right (0 to 1)
               all three are exact (1) on the world's own renders (tested)

distill.py with no --teacher calls `build_world` and `world.dataset("train")`, distills a student,
then evaluation/toy_report.py prints the paper's tables with 95% confidence intervals and draws its figures:

    python distill.py                  # teacher (cached in cache/toy) + student + report
    python toy.py                      # the world alone: build (or reuse) the teacher
    python -m evaluation.toy_report --split dev   # the teacher samplers' scores on the DEV prompts
    python distill.py --full --out runs/full   # every student of Tables 3 and 4

Shape legend: B batch, C channels, H W pixels, L tokens, Dc token width, Dy pooled width.
"""

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F_
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from run import cli
from sd3.checkpoint import CheckpointError, atomic_json, atomic_write
from mmdit import MMDiT, MMDiTConfig, load_mmdit, read_config, save_mmdit
from sd3 import text_encoders

# -----------------------------------------------------------------------------
# The world: what can be drawn and said

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
           "yellow": (1, 1, 0), "magenta": (1, 0, 1), "cyan": (0, 1, 1)}
SHAPES = ("square", "plus", "bar", "column")
RELATIONS = ("left of", "right of")  # where object A stands with respect to object B
H, W, CELL = 8, 16, 8  # two 8x8 cells side by side
R = 3  # half-size of a shape in pixels: a 6x6 square
JITTER = (0, 1)  # where the shape sits inside its cell, in pixels, on each axis
SHADE = (0.75, 1.0)  # a lit channel takes a value in this range (in [0, 1] image units)
# Caption noise, as in web data: this fraction of TRAINING images shows another training prompt than
# its caption says. The true conditional p(x | c) then puts only part of its mass on images that match
# c; guidance, which sharpens p(x | c) by p(c | x)^w (Eq. 2), is what recovers the rest.
CAPTION_NOISE = 0.2
WORDS = ["a", "left", "right", "of", *COLOURS, *SHAPES]
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (6, 3)
N_TEST, N_DEV = 200, 100
MIN_PIXELS, CLEAN = 4, 4  # a cell holds an object from 4 lit pixels; a clean drawing is <= 4 pixels off


def caption(cA, sA, rel, cB, sB):
    """Indices -> the caption, e.g. caption(0, 1, 0, 2, 0) == "a red plus left of a blue square"."""
    names = list(COLOURS)
    return f"a {names[cA]} {SHAPES[sA]} {RELATIONS[rel]} a {names[cB]} {SHAPES[sB]}"


OBJECTS = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
ALL_PROMPTS = [(a[0], a[1], r, b[0], b[1]) for a in OBJECTS for b in OBJECTS for r in range(len(RELATIONS))
               if a != b]
# Held out by SCENE (the left and the right object): "A left of B" and "B right of A" are one picture, so a
# scene and both its captions go to the same split, and no held-out picture is ever seen in training.
SCENES = [(a, b) for a in OBJECTS for b in OBJECTS if a != b]  # (left object, right object)
_order = torch.randperm(len(SCENES), generator=torch.Generator().manual_seed(20250724)).tolist()


def _prompts_of(scenes):
    return sorted(p for (left, right) in scenes for p in ((*left, 0, *right), (*right, 1, *left)))


TEST_PROMPTS = _prompts_of(SCENES[i] for i in _order[:N_TEST // 2])  # the report's; never used while building
DEV_PROMPTS = _prompts_of(SCENES[i] for i in _order[N_TEST // 2:(N_TEST + N_DEV) // 2])
TRAIN_PROMPTS = _prompts_of(SCENES[i] for i in _order[(N_TEST + N_DEV) // 2:])
SPLITS = {"train": TRAIN_PROMPTS, "dev": DEV_PROMPTS, "test": TEST_PROMPTS}


def shape_masks(shape, cy, cx, r=R, h=H, w=W):
    """Binary masks of shapes. shape, cy, cx: (B,) tensors (pixel units; the centre of pixel i is
    at i + 0.5). Returns (B, h, w) bool."""
    dy = (torch.arange(h, dtype=torch.float32) + 0.5).view(1, -1, 1) - cy.float().view(-1, 1, 1)  # (B, h, 1)
    dx = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, 1, -1) - cx.float().view(-1, 1, 1)  # (B, 1, w)
    inside_y, inside_x = dy.abs() <= r, dx.abs() <= r
    bar = (dy.abs() <= 1) & inside_x  # a horizontal bar 2 pixels thick, (B, h, w)
    column = inside_y & (dx.abs() <= 1)  # a vertical one
    masks = torch.stack([inside_y & inside_x, bar | column, bar, column])  # (len(SHAPES), B, h, w)
    return masks.gather(0, shape.view(1, -1, 1, 1).expand(1, *bar.shape))[0]  # (B, h, w)


def columns(prompts):
    """The cells (0 left, 1 right) of objects A and B: (B,), (B,)."""
    col_a = (prompts[:, 2] == RELATIONS.index("right of")).long()  # "A right of B": A on the right
    return col_a, 1 - col_a


def noisy_images(prompts, pool, generator):
    """The prompts the training images actually show: each of prompts (B, 5) is replaced by a
    random one of pool (P, 5) with probability CAPTION_NOISE. Returns (B, 5)."""
    swap = torch.rand(prompts.shape[0], generator=generator) < CAPTION_NOISE  # (B,)
    other = pool[torch.randint(len(pool), (prompts.shape[0],), generator=generator)]  # (B, 5)
    return torch.where(swap.unsqueeze(1), other, prompts)


def render(prompts, generator):
    """Draw one image per prompt (cA, sA, relation, cB, sB): prompts (B, 5) long. Where each shape
    sits in its cell and the shade of each lit channel are random (from `generator`).
    Returns x0 (B, 3, H, W) in [-1, 1]: the world's "latents"."""
    B = prompts.shape[0]
    img = torch.zeros(B, 3, H, W)
    for colour, shape, col in zip(prompts[:, [0, 3]].T, prompts[:, [1, 4]].T, columns(prompts)):
        jy = torch.tensor(JITTER)[torch.randint(len(JITTER), (B,), generator=generator)]  # (B,)
        jx = torch.tensor(JITTER)[torch.randint(len(JITTER), (B,), generator=generator)]
        mask = shape_masks(shape, R + jy, col * CELL + R + jx)  # (B, H, W)
        shade = SHADE[0] + (SHADE[1] - SHADE[0]) * torch.rand(B, 3, generator=generator)  # (B, 3)
        img = img + mask.unsqueeze(1) * (PALETTE[colour] * shade).view(B, 3, 1, 1)
    return img * 2 - 1


# -----------------------------------------------------------------------------
# Reading an image back, and the scores


def _cell_templates():
    """Every drawing a cell can hold: (K, CELL, CELL) bool, with its shape (K,)."""
    keys = torch.tensor([(s, jy, jx) for s in range(len(SHAPES)) for jy in JITTER for jx in JITTER])  # (K, 3)
    return shape_masks(keys[:, 0], R + keys[:, 1], R + keys[:, 2], h=CELL, w=CELL), keys[:, 0]


CELL_TEMPLATES = _cell_templates()


def pixel_colours(x):
    """x (B, 3, H, W) in [-1, 1] -> (B, H, W) long: -1 background (brightest channel below half),
    else the palette colour whose lit channels are those above half the brightest (-2: none)."""
    img = ((x.float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W)
    lit = img > 0.5 * img.amax(1, keepdim=True)  # (B, 3, H, W)
    match = (lit.unsqueeze(1) == PALETTE.bool().view(1, -1, 3, 1, 1)).all(2)  # (B, 6, H, W)
    colour = torch.where(match.any(1), match.float().argmax(1), -2)  # (B, H, W)
    return torch.where(img.amax(1) > 0.5, colour, -1)


def read_image(x):
    """What each cell of an image shows: (B, 2, 4) long, per cell [lit pixels, colour, shape,
    pixels off the nearest drawable shape]. The colour is that of the mean lit pixel (-1 if it
    is no palette colour), the shape that of the nearest template (Hamming distance)."""
    img = ((x.float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W)
    fg = img.amax(1) > 0.5  # (B, H, W)
    templates, template_shape = CELL_TEMPLATES
    out = []
    for col in range(W // CELL):
        mask = fg[:, :, col * CELL:(col + 1) * CELL]  # (B, CELL, CELL)
        n = mask.flatten(1).sum(1)  # (B,)
        dist = (mask.flatten(1).unsqueeze(1) != templates.flatten(1).unsqueeze(0)).sum(-1)  # (B, K)
        off, best = dist.min(1)  # (B,)
        mean = (img[..., col * CELL:(col + 1) * CELL] * mask.unsqueeze(1)).sum((2, 3)) / n.clamp(min=1).unsqueeze(1)
        lit = mean > 0.5 * mean.amax(1, keepdim=True)  # (B, 3)
        match = (lit.unsqueeze(1) == PALETTE.bool().unsqueeze(0)).all(-1)  # (B, 6)
        colour = torch.where(match.any(1), match.float().argmax(1), -1)
        out.append(torch.stack([n, colour, template_shape[best], off], 1))  # (B, 4)
    return torch.stack(out, 1)  # (B, 2, 4)


def scores(x, prompts):
    """Per image, as floats (B,) each: "adherence", "clean" and "fidelity" (see the docstring).
    x (B, 3, H, W); prompts (B, 5)."""
    prompts = prompts.to(x.device)
    cells = read_image(x)  # (B, 2, 4)
    rows = torch.arange(len(x))
    right, clean = [], []
    for (c, s), col in zip(((0, 1), (3, 4)), columns(prompts)):
        n, colour, shape, off = cells[rows, col].unbind(1)  # (B,) each
        drawn = n >= MIN_PIXELS
        right.append(drawn & (colour == prompts[:, c]) & (shape == prompts[:, s]))
    clean = (cells[:, :, 0] >= MIN_PIXELS) & (cells[:, :, 3] <= CLEAN)  # (B, 2)
    return {"adherence": (right[0] & right[1]).float(), "clean": clean.all(1).float(),
            "fidelity": fidelity(x, prompts)}


def fidelity(x, prompts):
    """The best IoU, over the ways the prompt can be drawn (every placement in the cells), between
    the pixels the image shows in a colour and the ideal drawing's, counting a pixel as shared
    only when both show it in the same colour. (B,) in [0, 1]; 1 for the world's own renders."""
    shown = pixel_colours(x)  # (B, H, W)
    B = len(x)
    best = torch.zeros(B, device=x.device)
    col_a, col_b = columns(prompts)
    places = [(jy, jx) for jy in JITTER for jx in JITTER]
    draw = {}
    for obj, (c, s, col) in enumerate(((0, 1, col_a), (3, 4, col_b))):
        for jy, jx in places:
            mask = shape_masks(prompts[:, s].cpu(), torch.full((B,), R + jy), col.cpu() * CELL + R + jx).to(x.device)
            draw[obj, jy, jx] = torch.where(mask, prompts[:, c].view(-1, 1, 1), -1)  # (B, H, W)
    for pa in places:
        for pb in places:
            ideal = torch.maximum(draw[(0, *pa)], draw[(1, *pb)])  # cells never overlap
            both = ((shown == ideal) & (ideal >= 0)).flatten(1).sum(1)
            either = ((shown != -1) | (ideal >= 0)).flatten(1).sum(1)
            best = torch.maximum(best, both / either)
    return best


# -----------------------------------------------------------------------------
# The text encoders: SD3's TextEncoders over tiny random CLIPs


def word_tokenizer(pad, max_length):
    """A word-level CLIP-style tokenizer made on the spot: <s> words </s>, padded with `pad`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["!", "<unk>", "<pad>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[
        ("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token=pad,
                                   unk_token="<unk>", model_max_length=max_length)


def tiny_clip(hidden, seed):
    """A random CLIPTextModelWithProjection of width `hidden` (frozen: the teacher learns to
    read it). Its eos_token_id is the tokenizer's </s> (4), which is where CLIP pools."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=5 + len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=TOKENS,
                         projection_dim=hidden, bos_token_id=3, eos_token_id=4, pad_token_id=2)
    return CLIPTextModelWithProjection(cfg).eval()


TOKENS = 12  # CLIP context length: "<s> a magenta column right of a yellow square </s>" is 10
CLIP_WIDTHS = (32, 32)  # "CLIP-L" and "CLIP-G": context width Dc = pooled width Dy = 64


def make_encoders(state=None, device="cpu"):
    """SD3's TextEncoders over two tiny CLIPs (CLIP-L pads with </s>, CLIP-G with "!", as in SD3);
    no T5 (max_t5_tokens=0), so the context is TOKENS tokens wide Dc = sum(CLIP_WIDTHS).
    state: the CLIPs' tensors (as saved by `encoder_state`), else a fresh seeded init."""
    clip_l, clip_g = tiny_clip(CLIP_WIDTHS[0], 0), tiny_clip(CLIP_WIDTHS[1], 1)
    if state is not None:
        for name, m in (("clip_l.", clip_l), ("clip_g.", clip_g)):
            m.load_state_dict({k[len(name):]: v for k, v in state.items() if k.startswith(name)})
    return text_encoders.TextEncoders(clip_l, word_tokenizer("</s>", TOKENS), clip_g, word_tokenizer("!", TOKENS),
                              max_t5_tokens=0, context_dim=sum(CLIP_WIDTHS), device=device)


def encoder_state(encoders):
    (clip_l, _), (clip_g, _) = encoders.clips
    state = {f"clip_l.{k}": v for k, v in clip_l.state_dict().items()}
    state.update({f"clip_g.{k}": v for k, v in clip_g.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# -----------------------------------------------------------------------------
# The teacher: a tiny MMDiT trained by flow matching with caption dropout


TEACHER_CONFIG = MMDiTConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, in_channels=3, out_channels=3,
                             context_dim=sum(CLIP_WIDTHS), pooled_dim=sum(CLIP_WIDTHS), pos_embed_max_size=W // 2)


@dataclass
class TrainSettings:
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    weak_step: int = 1200  # the step whose checkpoint is W2SD's weak model
    p_null: float = 0.15  # caption dropout to the null prompt (so CFG applies)
    seed: int = 0

    def key(self):
        world = dict(COLOURS=COLOURS, SHAPES=SHAPES, RELATIONS=RELATIONS, H=H, W=W, R=R, JITTER=JITTER, SHADE=SHADE,
                     CAPTION_NOISE=CAPTION_NOISE, TOKENS=TOKENS, CLIP_WIDTHS=CLIP_WIDTHS, TRAIN=TRAIN_PROMPTS,
                     config=repr(TEACHER_CONFIG), arithmetic=arithmetic_probe())
        return hashlib.sha1(json.dumps([world, vars(self)], sort_keys=True, default=str).encode()).hexdigest()[:12]


def arithmetic_probe():
    """The bits of one AdamW step of the teacher network from a seeded initialisation on a fixed random
    batch. They change with the MMDiT code, the CPU kernels and the torch version, and so, however
    slightly, does every step of the teacher's training: over 6,000 steps a 1e-7 difference grows into
    another teacher (and another student). Part of the cache key, so that a cached teacher is reused only
    where the same code would train it again bit for bit. Call it where the teacher trains (one thread)."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the caller's random stream is left as it was
        torch.manual_seed(0)
        model = MMDiT(TEACHER_CONFIG).train()
    cfg = TEACHER_CONFIG
    x = torch.randn(4, cfg.in_channels, H, W, generator=g)  # (B, C, H, W)
    context = torch.randn(4, TOKENS, cfg.context_dim, generator=g)  # (B, L, Dc)
    y = torch.randn(4, cfg.pooled_dim, generator=g)  # (B, Dy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F_.mse_loss(model(x, torch.rand(4, generator=g), context, y), x).backward()
    opt.step()
    digest = hashlib.sha1()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()[:12]


def train_teacher(encoders, settings, out_dir, progress=True):
    """Flow matching (x_t = (1 - t) x0 + t eps, target v = eps - x0) on the training prompts,
    each caption replaced by the null prompt with probability p_null. Saves weak.safetensors at
    settings.weak_step and teacher.safetensors at the end (save_mmdit); returns the loss curve."""
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    model = MMDiT(TEACHER_CONFIG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))  # warm-up
    prompts = torch.tensor(TRAIN_PROMPTS)  # (P, 5)
    context_all, y_all = encoders.encode([caption(*k) for k in TRAIN_PROMPTS])  # (P, L, Dc), (P, Dy)
    context_null, y_null = encoders.encode_null()  # (1, L, Dc), (1, Dy)
    losses = []
    bar = tqdm(range(settings.steps), desc="toy teacher", disable=not progress)
    for step in bar:
        idx = torch.randint(len(prompts), (settings.batch_size,), generator=g)  # (B,)
        x0 = render(noisy_images(prompts[idx], prompts, g), g)  # (B, 3, H, W), captions idx
        drop = (torch.rand(settings.batch_size, generator=g) < settings.p_null).view(-1, 1)  # (B, 1)
        context = torch.where(drop.unsqueeze(-1), context_null, context_all[idx])  # (B, L, Dc)
        y = torch.where(drop, y_null, y_all[idx])  # (B, Dy)
        t = torch.rand(settings.batch_size, generator=g)  # (B,)
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        loss = F_.mse_loss(model(x_t, t, context, y), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step + 1 == settings.weak_step:
            save_mmdit(model, os.path.join(out_dir, "weak.safetensors"), {"toy_step": str(step + 1)})
    save_mmdit(model, os.path.join(out_dir, "teacher.safetensors"), {"toy_step": str(settings.steps)})
    return losses


# -----------------------------------------------------------------------------
# The world object and its datasets


class ToyDataset(Dataset):
    """The interface of prepare.ShardDataset: ds[i] = {"latents": (3, H, W), "context": (L, Dc),
    "y": (Dy,), "caption": str}, and .null() -> (context_null (1, L, Dc), y_null (1, Dy)).
    Item i is drawn from seed (split base + i), so it is the same on every rank and every epoch.
    "train" uses the training prompts (with caption noise drawn from them alone); "dev" and "test"
    the held-out prompts, clean, with other seeds."""

    SEED_BASE = {"train": 0, "dev": 10**9, "test": 2 * 10**9}

    def __init__(self, encoders, split="train", size=None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        self.split = split
        self.prompts = torch.tensor(SPLITS[split])  # (P, 5)
        self.size = size if size is not None else (100_000 if split == "train" else 1_000)
        self.context, self.y = encoders.encode([caption(*k.tolist()) for k in self.prompts])  # (P, L, Dc), (P, Dy)
        self._null = encoders.encode_null()

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        g = torch.Generator().manual_seed(self.SEED_BASE[self.split] + i)
        k = i % len(self.prompts)
        shown = self.prompts[k:k + 1]  # (1, 5)
        if self.split == "train":  # web-like caption noise (CAPTION_NOISE); the held-out splits are clean
            shown = noisy_images(shown, self.prompts, g)
        x0 = render(shown, g)[0]  # (3, H, W)
        return {"latents": x0, "context": self.context[k], "y": self.y[k], "caption": caption(*self.prompts[k].tolist())}

    def null(self):
        return self._null


class ToyWorld:
    """Everything distill.py needs: encoders, config, teacher/strong/weak checkpoint paths, and
    datasets. Built by `build_world`."""

    def __init__(self, encoders, cache_dir, losses, device="cpu"):
        self.encoders, self.config, self.device = encoders, TEACHER_CONFIG, device
        self.cache_dir = cache_dir
        self.teacher_path = os.path.join(cache_dir, "teacher.safetensors")
        self.strong_path = self.teacher_path  # the final checkpoint is the strong model
        self.weak_path = os.path.join(cache_dir, "weak.safetensors")  # an early one is the weak model
        self.losses = losses

    def dataset(self, split="train", size=None):
        return ToyDataset(self.encoders, split, size)

    def load(self, which="teacher"):
        path = {"teacher": self.teacher_path, "strong": self.strong_path, "weak": self.weak_path}[which]
        return load_mmdit(path, device=self.device).eval().requires_grad_(False)


def build_world(cache_dir="cache/toy", device="cpu", progress=True, settings=None):
    """Build the toy world, training the teacher unless cache_dir already holds one trained with
    the same world and settings (then it is reused). Returns a ToyWorld."""
    settings = settings or TrainSettings()
    with one_thread():
        return _build_world(cache_dir, device, progress, settings)


class one_thread:
    """Run torch on one CPU thread inside the block: this world's tensors are so small that a
    second OpenMP thread costs more than it brings (several times slower on a shared CPU)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


CACHE_FILES = ("text_encoders.safetensors", "teacher.safetensors", "weak.safetensors")  # world.json lists their sha256


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_cache_dir(path, flag="--cache-dir"):
    """The toy world's cache folder, before any work: a folder (not a file); one that does not hold a
    complete cache yet must be writable (the teacher will be trained into it)."""
    cli.folder_path(path, flag, " (the toy world's cache)")
    if not os.path.isfile(os.path.join(path, "world.json")):
        cli.output_folder(path, flag, create=False)
    return path


def check_network(path, flag):
    """A checkpoint that can run in the toy world (its latents, text widths and image size), from its
    header (mmdit.read_config checks every key and shape)."""
    cfg, toy = read_config(path), TEACHER_CONFIG
    if (cfg.in_channels, cfg.context_dim, cfg.pooled_dim) != (toy.in_channels, toy.context_dim, toy.pooled_dim) \
            or cfg.pos_embed_max_size * cfg.patch_size < max(H, W):
        raise cli.InputError(f"{flag} {path} is not a toy-world network: {cfg.in_channels} latent channels, context "
                             f"{cfg.context_dim}, pooled {cfg.pooled_dim}, at most "
                             f"{cfg.pos_embed_max_size * cfg.patch_size} latent pixels per side; the toy world has "
                             f"{toy.in_channels}, {toy.context_dim}, {toy.pooled_dim} and {H} x {W}")
    return cfg


def _check_cache(cache_dir, info):
    """A cache whose key matches is reused only if its files are the ones it was built with (their
    sha256 in world.json) or, for a cache written before world.json held them, if they read as the
    world's text encoders and teacher networks; else it is refused, naming the file."""
    again = f"delete {cache_dir} (or that file) to train the teacher again"
    hashes = info.get("sha256") if isinstance(info.get("sha256"), dict) else {}
    for name in CACHE_FILES:
        path = os.path.join(cache_dir, name)
        if name in hashes:
            if _sha256(path) != hashes[name]:
                raise cli.InputError(f"{path} is not the file this toy-world cache was built with (its sha256 differs "
                                     f"from {os.path.join(cache_dir, 'world.json')}'s): {again}")
        elif name == "text_encoders.safetensors":
            try:
                keys = set(load_file(path))
            except Exception as e:  # safetensors' own SafetensorError, OSError
                raise cli.InputError(f"{path}: not readable as the toy world's text encoders ({e}): {again}") from None
            with torch.random.fork_rng():  # the encoders' seeded draws leave the caller's random stream alone
                expected = set(encoder_state(make_encoders()))
            if keys != expected:
                raise cli.InputError(f"{path}: not the toy world's text encoders (other tensors): {again}")
        else:
            try:
                cfg = read_config(path)
            except CheckpointError as e:
                raise cli.InputError(f"{e}: {again}") from None
            if cfg != TEACHER_CONFIG:
                raise cli.InputError(f"{path}: not a toy-world teacher (another MMDiT config): {again}")


def _build_world(cache_dir, device, progress, settings):
    check_cache_dir(cache_dir, "the toy world's cache")
    os.makedirs(cache_dir, exist_ok=True)
    info_path = os.path.join(cache_dir, "world.json")
    enc_path = os.path.join(cache_dir, "text_encoders.safetensors")
    key = settings.key()
    files = [info_path] + [os.path.join(cache_dir, f) for f in CACHE_FILES]
    again = f"delete {cache_dir} to train the teacher again"
    odd = next((f for f in files if os.path.exists(f) and not os.path.isfile(f)), None)
    if odd is not None:  # a folder (or a FIFO) where the cache keeps a file: never trained over
        raise cli.InputError(f"{odd} is not a file: not a toy-world cache ({again})")
    if all(os.path.isfile(f) for f in files):
        info = cli.read_json(info_path)
        if not isinstance(info, dict) or not isinstance(info.get("key"), str):
            raise cli.InputError(f"{info_path}: not a toy-world record (a JSON object with the world's \"key\"): "
                                 f"{again}")
        if info.get("key") == key:  # (another key: a world of other settings, trained again in its place)
            _check_cache(cache_dir, info)
            with cli.reading(info_path):
                seconds, final, losses = info["train_seconds"], info["final_loss"], info["losses"]
            numbers = [seconds, final, *(losses if isinstance(losses, list) else [None])]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
                raise cli.InputError(f"{info_path}: its train_seconds, final_loss and losses are not all finite "
                                     f"numbers: {again}")
            if progress:
                print(f"toy world: reusing the teacher in {cache_dir} (trained in {seconds:.0f} s, final loss "
                      f"{final:.4f})")
            return ToyWorld(make_encoders(load_file(enc_path), device), cache_dir, losses, device)
    encoders = make_encoders(device=device)
    if progress:
        print(f"toy world: training the teacher ({settings.steps} steps, batch {settings.batch_size}) into {cache_dir}")
    start = time.time()
    losses = train_teacher(encoders, settings, cache_dir, progress)
    seconds = time.time() - start
    atomic_write(enc_path, lambda tmp: save_file(encoder_state(encoders), tmp))
    curve = [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)]  # mean per 100 steps
    info = dict(key=key, settings=vars(settings), train_seconds=seconds, final_loss=curve[-1], losses=curve,
                sha256={name: _sha256(os.path.join(cache_dir, name)) for name in CACHE_FILES})
    atomic_json(info, info_path)  # written last: its presence means the cache is complete
    return ToyWorld(encoders, cache_dir, curve, device)


def main(args):
    check_cache_dir(args.cache_dir)
    world = build_world(args.cache_dir)
    info = os.path.join(world.cache_dir, "world.json")
    print(f"toy world in {world.cache_dir}: teacher {world.teacher_path}, W2SD's weak model {world.weak_path}, "
          f"text encoders and {info}; {len(TRAIN_PROMPTS)} training prompts, {len(DEV_PROMPTS)} DEV and "
          f"{len(TEST_PROMPTS)} TEST prompts held out. Scores: python -m evaluation.toy_report --split dev")


if __name__ == "__main__":
    parser = cli.parser("Build the toy world (or reuse its cached teacher).")
    parser.add_argument("--cache-dir", default="cache/toy")
    cli.run(main, parser)
