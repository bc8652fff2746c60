"""
Images + captions -> training shards for distill.py: SD3 latents, captions, and optionally
the SD3 text embeddings, so that distillation (Algorithm 1) reads x0 and c from disk.

Inputs, one of:
    --images DIR       every image under DIR (recursively) with a caption file beside it:
                       cat.jpg + cat.txt (the layout img2dataset writes)
    --captions FILE    a .jsonl or .csv with one image path and one caption per row (columns
                       path | file_name | image and caption | text); relative paths are taken
                       from --images when given, else from the file's folder

Output folder (--out):
    shard-00000.safetensors   the latents: a posterior sample (or the mean, with --posterior mean)
                              of each image after resize + centre crop to its bucket (below): one
                              tensor latents_HxW (N_b, 16, H/8, W/8) per bucket present in the shard,
                              and each sample's [H, W] in the metadata ("sizes", in sample order);
                              with --buckets square a single latents (N, 16, R/8, R/8), as shards
                              were written before buckets. With --text-encoders also context
                              (N, L, 4096) and y (N, 2048), in sample order; the captions and source
                              paths as JSON in the safetensors metadata
    null.safetensors          the null prompt (the encoded empty string), stored once:
                              context (1, L, 4096), y (1, 2048)
    index.json                shards, counts, shapes, settings, and the skipped images

Buckets (--buckets aspect, the default): each image keeps its aspect ratio. For --resolution R the
buckets are the sizes of about R x R pixels at the aspect ratios (width : height) 1:1, 5:4, 4:5,
3:2, 2:3, 16:9 and 9:16: width = 16 round(R sqrt(a) / 16), height = 16 round(R / sqrt(a) / 16),
a bucket kept when its area is within 10% of R^2 (at small R the 16-pixel grid leaves fewer: 3 at
R = 64, 1 at R = 32; `python -c "import prepare; print(prepare.bucket_sizes(512))"` lists them as
(height, width)). R = 1024: 1024x1024, 1152x912,
912x1152, 1248x832, 832x1248, 1360x768, 768x1360 (width x height; the longest side 1360 px, 170
patches of 2 x 8 px: within SD3's 192-patch position table). An image goes to the bucket whose
aspect ratio is nearest to its own (the smallest |log(a_bucket / a_image)|, EXIF rotation applied),
is resized (bicubic) to cover it and centre-cropped. For every image between 9:16 and 16:9 at
R >= 128 the bucket's aspect ratio is within a factor 1.14 of the image's (tests/test_prepare.py),
so the crop removes at most 12% of one side (a square crop of a 16:9 image removes 44%); a wider
image goes to the widest bucket and loses more. distill.py draws every global batch from one
bucket (run/batches.py). index.json gains "buckets" ([{"size": [H, W], "latent_shape", "num_samples"}],
one per bucket of R, in that order) and, per shard, "buckets": the bucket number of each of its
samples; its "latent_shape" is then null and "bytes_per_sample" the mean over the samples. A folder
written with --buckets square (or before buckets) has neither, and reads as one bucket.

Every file is written to a temporary name and renamed, so a shard is either whole or absent.
A re-run skips finished shards (after checking that they hold the same inputs and settings),
which makes an interrupted run resumable: the same command line finishes the job, after removing
the temporary files a killed run left of the files this process writes (`owned`), and a finished
run relaunched writes nothing. Images that cannot be read are skipped and listed (count and path),
never fatal; anything else wrong is a clear error.

    python prepare.py --images data/laion_aesthetic --out data/shards --resolution 1024 \\
        --vae /models/sd3_medium.safetensors --text-encoders /models/stable-diffusion-3-medium-diffusers
    torchrun --nproc_per_node 8 prepare.py ...      # process r takes shards r, r + 8, r + 16, ...

Reading the shards (a map-style Dataset, so DistributedSampler can split it):

    ds = ShardDataset("data/shards")
    ds[0]       # {"latents": (16, h, w), "context": (L, 4096), "y": (2048,), "caption": str}
    ds.null()   # (context (1, L, 4096), y (1, 2048))
    ds.bucket_ids   # the bucket number of every sample (None: one bucket), for batches.StepSampler

Shape legend: N samples in a shard (N_b of them in bucket b), R resolution, H x W a bucket's size in
pixels, h w = H/8 W/8, L text tokens.
"""

import bisect
import csv
import glob
import hashlib
import json
import math
import os
import re

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sd3 import checkpoint
from run import cli
from sd3.checkpoint import atomic_write
from sd3.vae import from_uint8, image_size, load_image, load_vae, weights_file
from sd3.vae import read_config as read_vae_config

SHARD_FORMAT = "teefusion-shard/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PATH_COLUMNS = ("path", "file_name", "image")
CAPTION_COLUMNS = ("caption", "text")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BUCKETS = ("aspect", "square")  # --buckets: keep each image's aspect ratio, or crop every image to R x R
ASPECTS = (1.0, 5 / 4, 3 / 2, 16 / 9)  # width : height of the buckets, and their inverses
AREA_TOLERANCE = 0.1  # a bucket's area is within 10% of R x R


# -----------------------------------------------------------------------------
# Inputs: (image path, caption) pairs


def find_samples(images=None, captions=None):
    """-> (root, [(path relative to root, caption), ...]) in a fixed order.
    images: a folder of images with a .txt caption beside each; captions: a .jsonl or .csv
    file (then `images`, if given, is the root of its relative paths)."""
    if images is None and captions is None:
        raise ValueError("give a folder of images with .txt captions (--images) or a captions file (--captions)")
    if captions is not None:
        if not os.path.isfile(captions):
            raise FileNotFoundError(f"captions file not found: {captions}")
        root = images if images is not None else os.path.dirname(os.path.abspath(captions))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        samples = _read_captions_file(captions)
        if not samples:
            raise ValueError(f"{captions} holds no rows: no captions to prepare")
        missing = [p for p, _ in samples if not os.path.isfile(os.path.join(root, p))]
        if len(missing) == len(samples):  # some missing are skipped and listed; none there is no data set
            raise FileNotFoundError(f"--captions {captions}: none of its {len(samples)} images is under {root} "
                                    f"(e.g. {os.path.join(root, missing[0])}); give the root of its paths as --images")
        return root, samples

    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    paths = sorted(
        os.path.relpath(os.path.join(d, name), images)
        for d, _, names in os.walk(images, followlinks=True)
        for name in names if name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")
    samples, uncaptioned = [], []
    for path in paths:
        cli.regular_file(os.path.join(images, path), f"--images: {os.path.join(images, path)}")
        txt = os.path.join(images, os.path.splitext(path)[0] + ".txt")
        if os.path.isfile(txt):
            caption = cli.read_text(txt, f"caption {txt}").strip()
            if not caption:
                raise ValueError(f"caption {txt} is empty: every sample needs its text (the empty prompt is the "
                                 "null condition, which distill.py adds itself)")
            samples.append((path, caption))
        else:
            uncaptioned.append(path)
    if uncaptioned:
        raise ValueError(f"{len(uncaptioned)} of {len(paths)} images under {images} have no caption file "
                         f"(image.txt beside image.jpg), e.g. {uncaptioned[:10]}. Add captions, remove those "
                         "images, or list path + caption in a --captions .jsonl/.csv file")
    return images, samples


def _read_captions_file(path):
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(cli.read_text(path, f"--captions {path}").split("\n"), 1):
            if line.strip():
                with cli.reading(path, f"--captions {path} line {n}"):
                    rows.append((n, json.loads(line)))
    elif path.endswith(".csv"):
        with cli.reading(path, f"--captions {path}"), open(path, encoding="utf-8", newline="") as f:
            rows = list(enumerate(csv.DictReader(f), 2))  # line 1 is the header
    else:
        raise ValueError(f"captions file {path}: expected a .jsonl or .csv file")
    samples = []
    for n, row in rows:
        path_col = next((c for c in PATH_COLUMNS if isinstance(row, dict) and row.get(c)), None)
        caption_col = next((c for c in CAPTION_COLUMNS if isinstance(row, dict) and row.get(c) is not None), None)
        if path_col is None or caption_col is None:
            raise ValueError(f"{path} line {n}: need an image path column ({' | '.join(PATH_COLUMNS)}) and a "
                             f"caption column ({' | '.join(CAPTION_COLUMNS)}); got {row!r}")
        image, caption = row[path_col], row[caption_col]
        if not isinstance(image, str) or not isinstance(caption, str):
            bad, value = ("path", image) if not isinstance(image, str) else ("caption", caption)
            raise ValueError(f"{path} line {n}: the {bad} is {json.dumps(value)}, not a string: a caption or path is "
                             "never made up from another value")
        if not caption.strip():
            raise ValueError(f"{path} line {n}: the caption of {image} is empty: every sample needs its text (the "
                             "empty prompt is the null condition, which distill.py adds itself)")
        samples.append((image, caption.strip()))
    return samples


# -----------------------------------------------------------------------------
# Buckets: sizes of about R x R pixels that keep an image's aspect ratio (the module docstring)


def bucket_sizes(resolution, buckets="aspect"):
    """[(height, width)] of the buckets of --resolution R, portrait to landscape: R x R alone for
    "square"; for "aspect" the ASPECTS and their inverses on the 16-pixel grid, each within
    AREA_TOLERANCE of R^2, duplicates dropped."""
    if buckets == "square":
        return [(resolution, resolution)]
    sizes = []
    for a in ASPECTS:
        for ratio in (a,) if a == 1 else (a, 1 / a):
            width = 16 * round(resolution * math.sqrt(ratio) / 16)
            height = 16 * round(resolution / math.sqrt(ratio) / 16)
            if abs(width * height / resolution**2 - 1) <= AREA_TOLERANCE and (height, width) not in sizes:
                sizes.append((height, width))
    return sorted(sizes, key=lambda s: s[1] / s[0])


def nearest_bucket(width, height, sizes):
    """The number of the bucket whose aspect ratio is nearest to width / height (in log ratio; ties:
    the first)."""
    return min(range(len(sizes)), key=lambda b: abs(math.log(sizes[b][1] / sizes[b][0] * height / width)))


class _ImageFiles(Dataset):
    """Reads and resizes images in DataLoader workers, each to its bucket (an index into `sizes`,
    [(height, width)]). An unreadable image comes back as an error string, so that one bad file
    among millions is reported instead of fatal."""

    def __init__(self, root, paths, sizes):
        self.root, self.paths, self.sizes = root, paths, sizes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            path = os.path.join(self.root, self.paths[i])
            b = 0 if len(self.sizes) == 1 else nearest_bucket(*image_size(path), self.sizes)
            height, width = self.sizes[b]
            image = load_image(path, height if height == width else (width, height))
            return i, torch.from_numpy(np.array(image)), None, b  # (H, W, 3) uint8
        except MemoryError:
            raise  # no fault of the image: the run fails (exit status 1) rather than skip every image
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            return i, None, f"{type(e).__name__}: {e}", None


def _as_list(batch):
    return batch


# -----------------------------------------------------------------------------
# Writing


def _save(tensors, path, metadata=None):
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _shard_name(s):
    return f"shard-{s:05d}.safetensors"


def _fingerprint(items):
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def _check_existing_shard(path, settings, fingerprint):
    """A finished shard may be reused only if it holds the same inputs under the same settings."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} exists but cannot be read ({e}); delete it to rebuild it") from e
    if meta.get("shard_format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a shard written by prepare.py ({SHARD_FORMAT}); use another --out folder")
    old = json.loads(meta["settings"])
    if old != settings:
        diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
        changes = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in diff.items())
        raise ValueError(f"{path} was written with other settings ({changes}); "
                         "use a new --out folder, or delete the old shards")
    if meta["inputs_sha256"] != fingerprint:
        raise ValueError(f"{path} holds other images/captions than the current inputs assign to it (inputs changed "
                         "since it was written); use a new --out folder, or delete the old shards")


def check_settings(resolution, shard_size, batch_size, posterior, buckets="aspect"):
    """Refuse settings that cannot work (before any model is loaded, from the command line)."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 16:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of 16 (the VAE divides it "
                         "by 8 and the MMDiT's 2x2 patches by 2 more)")
    if buckets not in BUCKETS:
        raise ValueError(f"buckets must be one of {BUCKETS}, got {buckets!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard-size {shard_size} and --batch-size {batch_size}: each must be at least 1")
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")


def shard_bytes(config, resolution, shard_size, dtype, text):
    """A shard's tensors, all held in memory until the shard is written: latents (C, R/8, R/8) (a bucket of
    about R x R pixels holds about as many) and, with text embeddings, SD3's context (333, 4096) and pooled y
    (2048), per sample in the storage dtype."""
    h = resolution // config.downsample
    numbers = config.latent_channels * h * h + ((77 + 256) * 4096 + 2048 if text else 0)
    return shard_size * numbers * (torch.finfo(dtype).bits // 8)


def batch_bytes(config, resolution, batch_size, workers, precision):
    """Lower bounds of the memory prepare.py needs at a resolution: (on the CPU, the decoded images in
    flight, each read and resized by PIL and held as uint8 (2 x 3 bytes a pixel), a batch per worker
    and one being encoded, then as float32 (12 bytes a pixel); on the VAE's device, the encoder's
    full-resolution activations of a chunk of up to 4 images (VAE.encode): at least three tensors of
    the first level's channels alive at once)."""
    pixels, itemsize = resolution * resolution, torch.finfo(precision).bits // 8
    images = batch_size * pixels * (2 * 3 * (max(workers, 0) + 1) + 12)
    return images, min(batch_size, 4) * pixels * 3 * config.block_out_channels[0] * itemsize


def encode_batch(vae, text_encoder, images, captions, buckets, generator, dtype):
    """uint8 images [(H_k, W_k, 3)], their captions and their bucket numbers -> {"latents": [(bucket,
    latent (16, H_k/8, W_k/8))] in the images' order, and with a text encoder "context": (b, L, Dc),
    "y": (b, Dy)}, on the CPU in the storage dtype. The images of one bucket go through the VAE
    together, the buckets in ascending order (so the posterior samples drawn from `generator` are the
    same at every rebuild; with one bucket, one call for the whole batch as before buckets)."""
    latents = [None] * len(images)
    for b in sorted(set(buckets)):
        members = [k for k, bk in enumerate(buckets) if bk == b]
        x = from_uint8(torch.stack([images[k] for k in members]))  # (n, 3, H, W) in [-1, 1]
        z = vae.encode(x, generator=generator).to(dtype)  # (n, 16, H/8, W/8): x0 for Algorithm 1
        for k, zk in zip(members, z):
            latents[k] = (b, zk)
    out = {"latents": latents}
    if text_encoder is not None:
        context, y = text_encoder.encode(captions)  # (b, L, Dc), (b, Dy)
        if context.ndim != 3 or y.ndim != 2 or len(context) != len(captions) or len(y) != len(captions):
            raise ValueError(f"text_encoder.encode returned context {tuple(context.shape)} and y {tuple(y.shape)} "
                             f"for {len(captions)} prompts; expected (B, L, D) and (B, D)")
        out.update(context=context.to("cpu", dtype), y=y.to("cpu", dtype))
    return out


def latent_name(size):
    """The shard tensor of bucket (H, W): latents_HxW."""
    return f"latents_{size[0]}x{size[1]}"


def prepare(samples, out, vae, resolution, root=".", text_encoder=None, shard_size=256, batch_size=8,
            dtype=torch.bfloat16, posterior="sample", seed=0, rank=0, world_size=1, workers=4, sources=None,
            progress=True, buckets="aspect"):
    """Encode `samples` [(path relative to root, caption), ...] into shards under `out`.

    buckets: "aspect" (each image to the bucket of bucket_sizes(resolution) nearest its aspect ratio) or
    "square" (every image to resolution x resolution; shards as written before buckets).
    vae: a vae.VAE. text_encoder: None (latents and captions only) or an object with
    encode(prompts) -> (context (B, L, Dc), y (B, Dy)) and encode_null() -> (context (1, L, Dc),
    y (1, Dy)), e.g. text_encoders.TextEncoders. This process handles shards rank, rank + world_size, ...
    and skips shards already on disk. Returns {"built": [...], "reused": [...], "index": the
    index dict, or None while other processes' shards are missing}.
    """
    check_settings(resolution, shard_size, batch_size, posterior, buckets)
    if not samples:
        raise ValueError("no samples to prepare")
    os.makedirs(out, exist_ok=True)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    settings = dict(resolution=resolution, shard_size=shard_size, dtype=dtype_name, posterior=posterior,
                    seed=seed if posterior == "sample" else None, text=text_encoder is not None)
    if buckets == "aspect":  # (square shards keep the settings, and so the files, of before buckets)
        settings["buckets"] = buckets
    sizes = bucket_sizes(resolution, buckets)  # [(H, W)]
    num_shards = math.ceil(len(samples) / shard_size)

    null = None
    if text_encoder is not None:
        null_context, null_y = text_encoder.encode_null()  # the paper's null prompt: the encoded "" (SPEC 2)
        null = {"context": null_context.to("cpu", dtype), "y": null_y.to("cpu", dtype)}  # (1, L, Dc), (1, Dy)
        if rank == 0 and not os.path.exists(os.path.join(out, "null.safetensors")):
            _save(null, os.path.join(out, "null.safetensors"), {"shard_format": SHARD_FORMAT})

    mine, built, reused = [], [], []
    for s in range(rank, num_shards, world_size):
        items = samples[s * shard_size:(s + 1) * shard_size]
        path = os.path.join(out, _shard_name(s))
        if os.path.exists(path):
            _check_existing_shard(path, settings, _fingerprint(items))
            reused.append(s)
        else:
            mine.append((s, items))

    # One DataLoader for all of this process's work, one batch never crossing a shard boundary,
    # so image decoding (workers) overlaps encoding (main process).
    todo, batches = [], []  # todo: (path, caption) of every sample to encode; batches: their indices
    for _, items in mine:
        first, last = len(todo), len(todo) + len(items)
        batches.append([list(range(b, min(b + batch_size, last))) for b in range(first, last, batch_size)])
        todo += items
    loader = DataLoader(_ImageFiles(root, [p for p, _ in todo], sizes), num_workers=workers,
                        batch_sampler=[b for shard_batches in batches for b in shard_batches], collate_fn=_as_list)
    loaded = iter(loader)
    bar = tqdm(total=len(todo), unit="img", disable=not progress,
               desc=f"prepare [rank {rank}/{world_size}]" if world_size > 1 else "prepare")
    for (s, items), shard_batches in zip(mine, batches):
        # A generator per shard: a rebuilt shard gets the same posterior samples as the first time.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + s) if posterior == "sample" else None
        parts, kept, skipped = [], [], []
        for _ in shard_batches:
            batch = next(loaded)  # [(index into todo, (H, W, 3) uint8 or None, error or None, bucket), ...]
            for i, _, error, _ in batch:
                if error is not None:
                    skipped.append({"path": todo[i][0], "error": error})
                    bar.write(f"skipping unreadable image {os.path.join(root, todo[i][0])}: {error}")
            ok = [(todo[i], image, b) for i, image, error, b in batch if error is None]
            if ok:
                parts.append(encode_batch(vae, text_encoder, [image for _, image, _ in ok], [c for (_, c), _, _ in ok],
                                          [b for _, _, b in ok], generator, dtype))
                kept += [sample for sample, _, _ in ok]
            bar.update(len(batch))

        latents = [z for part in parts for z in part["latents"]]  # (bucket, (16, h, w)) of each kept sample
        ds, C = vae.config.downsample, vae.config.latent_channels
        if buckets == "square":  # one tensor, empty when no image of the shard was readable
            tensors = {"latents": torch.stack([z for _, z in latents]) if latents
                       else torch.zeros(0, C, resolution // ds, resolution // ds, dtype=dtype)}  # (N, 16, h, w)
        else:  # one tensor per bucket present, its rows in sample order
            tensors = {latent_name(sizes[b]): torch.stack([z for bz, z in latents if bz == b])  # (N_b, 16, h, w)
                       for b in sorted({b for b, _ in latents})}
        if null is not None:
            context = torch.cat([part["context"] for part in parts]) if parts else null["context"][:0]  # (N, L, Dc)
            tensors.update(context=context, y=torch.cat([part["y"] for part in parts]) if parts else null["y"][:0])
        metadata = {
            "shard_format": SHARD_FORMAT, "settings": json.dumps(settings), "inputs_sha256": _fingerprint(items),
            "num_samples": str(len(kept)), "captions": json.dumps([c for _, c in kept], ensure_ascii=False),
            "paths": json.dumps([p for p, _ in kept], ensure_ascii=False),
            "skipped": json.dumps(skipped, ensure_ascii=False),
        }
        if buckets == "aspect":  # each sample's size, in sample order: the shard records it
            metadata["sizes"] = json.dumps([list(sizes[b]) for b, _ in latents])
        _save(tensors, os.path.join(out, _shard_name(s)), metadata)
        built.append(s)
    bar.close()

    index = None
    if all(os.path.exists(os.path.join(out, _shard_name(s))) for s in range(num_shards)):
        index = write_index(out, num_shards, settings, dict(sources or {}, root=os.path.abspath(root)))
    elif progress:
        print(f"rank {rank}: my shards are done; the last process to finish writes index.json")
    return {"built": built, "reused": reused, "index": index}


def write_index(out, num_shards, settings, sources):
    """Build index.json from the shards' headers (not from memory), so any process, or a
    re-run, writes the same index. With buckets: the bucket of every sample, from each shard's
    "sizes" (the module docstring)."""
    sizes = bucket_sizes(settings["resolution"]) if settings.get("buckets") == "aspect" else None
    shards, skipped, shapes, counts = [], [], {}, {}
    for s in range(num_shards):
        with safe_open(os.path.join(out, _shard_name(s)), framework="pt") as f:
            meta = f.metadata()
            shards.append({"file": _shard_name(s), "num_samples": int(meta["num_samples"])})
            skipped += json.loads(meta["skipped"])
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                shapes[name] = shape[1:]
                counts[name] = counts.get(name, 0) + shape[0]
            if sizes is not None:
                shards[-1]["buckets"] = [sizes.index(tuple(size)) for size in json.loads(meta["sizes"])]
    if not sum(s["num_samples"] for s in shards):
        first = f" (first: {skipped[0]['path']}: {skipped[0]['error']})" if skipped else ""
        raise cli.Failure(f"none of the {len(skipped)} images could be read{first}: index.json was not written. Fix or "
                          f"remove them, delete {out}/shard-*.safetensors, and run again")
    itemsize = torch.empty(0, dtype=DTYPES[settings["dtype"]]).element_size()
    n = sum(s["num_samples"] for s in shards)
    index = {
        "format": "teefusion-shards/1",
        "num_samples": n,
        "num_skipped": len(skipped),
        "settings": settings,
        "latent_shape": shapes.get("latents"),
        "context_shape": shapes.get("context"),
        "y_shape": shapes.get("y"),
        "null": "null.safetensors" if settings["text"] else None,
        # with buckets: the mean over the samples (the buckets' areas differ by up to 10%)
        "bytes_per_sample": itemsize * (sum(math.prod(v) * counts[k] for k, v in shapes.items()) // max(n, 1)
                                        if sizes is not None else sum(math.prod(v) for v in shapes.values())),
        "shards": shards,
        "skipped": skipped,
        "sources": sources,
    }
    if sizes is not None:
        index["buckets"] = [{"size": list(size), "latent_shape": shapes.get(latent_name(size)),
                             "num_samples": counts.get(latent_name(size), 0)} for size in sizes]

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)

    atomic_write(os.path.join(out, "index.json"), write, keep_same=True)  # the same index is not rewritten
    return index


def owned(rank, world_size):
    """Which of --out's files this process writes, by name: its shards (r, r + N, ...), and on rank 0
    null.safetensors; a single process also index.json (under torchrun the last process to finish
    writes it, so a temporary of index.json may be another rank's: it is named at the end, not removed)."""
    def mine(name):
        shard = re.fullmatch(r"shard-(\d+)\.safetensors", name)
        if shard:
            return int(shard[1]) % world_size == rank
        return (name == "null.safetensors" and rank == 0) or (name == "index.json" and world_size == 1)
    return mine


# -----------------------------------------------------------------------------
# Reading


def read_index(folder):
    """index.json of a prepared folder, checked: it parses, lists shards with their sample counts,
    and every shard it lists (and null.safetensors, with text embeddings) exists. The shards'
    contents are checked when each is first read (ShardDataset), not here."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index.json in {folder}: run prepare.py (it writes index.json once every "
                                "shard is done)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e}); re-run prepare.py with the same arguments: it reuses the "
                         "finished shards and writes index.json again") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not isinstance(index.get("settings"), dict) or "text" not in index["settings"] \
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_samples"), int)
                       and s["num_samples"] >= 0 for s in shards):
        raise ValueError(f"{path} is not an index written by prepare.py (it needs \"shards\": [{{\"file\", "
                         "\"num_samples\"}, ...] and \"settings\": {\"text\"}); re-run prepare.py")
    outside = next((s["file"] for s in shards if os.path.isabs(s["file"]) or os.path.basename(s["file"]) != s["file"]
                    or s["file"] in ("", ".", "..")), None)
    if outside is not None:
        raise ValueError(f"{path} names the shard file {outside!r}, which is no file name inside {folder}: prepare.py "
                         "writes shard-NNNNN.safetensors beside index.json; re-run prepare.py")
    buckets = index.get("buckets")
    if buckets is not None and not (
            isinstance(buckets, list) and all(isinstance(b, dict) and isinstance(b.get("size"), list) for b in buckets)
            and all(isinstance(s.get("buckets"), list) and len(s["buckets"]) == s["num_samples"]
                    and all(isinstance(k, int) and 0 <= k < len(buckets) for k in s["buckets"]) for s in shards)):
        raise ValueError(f"{path} has \"buckets\" but not a bucket for every sample of every shard (\"buckets\": "
                         "[{\"size\": [H, W]}, ...], and per shard a list of bucket numbers); re-run prepare.py")
    missing = [s["file"] for s in shards if not os.path.isfile(os.path.join(folder, s["file"]))]
    if index["settings"]["text"] and not os.path.isfile(os.path.join(folder, "null.safetensors")):
        missing.append("null.safetensors")
    if missing:
        raise FileNotFoundError(f"{path} lists {len(missing)} file(s) missing from {folder}: {', '.join(missing[:5])}"
                                f"{', ...' if len(missing) > 5 else ''}; re-run prepare.py with the same arguments")
    return index


def _header(path, names):
    """{name: (shape without the first axis, dtype)} of the tensors of `path` that `names` picks from its
    keys (a function of the key list -> {name: key}); None if the header cannot be read (the dataset
    names the file where it reads it)."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            return {name: (tuple(f.get_slice(key).get_shape()[1:]), f.get_slice(key).get_dtype())
                    for name, key in names(keys).items() if key is not None}
    except Exception:  # safetensors' own SafetensorError, OSError
        return None


def sample_shapes(folder, index):
    """{"latents": (C, h, w), "context": (L, Dc), "y": (Dy,)} of one sample of a prepared folder, from
    the header of its first shard with samples (index.json's record when there is none, or it cannot be
    read: ShardDataset names the shard when it reads it); None if there is nothing to read. The record of
    index.json, the first shard and null.safetensors must agree, and hold floating-point numbers: an index
    of other shards, or a null prompt of other text encoders, is refused naming the files. Reads no tensor."""
    recorded = dict(latents=index.get("latent_shape"), context=index.get("context_shape"), y=index.get("y_shape"))
    buckets = index.get("buckets")
    if recorded["latents"] is None and isinstance(buckets, list) and buckets and isinstance(buckets[0], dict):
        recorded["latents"] = buckets[0].get("latent_shape")  # aspect buckets: the first bucket's (C, h, w)
    recorded = {k: tuple(v) for k, v in recorded.items() if isinstance(v, list)}
    first = next((s["file"] for s in index["shards"] if s["num_samples"] > 0), None)
    # the latents of a bucketed shard are latents_HxW, one tensor per bucket present
    found = first and _header(os.path.join(folder, first), lambda keys: dict(
        latents=next((k for k in keys if k == "latents" or k.startswith("latents_")), None),
        context="context" if "context" in keys else None, y="y" if "y" in keys else None))
    shapes = dict(recorded)
    if found:
        bad = {k: d for k, (_, d) in found.items() if d not in checkpoint.FLOAT_DTYPES}
        if bad:
            k, d = next(iter(bad.items()))
            raise ValueError(f"{os.path.join(folder, first)}: its {k} are {d}, not floating point: shards hold float "
                             "latents and text embeddings (write them again with prepare.py)")
        for k, (shape, _) in found.items():
            # a bucketed index records the first bucket's size; a shard's first latents may be another bucket's
            same = k not in recorded or (shape[:1] == recorded[k][:1] if k == "latents" and buckets
                                         else shape == recorded[k])
            if not same:
                raise ValueError(f"{os.path.join(folder, 'index.json')} records {k} of shape {list(recorded[k])}, but "
                                 f"{first} holds {list(shape)}: the index is not of these shards; re-run prepare.py")
            shapes[k] = shape
    elif first is None and not recorded:
        return None
    expected = dict(latents=3, context=2, y=1)
    if any(len(shapes.get(k) or ()) != n for k, n in expected.items()):
        if first is not None and found is None and len(recorded) < 3:
            return None  # an unreadable first shard: the data set names it where it reads it
        raise ValueError(f"{folder}: its samples are {shapes}; expected latents (C, h, w), context (L, Dc) and y "
                         "(Dy,): re-run prepare.py with --text-encoders")
    null = _header(os.path.join(folder, "null.safetensors"), lambda keys: {k: k for k in ("context", "y") if k in keys})
    if null:
        for k in ("context", "y"):
            if k in null and (null[k][0] != shapes[k] or null[k][1] not in checkpoint.FLOAT_DTYPES):
                raise ValueError(f"{os.path.join(folder, 'null.safetensors')}: the null prompt's {k} is "
                                 f"{list(null[k][0])} {null[k][1]}, but the samples' is {list(shapes[k])} floating "
                                 "point: not of the same text encoders; re-run prepare.py")
    return {k: tuple(v) for k, v in shapes.items()}


class ShardDataset(Dataset):
    """All samples of a prepared folder as one map-style dataset (DistributedSampler splits it
    by index). ds[i] = {"latents": (16, h, w), "caption": str} plus, when the shards hold text
    embeddings, "context": (L, Dc) and "y": (Dy,). Tensors keep the stored dtype unless `dtype`
    is given. Only the requested rows are read (safetensors slices of memory-mapped files).
    With buckets, h x w is the sample's bucket; bucket_sizes lists the buckets ([(H, W)] pixels)
    and bucket_ids gives the bucket of every sample (both None for one size: a square folder)."""

    max_open = 64  # shard files kept open per process

    def __init__(self, folder, dtype=None):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such folder (a folder written by prepare.py)")
        self.index = read_index(folder)
        self.folder, self.dtype = folder, dtype
        self.files = [os.path.join(folder, s["file"]) for s in self.index["shards"]]
        counts = [s["num_samples"] for s in self.index["shards"]]
        self.starts = np.cumsum([0] + counts).tolist()  # the first sample index of each shard, then the total
        self.has_text = bool(self.index["settings"]["text"])
        buckets = self.index.get("buckets")
        self.bucket_sizes = [tuple(b["size"]) for b in buckets] if buckets is not None else None
        self.bucket_ids = [k for s in self.index["shards"] for k in s["buckets"]] if buckets is not None else None
        # shard number -> (safe_open handle, text tensor names, captions, (latent tensor, row) of each sample)
        self._open = {}

    def __len__(self):
        return self.starts[-1]

    def _shard(self, s):
        """Open shard s when it is first read (a large set is never opened all at once), and check it
        against the index: a shard that is corrupt, or holds another number of samples, is named."""
        if s not in self._open:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))  # close the oldest
            path, expected = self.files[s], self.index["shards"][s]["num_samples"]
            if self.bucket_sizes is None:  # one tensor "latents" of every sample
                latents = [("latents", row) for row in range(expected)]
            else:  # latents_HxW of each bucket, its rows in sample order
                seen = {}
                latents = []
                for k in self.index["shards"][s]["buckets"]:
                    latents.append((latent_name(self.bucket_sizes[k]), seen.get(k, 0)))
                    seen[k] = seen.get(k, 0) + 1
            want = {name: sum(1 for n, _ in latents if n == name) for name, _ in latents}  # rows per latent tensor
            try:
                f = safe_open(path, framework="pt")
                names = [name for name in ("context", "y") if name in f.keys()]
                captions = json.loads((f.metadata() or {})["captions"])
                rows = {name: f.get_slice(name).get_shape()[0] for name in names}
                held = {name: f.get_slice(name).get_shape()[0] for name in f.keys() if name.startswith("latents")}
            except Exception as e:  # safetensors' own SafetensorError, OSError, a missing or bad "captions"
                raise ValueError(f"{path} is a corrupt shard ({type(e).__name__}: {e}); delete it and re-run "
                                 "prepare.py with the same arguments to rebuild it") from e
            square_empty = self.bucket_sizes is None and expected == 0 and "latents" in held
            if (held != want and not square_empty) or set(rows.values()) - {expected} or len(captions) != expected:
                raise ValueError(f"{path} holds {dict(held, **rows)} rows and {len(captions)} captions, but index.json "
                                 f"says {expected} samples ({want or 'no latents'}); delete it and re-run prepare.py "
                                 "with the same arguments")
            self._open[s] = (f, names, captions, latents)
        return self._open[s]

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        s = bisect.bisect_right(self.starts, i) - 1
        row = i - self.starts[s]
        f, names, captions, latents = self._shard(s)
        name, latent_row = latents[row]
        item = {"latents": f.get_slice(name)[latent_row]}  # reads this row only
        item.update({name: f.get_slice(name)[row] for name in names})
        if self.dtype is not None:
            item = {k: v.to(self.dtype) for k, v in item.items()}
        item["caption"] = captions[row]
        return item

    def null(self):
        """The null prompt's embedding: (context (1, L, Dc), y (1, Dy))."""
        if not self.has_text:
            raise ValueError(f"{self.folder} holds no text embeddings (prepared without --text-encoders)")
        path = os.path.join(self.folder, "null.safetensors")
        try:
            with safe_open(path, framework="pt") as f:
                context, y = f.get_tensor("context"), f.get_tensor("y")
        except Exception as e:  # safetensors' own SafetensorError, OSError
            raise ValueError(f"{path}, the null prompt's embedding, cannot be read ({type(e).__name__}: {e}); "
                             "delete it and re-run prepare.py with the same arguments") from e
        return (context.to(self.dtype), y.to(self.dtype)) if self.dtype is not None else (context, y)

    def __getstate__(self):  # open files do not travel to DataLoader workers; each reopens its own
        return {**self.__dict__, "_open": {}}


# -----------------------------------------------------------------------------
# Command line


def main(args):
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets these
    cli.check_device(args.device)
    cli.output_folder(args.out, "--out", create=False)  # created below, once everything else is checked
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    precision = DTYPES[args.precision or ("bf16" if device.startswith("cuda") else "fp32")]
    # everything that can be checked is checked before the VAE and the text encoders load
    check_settings(args.resolution, args.shard_size, args.batch_size, args.posterior, args.buckets)
    cpus = os.cpu_count() or 1
    cli.at_least(args.workers, 0, "--workers", high=4 * cpus,
                 why=f"image-reading worker processes; more than 4 per CPU ({cpus} here) only compete for them")
    if not os.path.exists(args.vae):
        raise FileNotFoundError(f"--vae {args.vae}: no such file or folder")
    if args.text_encoders and not os.path.isdir(args.text_encoders):
        raise FileNotFoundError(f"--text-encoders folder not found: {args.text_encoders}")
    root, samples = find_samples(args.images, args.captions)
    num_shards = math.ceil(len(samples) / args.shard_size)
    cli.check_seed(args.seed, "--seed", args.seed * 1_000_003 + num_shards - 1,
                   "shard s draws its posterior samples from seed * 1000003 + s")
    vae_file = weights_file(args.vae)
    outputs = [("--out", os.path.join(args.out, n)) for n in ("index.json", "null.safetensors", _shard_name(0))]
    cli.not_an_input(outputs, [("--captions", args.captions), ("--vae", vae_file)])
    config = read_vae_config(args.vae)  # from its header: a file that is no VAE is refused before any image is read
    images, activations = batch_bytes(config, args.resolution, args.batch_size, args.workers, precision)
    what = f"a batch of {args.batch_size} images of {args.resolution} x {args.resolution}"
    if device.startswith("cuda"):
        cli.check_memory(images, what, "--resolution or --batch-size")
        cli.check_memory(activations, what + " through the VAE", "--resolution or --batch-size", device)
    else:
        cli.check_memory(images + activations, what + " through the VAE", "--resolution or --batch-size")
    shard = min(args.shard_size, len(samples))
    cli.check_memory(shard_bytes(config, args.resolution, shard, DTYPES[args.dtype], args.text_encoders is not None),
                     f"a shard of {shard} samples, held until it is written", "--shard-size or --resolution")
    cli.output_folder(args.out, "--out")
    checkpoint.remove_temporaries(args.out, owned=owned(rank, world_size))  # what a killed run left of my files
    if rank == 0:
        print(f"{len(samples)} images with captions from {args.captions or args.images}; "
              f"{math.ceil(len(samples) / args.shard_size)} shards of up to {args.shard_size} -> {args.out}; "
              "buckets (width x height): "
              + ", ".join(f"{w}x{h}" for h, w in bucket_sizes(args.resolution, args.buckets)))
    vae = load_vae(args.vae, device=device, dtype=precision)
    text_encoder = None
    if args.text_encoders:
        try:
            from sd3.text_encoders import TextEncoders  # imported here: prepare.py works (latents only) without embed.py
        except ImportError as e:
            raise ImportError(f"--text-encoders needs text_encoders.TextEncoders (embed.py): {e}") from e
        text_encoder = TextEncoders.from_pretrained(args.text_encoders, device=device, dtype=precision,
                                                    use_t5=not args.no_t5)
    sources = dict(vae=os.path.abspath(args.vae), use_t5=not args.no_t5,
                   text_encoders=os.path.abspath(args.text_encoders) if args.text_encoders else None)
    result = prepare(samples, args.out, vae, args.resolution, root=root, text_encoder=text_encoder,
                     shard_size=args.shard_size, batch_size=args.batch_size, dtype=DTYPES[args.dtype],
                     posterior=args.posterior, seed=args.seed, rank=rank, world_size=world_size,
                     workers=args.workers, sources=sources, progress=rank == 0, buckets=args.buckets)
    who = f"rank {rank}: " if world_size > 1 else ""
    print(f"{who}built {len(result['built'])} shards, reused {len(result['reused'])} finished ones")
    index = result["index"]
    if index is not None:
        size = index["bytes_per_sample"]
        print(f"index.json: {index['num_samples']} samples in {len(index['shards'])} shards, {size:,} bytes "
              f"({size / 2**20:.2f} MiB) per sample, {size * index['num_samples'] / 2**30:.2f} GiB in all")
        if index["skipped"]:
            print(f"skipped {index['num_skipped']} unreadable images (all listed in index.json):")
            for item in index["skipped"][:20]:
                print(f"  {os.path.join(root, item['path'])}: {item['error']}")
    leftovers = glob.glob(os.path.join(args.out, "*.tmp*"))
    if leftovers:
        print(f"{len(leftovers)} temporary files from interrupted runs, safe to delete when no prepare.py "
              f"is running: {leftovers[:5]}")


if __name__ == "__main__":
    parser = cli.parser("Images + captions -> latent (+ text embedding) shards.")
    parser.add_argument("--images", help="folder of images, each with a .txt caption beside it "
                                         "(or the root of the relative paths in --captions)")
    parser.add_argument("--captions", help=".jsonl or .csv with path + caption per row")
    parser.add_argument("--out", required=True, help="output folder for the shards and index.json")
    parser.add_argument("--vae", required=True,
                        help="Stability single file, VAE .safetensors, or diffusers vae/ folder")
    parser.add_argument("--text-encoders", help="folder for text_encoders.TextEncoders.from_pretrained; "
                                                "without it the shards hold latents and captions only")
    parser.add_argument("--no-t5", action="store_true", help="encode without T5 (passed to TextEncoders)")
    parser.add_argument("--resolution", type=int, default=1024, help="R, a multiple of 16: the images' area is about "
                        "R x R (default 1024)")
    parser.add_argument("--buckets", choices=BUCKETS, default="aspect", help="aspect (default): resize + centre crop "
                        "each image to the bucket of about R x R pixels nearest its aspect ratio (1:1, 5:4, 3:2, 16:9 "
                        "and their inverses); square: every image to R x R")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VAE / text encoder call")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the stored tensors")
    parser.add_argument("--precision", choices=["bf16", "fp32"],
                        help="compute dtype of the VAE and text encoders (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--posterior", choices=["sample", "mean"], default="sample",
                        help="store a VAE posterior sample (seeded per shard) or its mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers reading images")
    parser.add_argument("--device", help="default cuda:LOCAL_RANK when CUDA is available, else cpu")
    cli.run(main, parser)
