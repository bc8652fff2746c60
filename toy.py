"""
The toy world: a tiny text-to-image task that runs the whole TeEFusion paper on a laptop CPU.

SD3 cannot run on most readers' machines. This file builds a world small enough to train in
minutes that goes through the SAME code as SD3 (DESIGN.md, "Two worlds, one code path"):

    images     16x16 RGB pictures of one coloured shape on black, in one quadrant, used
               directly as the "latents" (C = 3, identity VAE), in [-1, 1]
    captions   "a red plus in row two column one": 7 colours x 4 shapes x 4 quadrants = 112
               prompts; 16 of them (and every image seed of the test split) are never seen in
               training. 20% of training captions describe another picture (web-like caption
               noise, CAPTION_NOISE): the reason guidance matters, as on real data
    text       embed.TextEncoders (SD3's class) over two tiny random CLIPTextModelWithProjection
               models with a word-level tokenizer made on the spot (no downloads, no T5)
    teacher    mmdit.MMDiT at a tiny size, flow matching with caption dropout to the null prompt
               (the encoded empty string) so classifier-free guidance applies; an early
               checkpoint of the same run is W2SD's weak model
    score      an exact adherence score from the pixels: the shape (foreground: pixels brighter
               than half) must be in the named quadrant (nearest template the world can draw)
               and of the named colour (exactly the lit channels of the palette colour); 100%
               on real samples (tested). Shapes are read but not scored (see `adherence`)

distill.py with no --teacher calls `build_world` and `world.dataset("train")`, distills a student,
then calls `report`, which prints the paper's Table 4 on held-out prompts and seeds and writes a
methods x w grid (the paper's Fig. 4):

    python distill.py                  # teacher (cached in cache/toy) + student + table
    python toy.py                      # the world alone: build (or reuse) the teacher, print
                                       # adherence of the teacher samplers, write a grid
    python toy.py --student runs/toy/student.safetensors   # the table for a trained student
    python distill.py --full --out runs/full   # a student from each teacher + Table 3 + DICE:
                                       # `report_students` prints one table with all of them

Shape legend: B batch, C channels, H W pixels, L tokens, Dc token width, Dy pooled width.
"""

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F_
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

import embed
import samplers
from checkpoint import atomic_json, atomic_write
from mmdit import MMDiT, MMDiTConfig, load_mmdit, save_mmdit

# -----------------------------------------------------------------------------
# The world: what can be drawn and said

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1),
           "yellow": (1, 1, 0), "magenta": (1, 0, 1), "cyan": (0, 1, 1), "white": (1, 1, 1)}
SHAPES = ("square", "plus", "bar", "column")
SIZE, GRID = 16, 2  # H = W = 16 pixels, a GRID x GRID board of 8x8-pixel cells
NUMBERS = ("one", "two", "three", "four")
POSITIONS = tuple(f"row {r} column {c}" for r in NUMBERS[:GRID] for c in NUMBERS[:GRID])  # (row, col) = divmod(i, GRID)
CELL = SIZE // GRID
RADII = (3,)  # half-size of the shape in pixels: a 6x6 square
JITTER = (0, 1, 2)  # where the shape sits inside its cell, in pixels, on each axis
SHADE = (0.75, 1.0)  # a lit channel takes a value in this range (in [0, 1] image units)
# Caption noise, as in web data: this fraction of TRAINING images shows some other training prompt
# than its caption says. So the true conditional p(x | c) puts only ~60% of its mass on images
# that match c; sampling it faithfully (unguided) gives ~60% adherence, and guidance, which
# sharpens p(x | c) by p(c | x)^w (Eq. 2), is what recovers the rest (the paper's premise).
CAPTION_NOISE = 0.2
WORDS = ["a", "in", "row", "column", *NUMBERS, *COLOURS, *SHAPES]
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (6, 3)


def caption(colour, shape, position):
    """Indices -> the caption, e.g. caption(0, 1, 0) == "a red plus at the top left"."""
    return f"a {list(COLOURS)[colour]} {SHAPES[shape]} in {POSITIONS[position]}"


ALL_PROMPTS = [(c, s, p) for c in range(len(COLOURS)) for s in range(len(SHAPES)) for p in range(len(POSITIONS))]
# 16 held-out prompts: a Latin-square choice so every colour, shape and position still appears in
# training, only these combinations of them do not (so the test also checks composition)
TEST_PROMPTS = [(c, s, p) for (c, s, p) in ALL_PROMPTS if (c + s + p) % len(COLOURS) == 0]
TRAIN_PROMPTS = [k for k in ALL_PROMPTS if k not in TEST_PROMPTS]


def shape_masks(shape, cy, cx, r, size=SIZE):
    """Binary masks of shapes. shape, cy, cx, r: (B,) tensors (pixel units; the centre of pixel
    i is at i + 0.5). Returns (B, H, W) bool."""
    p = torch.arange(size, dtype=torch.float32) + 0.5  # (W,)
    dy = p.view(1, -1, 1) - cy.float().view(-1, 1, 1)  # (B, H, 1)
    dx = p.view(1, 1, -1) - cx.float().view(-1, 1, 1)  # (B, 1, W)
    r = r.float().view(-1, 1, 1)  # (B, 1, 1)
    inside_y, inside_x = dy.abs() <= r, dx.abs() <= r  # (B, H, 1), (B, 1, W)
    bar = (dy.abs() <= 1) & inside_x  # a horizontal bar 2 pixels thick, (B, H, W)
    column = inside_y & (dx.abs() <= 1)  # a vertical one, (B, H, W)
    masks = torch.stack([inside_y & inside_x, bar | column, bar, column])  # (len(SHAPES), B, H, W)
    return masks.gather(0, shape.view(1, -1, 1, 1).expand(1, *bar.shape))[0]  # (B, H, W)


def noisy_images(prompts, pool, generator):
    """The prompts the training images actually show: each of prompts (B, 3) is replaced by a
    random one of pool (P, 3) with probability CAPTION_NOISE. Returns (B, 3)."""
    swap = torch.rand(prompts.shape[0], generator=generator) < CAPTION_NOISE  # (B,)
    other = pool[torch.randint(len(pool), (prompts.shape[0],), generator=generator)]  # (B, 3)
    return torch.where(swap.unsqueeze(1), other, prompts)


def render(prompts, generator):
    """Draw one image per (colour, shape, position) triple. prompts: (B, 3) long tensor.
    The centre jitter, size and shade are random (from `generator`). Returns x0 (B, 3, H, W) in
    [-1, 1]: the world's "latents"."""
    B = prompts.shape[0]
    colour, shape, position = prompts.unbind(1)  # (B,) each
    row, col = position // GRID, position % GRID
    jy = torch.tensor(JITTER)[torch.randint(len(JITTER), (B,), generator=generator)]  # (B,)
    jx = torch.tensor(JITTER)[torch.randint(len(JITTER), (B,), generator=generator)]  # (B,)
    r = torch.tensor(RADII)[torch.randint(len(RADII), (B,), generator=generator)]  # (B,)
    mask = shape_masks(shape, row * CELL + r + jy, col * CELL + r + jx, r)  # (B, H, W)
    shade = SHADE[0] + (SHADE[1] - SHADE[0]) * torch.rand(B, 3, generator=generator)  # (B, 3)
    rgb = PALETTE[colour] * shade  # (B, 3)
    img = mask.unsqueeze(1) * rgb.view(B, 3, 1, 1)  # (B, 3, H, W) in [0, 1]
    return img * 2 - 1


# -----------------------------------------------------------------------------
# The exact adherence score


def _templates():
    """Every mask the world can draw: (K, H, W) bool, with its shape and position (K,) each."""
    keys = [(s, p, jy, jx, r) for s in range(len(SHAPES)) for p in range(len(POSITIONS))
            for jy in range(len(JITTER)) for jx in range(len(JITTER)) for r in range(len(RADII))]
    k = torch.tensor(keys)  # (K, 5)
    r = torch.tensor([RADII[i] for i in k[:, 4]])  # (K,)
    cy = (k[:, 1] // GRID) * CELL + r + torch.tensor(JITTER)[k[:, 2]]
    cx = (k[:, 1] % GRID) * CELL + r + torch.tensor(JITTER)[k[:, 3]]
    return shape_masks(k[:, 0], cy, cx, r), k[:, 0], k[:, 1]


TEMPLATES = _templates()




def read_image(x):
    """What an image shows, read from its pixels. x (B, 3, H, W) in [-1, 1].
    Foreground = pixels whose brightest channel is above half; shape and position come from the
    nearest template (Hamming distance over the foreground mask), colour from the mean of the
    foreground pixels (the channels above half of its brightest one must be exactly those of a
palette colour: white or a muddy mix is no colour). Returns (B, 3) long: colour, shape, position
    (-1 everywhere for an empty image)."""
    img = ((x.float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W)
    mask = img.amax(1) > 0.5  # (B, H, W)
    masks, t_shape, t_pos = TEMPLATES
    dist = (mask.flatten(1).unsqueeze(1) != masks.flatten(1).unsqueeze(0)).sum(-1)  # (B, K)
    best = dist.argmin(1)  # (B,)
    n = mask.sum((1, 2)).clamp(min=1)  # (B,)
    mean_rgb = (img * mask.unsqueeze(1)).sum((2, 3)) / n.unsqueeze(1)  # (B, 3)
    lit = mean_rgb > 0.5 * mean_rgb.amax(1, keepdim=True)  # which channels are on, shade-free, (B, 3)
    match = (lit.unsqueeze(1) == PALETTE.bool().unsqueeze(0)).all(-1)  # (B, 6)
    colour = torch.where(match.any(1), match.float().argmax(1), -1)  # (B,); white, grey, ...: -1
    out = torch.stack([colour, t_shape[best], t_pos[best]], 1)  # (B, 3)
    out[mask.flatten(1).sum(1) == 0] = -1
    return out


SCORED = (0, 2)  # colour and position; shape (column 1) is read and reported, not scored (see `adherence`)


def adherence(x, prompts, scored=SCORED):
    """Per image: 1.0 when its colour and position match the prompt, else 0.0. x (B, 3, H, W);
    prompts (B, 3). Returns (B,) float. The shape is left out by default: a teacher trained
    for three CPU minutes draws the right colour in the right place but rounds its shapes off
    (pass scored=(0, 1, 2) to ask for all three). Returns (B,) float."""
    return (read_image(x)[:, scored] == prompts.to(x.device)[:, scored]).all(1).float()


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


TOKENS = 12  # CLIP context length: "<s> a magenta column in row two column one </s>" is 10
CLIP_WIDTHS = (32, 32)  # "CLIP-L" and "CLIP-G": context width Dc = pooled width Dy = 64


def make_encoders(state=None, device="cpu"):
    """SD3's TextEncoders over two tiny CLIPs (CLIP-L pads with </s>, CLIP-G with "!", as in SD3);
    no T5 (max_t5_tokens=0), so the context is TOKENS tokens wide Dc = sum(CLIP_WIDTHS).
    state: the CLIPs' tensors (as saved by `encoder_state`), else a fresh seeded init."""
    clip_l, clip_g = tiny_clip(CLIP_WIDTHS[0], 0), tiny_clip(CLIP_WIDTHS[1], 1)
    if state is not None:
        for name, m in (("clip_l.", clip_l), ("clip_g.", clip_g)):
            m.load_state_dict({k[len(name):]: v for k, v in state.items() if k.startswith(name)})
    return embed.TextEncoders(clip_l, word_tokenizer("</s>", TOKENS), clip_g, word_tokenizer("!", TOKENS),
                              max_t5_tokens=0, context_dim=sum(CLIP_WIDTHS), device=device)


def encoder_state(encoders):
    (clip_l, _), (clip_g, _) = encoders.clips
    state = {f"clip_l.{k}": v for k, v in clip_l.state_dict().items()}
    state.update({f"clip_g.{k}": v for k, v in clip_g.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# -----------------------------------------------------------------------------
# The teacher: a tiny MMDiT trained by flow matching with caption dropout


TEACHER_CONFIG = MMDiTConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, in_channels=3, out_channels=3,
                             context_dim=sum(CLIP_WIDTHS), pooled_dim=sum(CLIP_WIDTHS),
                             pos_embed_max_size=SIZE // 2)


@dataclass
class TrainSettings:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weak_step: int = 600  # the step whose checkpoint is W2SD's weak model
    p_null: float = 0.15  # caption dropout to the null prompt (so CFG applies)
    seed: int = 0

    def key(self):
        world = dict(COLOURS=COLOURS, SHAPES=SHAPES, POSITIONS=POSITIONS, SIZE=SIZE, JITTER=JITTER, RADII=RADII,
                     SHADE=SHADE, GRID=GRID, CAPTION_NOISE=CAPTION_NOISE, TOKENS=TOKENS, CLIP_WIDTHS=CLIP_WIDTHS, TEST=TEST_PROMPTS,
                     config=repr(TEACHER_CONFIG))
        return hashlib.sha1(json.dumps([world, vars(self)], sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_teacher(encoders, settings, out_dir, progress=True, log=None):
    """Flow matching (x_t = (1 - t) x0 + t eps, target v = eps - x0) on the training prompts,
    each caption replaced by the null prompt with probability p_null. Saves weak.safetensors at
    settings.weak_step and teacher.safetensors at the end (save_mmdit); returns the loss curve."""
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    model = MMDiT(TEACHER_CONFIG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))  # warm-up
    prompts = torch.tensor(TRAIN_PROMPTS)  # (P, 3)
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
    "train" uses the training prompts; "test" the held-out prompts and other seeds."""

    SEED_BASE = {"train": 0, "test": 10**9}

    def __init__(self, encoders, split="train", size=None):
        if split not in self.SEED_BASE:
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        self.split = split
        self.prompts = torch.tensor(TRAIN_PROMPTS if split == "train" else TEST_PROMPTS)  # (P, 3)
        self.size = size if size is not None else (100_000 if split == "train" else 1_000)
        self.context, self.y = encoders.encode([caption(*k.tolist()) for k in self.prompts])  # (P, L, Dc), (P, Dy)
        self._null = encoders.encode_null()

    def __len__(self):
        return self.size

    def prompt(self, i):
        return self.prompts[i % len(self.prompts)]  # (3,)

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        g = torch.Generator().manual_seed(self.SEED_BASE[self.split] + i)
        k = i % len(self.prompts)
        shown = self.prompts[k:k + 1]  # (1, 3)
        if self.split == "train":  # web-like caption noise (CAPTION_NOISE); the test split is clean
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


def _build_world(cache_dir, device, progress, settings):
    os.makedirs(cache_dir, exist_ok=True)
    info_path = os.path.join(cache_dir, "world.json")
    enc_path = os.path.join(cache_dir, "text_encoders.safetensors")
    key = settings.key()
    files = [info_path, enc_path] + [os.path.join(cache_dir, f) for f in ("teacher.safetensors", "weak.safetensors")]
    if all(os.path.isfile(f) for f in files):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("key") == key:
            if progress:
                print(f"toy world: reusing the teacher in {cache_dir} (trained in {info['train_seconds']:.0f} s, "
                      f"final loss {info['final_loss']:.4f})")
            return ToyWorld(make_encoders(load_file(enc_path), device), cache_dir, info["losses"], device)
    encoders = make_encoders(device=device)
    if progress:
        print(f"toy world: training the teacher ({settings.steps} steps, batch {settings.batch_size}) into {cache_dir}")
    start = time.time()
    losses = train_teacher(encoders, settings, cache_dir, progress)
    seconds = time.time() - start
    atomic_write(enc_path, lambda tmp: save_file(encoder_state(encoders), tmp))
    curve = [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)]  # mean per 100 steps
    info = dict(key=key, settings=vars(settings), train_seconds=seconds, final_loss=curve[-1], losses=curve)
    atomic_json(info, info_path)  # written last: its presence means the cache is complete
    return ToyWorld(encoders, cache_dir, curve, device)


# -----------------------------------------------------------------------------
# Evaluation: the paper's Table 4 and Fig. 4 on held-out prompts and seeds

ROWS = (("unguided (Euler)", "euler"), ("Euler + CFG", "cfg"), ("Z-Sampling + CFG", "zsampling"),
        ("W2SD + CFG", "w2sd"), ("student", "student"))


def test_batch(world, n):
    """n held-out (prompt, seed) pairs: prompts (n, 3), context (n, L, Dc), y (n, Dy), noise
    (n, 3, H, W) from seeds never used in training."""
    ds = world.dataset("test", size=n)
    idx = torch.arange(n) % len(ds.prompts)
    g = torch.Generator().manual_seed(ToyDataset.SEED_BASE["test"] + 7)
    noise = torch.randn(n, 3, SIZE, SIZE, generator=g)  # (n, 3, H, W)
    return ds.prompts[idx], ds.context[idx], ds.y[idx], noise


def run_sampler(method, world, models, noise, context, y, w, steps, fusion=None):
    """One sampler of samplers.sample on the toy models; returns (x0, NFE per image, seconds)."""
    context_null, y_null = world.encoders.encode_null()
    kw = dict(strong=models["strong"], weak=models["weak"]) if method == "w2sd" else {}
    if method == "student":
        kw["fusion"] = fusion
    model = models["student" if method == "student" else "teacher"]
    start = time.perf_counter()
    x0, nfe = samplers.sample(method, model, noise, context, y, context_null, y_null,
                              w=None if method == "euler" else w, steps=steps, **kw)
    return x0, nfe, time.perf_counter() - start


def image_grid(rows, path, scale=4, pad=2):
    """rows: list of lists of (B, 3, H, W) tensors in [-1, 1]; each cell tiles its B images in a
    row. Writes a PNG (nearest-neighbour upscaled)."""
    from PIL import Image

    cells = [[torch.cat(list(((x.clamp(-1, 1) + 1) / 2)), dim=2) for x in row] for row in rows]  # (3, H, B*W)
    h, w = cells[0][0].shape[1:]
    canvas = torch.ones(3, len(rows) * (h + pad) + pad, len(rows[0]) * (w + pad) + pad)  # white gutters
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            canvas[:, pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = cell
    img = Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)
    return path


def report(world, student_path=None, method="teefusion", out_dir="runs/toy", steps=20, w=4.0, n_prompts=96,
           teacher="w2sd", grid_w=(0.0, 2.0, 4.0, 8.0), fusion=None, progress=True):
    """Evaluate every sampler (and the student at student_path, if given) on n_prompts held-out
    (prompt, seed) pairs; print the paper's Table 4 and write the Fig. 4 grid (methods x w) to
    out_dir/samples.png. method: the student's conditioning ("teefusion", Eq. 7, or another
    embed.FUSIONS name with its trained `fusion` module); teacher: the sampler the student was
    distilled from (its agreement column is the RMSE to that teacher's images from the same noise
    and prompt). Returns {"rows": {name: {...}}, "w": w, "steps": steps, ...}."""
    if method != "teefusion" and fusion is None:
        raise ValueError(f"the {method!r} student needs its trained fusion module (fusion=...)")
    with one_thread():
        student = None
        if student_path is not None:
            student = load_mmdit(student_path, device=world.device).eval().requires_grad_(False)
        rows = [(name, m, None) for name, m in ROWS if m != "student"]
        if student is not None:
            rows.append(("student", "student", dict(model=student, fusion=fusion, method=method,
                                                    teacher=samplers.canonical(teacher, samplers.TEACHERS))))
        results, grid_path = _evaluate(world, rows, out_dir, steps, w, n_prompts, teacher, grid_w, progress)
    table = format_table(results, w, steps, n_prompts, teacher)
    return _write_report(results, table, rows, grid_path, out_dir, w, steps, n_prompts, teacher, grid_w)


# the students of `distill.py --full`, by their embed.FUSIONS name: how the table names them
METHOD_NAMES = {"teefusion": "TeEFusion", "gonly": "G only", "distillcfg": "DistillCFG", "dice": "DICE"}
TEACHER_NAMES = {m: name for name, m in ROWS if m in samplers.TEACHERS}  # "w2sd" -> "W2SD + CFG"


def load_student(path, method="teefusion", device="cpu"):
    """A student written by distill.py: its MMDiT (save_mmdit) and, for the methods that are not
    plain Eq. 7, its student-input module embed.make_fusion(method, config) with the weights of
    fusion.safetensors beside it (fusion-ema.safetensors beside student-ema.safetensors).
    Returns (model, fusion); fusion is None for "teefusion"."""
    model = load_mmdit(path, device=device).eval().requires_grad_(False)
    if method == "teefusion":
        return model, None
    fusion = embed.make_fusion(method, model.config)
    if len(fusion.state_dict()):  # gonly has no weights; distillcfg and dice do
        ema = os.path.basename(path).startswith("student-ema")
        fusion_path = os.path.join(os.path.dirname(path), "fusion-ema.safetensors" if ema else "fusion.safetensors")
        if not os.path.isfile(fusion_path):
            raise FileNotFoundError(f"{fusion_path}: the {method!r} student {path} needs its trained fusion module, "
                                    "which distill.py writes beside the student")
        fusion.load_state_dict(load_file(fusion_path))
    return model, fusion.to(device).eval().requires_grad_(False)


def report_students(world, students, out_dir="runs/toy-full", steps=20, w=4.0, n_prompts=96, teacher="w2sd",
                    grid_w=(0.0, 2.0, 4.0, 8.0), progress=True):
    """The combined table of `distill.py --full`: the Table 4 teacher rows (their agreement column
    against `teacher`), then one row per student, each compared with the teacher IT was distilled
    from. students: a list of dicts with "path" (a student .safetensors), "method" (an embed.FUSIONS
    name), "teacher" (a samplers.TEACHERS name) and optionally "label" (default "DICE <- W2SD + CFG"
    style). distillcfg / dice students are sampled with their fusion module (see `load_student`).
    Prints the table, writes out_dir/table.json and the methods x w grid out_dir/samples.png;
    returns {"rows": {label: {...}}, ...} like `report`."""
    with one_thread():
        rows = [(name, m, None) for name, m in ROWS if m != "student"]
        for s in students:
            t = samplers.canonical(s["teacher"], samplers.TEACHERS)
            model, fusion = load_student(s["path"], s["method"], world.device)
            label = s.get("label") or f"{METHOD_NAMES.get(s['method'], s['method'])} <- {TEACHER_NAMES[t]}"
            if label in {r[0] for r in rows}:
                raise ValueError(f"two rows named {label!r}: give the students distinct labels")
            rows.append((label, "student", dict(model=model, fusion=fusion, teacher=t, method=s["method"],
                                                path=s["path"])))
        results, grid_path = _evaluate(world, rows, out_dir, steps, w, n_prompts, teacher, grid_w, progress)
    table = format_students_table(results, w, steps, n_prompts)
    return _write_report(results, table, rows, grid_path, out_dir, w, steps, n_prompts, teacher, grid_w)


def _evaluate(world, rows, out_dir, steps, w, n_prompts, teacher, grid_w, progress):
    """rows: (name, sampler, student) with student None for the teacher samplers, else a dict with
    its model, fusion, method and the teacher it was distilled from. Returns (results, grid path)."""
    models = {k: world.load(k) for k in ("teacher", "strong", "weak")}
    prompts, context, y, noise = test_batch(world, n_prompts)

    def run(m, s, *a):  # a student row runs samplers.sample("student", ..., fusion=its fusion)
        return run_sampler(m, world, {**models, "student": s["model"]} if s else models, *a,
                           fusion=s["fusion"] if s else None)

    for _, m, s in rows:  # warm-up (first calls allocate and pick kernels), so timings compare like with like
        run(m, s, noise[:2], context[:2], y[:2], w, 2)
    images, results = {}, {}
    for name, m, s in tqdm(rows, desc="toy report", disable=not progress):
        x0, nfe, seconds = run(m, s, noise, context, y, w, steps)
        images[name] = x0
        results[name] = dict(method=m, nfe=float(nfe), seconds_per_image=seconds / n_prompts,
                             adherence=100 * adherence(x0, prompts).mean().item(),
                             teacher=s["teacher"] if s else samplers.canonical(teacher, samplers.TEACHERS))
        if s:
            results[name].update(student_method=s["method"], **({"path": s["path"]} if "path" in s else {}))
    by_sampler = {m: images[name] for name, m, s in rows if s is None}
    for name, r in results.items():
        r["rmse_to_teacher"] = (images[name] - by_sampler[r["teacher"]]).pow(2).mean().sqrt().item()
    # Fig. 4: a row per method, a column per w, the same 6 prompts and noises in every cell
    k = min(6, n_prompts)
    grid = [[run(m, s, noise[:k], context[:k], y[:k], gw, steps)[0] for gw in grid_w] for _, m, s in rows]
    return results, image_grid(grid, os.path.join(out_dir, "samples.png"))


def _write_report(results, table, rows, grid_path, out_dir, w, steps, n_prompts, teacher, grid_w):
    print(table)
    print(f"sample grid (rows: {', '.join(r[0] for r in rows)}; columns: w = {', '.join(map(str, grid_w))}): "
          f"{grid_path}")
    out = dict(rows=results, w=w, steps=steps, n_prompts=n_prompts, teacher=teacher, grid=grid_path, table=table)
    atomic_json({k: v for k, v in out.items() if k != "table"}, os.path.join(out_dir, "table.json"))
    return out


def format_students_table(results, w, steps, n):
    """`format_table` with a column naming each row's teacher (students have different ones)."""
    width = max(18, *map(len, results))
    head = (f"{'method':<{width}} {'NFE':>5} {'ms / image':>11} {'adherence %':>12} {'teacher':>10} "
            f"{'RMSE to teacher':>16}")
    lines = [f"Toy Table 4 with every student (--full): {n} held-out prompts x seeds, {steps} steps, w = {w}",
             head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<{width}} {r['nfe']:>5.0f} {1000 * r['seconds_per_image']:>11.2f} "
                     f"{r['adherence']:>12.1f} {r['teacher']:>10} {r['rmse_to_teacher']:>16.3f}")
    return "\n".join(lines)


def format_table(results, w, steps, n, teacher):
    head = f"{'method':<18} {'NFE':>5} {'ms / image':>11} {'adherence %':>12} {'RMSE to ' + teacher:>14}"
    lines = [f"Toy Table 4: {n} held-out prompts x seeds, {steps} steps, w = {w}", head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<18} {r['nfe']:>5.0f} {1000 * r['seconds_per_image']:>11.2f} {r['adherence']:>12.1f} "
                     f"{r['rmse_to_teacher']:>14.3f}")
    return "\n".join(lines)


def main(args):
    world = build_world(args.cache_dir)
    report(world, args.student, out_dir=args.out_dir, steps=args.steps, w=args.w, n_prompts=args.n_prompts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the toy world (or reuse its cached teacher) and print "
                                                 "the paper's Table 4 on held-out prompts.")
    parser.add_argument("--cache-dir", default="cache/toy")
    parser.add_argument("--student", default=None, help="a student checkpoint from distill.py (adds its row)")
    parser.add_argument("--out-dir", default="runs/toy")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--w", type=float, default=4.0)
    parser.add_argument("--n-prompts", type=int, default=96)
    main(parser.parse_args())
