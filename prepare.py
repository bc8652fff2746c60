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
    shard-00000.safetensors   latents (N, 16, R/8, R/8): a posterior sample (or the mean, with
                              --posterior mean) after resize + centre crop to R x R; with
                              --text-encoders also context (N, L, 4096) and y (N, 2048); the
                              captions and source paths as JSON in the safetensors metadata
    null.safetensors          the null prompt (the encoded empty string), stored once:
                              context (1, L, 4096), y (1, 2048)
    index.json                shards, counts, shapes, settings, and the skipped images

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

Shape legend: N samples in a shard, R resolution, h = w = R/8, L text tokens.
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

import checkpoint
import cli
from checkpoint import atomic_write
from vae import from_uint8, load_image, load_vae

SHARD_FORMAT = "teefusion-shard/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PATH_COLUMNS = ("path", "file_name", "image")
CAPTION_COLUMNS = ("caption", "text")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
        txt = os.path.join(images, os.path.splitext(path)[0] + ".txt")
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                samples.append((path, f.read().strip()))
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
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {n} is not JSON: {e}") from e
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
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
        samples.append((str(row[path_col]), str(row[caption_col]).strip()))
    return samples


class _ImageFiles(Dataset):
    """Reads and resizes images in DataLoader workers. An unreadable image comes back as an
    error string, so that one bad file among millions is reported instead of fatal."""

    def __init__(self, root, paths, resolution):
        self.root, self.paths, self.resolution = root, paths, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = load_image(os.path.join(self.root, self.paths[i]), self.resolution)
            return i, torch.from_numpy(np.array(image)), None  # (R, R, 3) uint8
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            return i, None, f"{type(e).__name__}: {e}"


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


def check_settings(resolution, shard_size, batch_size, posterior):
    """Refuse settings that cannot work (before any model is loaded, from the command line)."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution {resolution} must be a positive multiple of 16 (the VAE divides it "
                         "by 8 and the MMDiT's 2x2 patches by 2 more)")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be at least 1")
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")


def encode_batch(vae, text_encoder, images, captions, generator, dtype):
    """uint8 images (b, R, R, 3) and their captions -> {"latents": (b, 16, R/8, R/8), and with a
    text encoder "context": (b, L, Dc), "y": (b, Dy)}, on the CPU in the storage dtype."""
    out = {"latents": vae.encode(from_uint8(images), generator=generator).to(dtype)}  # x0 for Algorithm 1
    if text_encoder is not None:
        context, y = text_encoder.encode(captions)  # (b, L, Dc), (b, Dy)
        if context.ndim != 3 or y.ndim != 2 or len(context) != len(captions) or len(y) != len(captions):
            raise ValueError(f"text_encoder.encode returned context {tuple(context.shape)} and y {tuple(y.shape)} "
                             f"for {len(captions)} prompts; expected (B, L, D) and (B, D)")
        out.update(context=context.to("cpu", dtype), y=y.to("cpu", dtype))
    return out


def prepare(samples, out, vae, resolution, root=".", text_encoder=None, shard_size=256, batch_size=8,
            dtype=torch.bfloat16, posterior="sample", seed=0, rank=0, world_size=1, workers=4, sources=None,
            progress=True):
    """Encode `samples` [(path relative to root, caption), ...] into shards under `out`.

    vae: a vae.VAE. text_encoder: None (latents and captions only) or an object with
    encode(prompts) -> (context (B, L, Dc), y (B, Dy)) and encode_null() -> (context (1, L, Dc),
    y (1, Dy)), e.g. embed.TextEncoders. This process handles shards rank, rank + world_size, ...
    and skips shards already on disk. Returns {"built": [...], "reused": [...], "index": the
    index dict, or None while other processes' shards are missing}.
    """
    check_settings(resolution, shard_size, batch_size, posterior)
    if not samples:
        raise ValueError("no samples to prepare")
    os.makedirs(out, exist_ok=True)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    settings = dict(resolution=resolution, shard_size=shard_size, dtype=dtype_name, posterior=posterior,
                    seed=seed if posterior == "sample" else None, text=text_encoder is not None)
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
    loader = DataLoader(_ImageFiles(root, [p for p, _ in todo], resolution), num_workers=workers,
                        batch_sampler=[b for shard_batches in batches for b in shard_batches], collate_fn=_as_list)
    loaded = iter(loader)
    bar = tqdm(total=len(todo), unit="img", disable=not progress,
               desc=f"prepare [rank {rank}/{world_size}]" if world_size > 1 else "prepare")
    for (s, items), shard_batches in zip(mine, batches):
        # A generator per shard: a rebuilt shard gets the same posterior samples as the first time.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + s) if posterior == "sample" else None
        parts, kept, skipped = [], [], []
        for _ in shard_batches:
            batch = next(loaded)  # [(index into todo, (R, R, 3) uint8 or None, error or None), ...]
            for i, _, error in batch:
                if error is not None:
                    skipped.append({"path": todo[i][0], "error": error})
                    bar.write(f"skipping unreadable image {os.path.join(root, todo[i][0])}: {error}")
            ok = [(todo[i], image) for i, image, error in batch if error is None]
            if ok:
                images = torch.stack([image for _, image in ok])  # (b, R, R, 3) uint8
                parts.append(encode_batch(vae, text_encoder, images, [c for (_, c), _ in ok], generator, dtype))
                kept += [sample for sample, _ in ok]
            bar.update(len(batch))

        h = resolution // vae.config.downsample
        tensors = {"latents": torch.zeros(0, vae.config.latent_channels, h, h, dtype=dtype)}  # (0, 16, h, w)
        if null is not None:
            tensors.update(context=null["context"][:0], y=null["y"][:0])  # (0, L, Dc), (0, Dy)
        if parts:  # else: no readable image in this shard, the empty tensors above keep the shapes
            tensors = {k: torch.cat([part[k] for part in parts]) for k in tensors}  # (N, ...)
        metadata = {
            "shard_format": SHARD_FORMAT, "settings": json.dumps(settings), "inputs_sha256": _fingerprint(items),
            "num_samples": str(len(kept)), "captions": json.dumps([c for _, c in kept], ensure_ascii=False),
            "paths": json.dumps([p for p, _ in kept], ensure_ascii=False),
            "skipped": json.dumps(skipped, ensure_ascii=False),
        }
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
    re-run, writes the same index."""
    shards, skipped, shapes = [], [], {}
    for s in range(num_shards):
        with safe_open(os.path.join(out, _shard_name(s)), framework="pt") as f:
            meta = f.metadata()
            shards.append({"file": _shard_name(s), "num_samples": int(meta["num_samples"])})
            skipped += json.loads(meta["skipped"])
            for name in f.keys():
                shapes[name] = f.get_slice(name).get_shape()[1:]
    itemsize = torch.empty(0, dtype=DTYPES[settings["dtype"]]).element_size()
    index = {
        "format": "teefusion-shards/1",
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_skipped": len(skipped),
        "settings": settings,
        "latent_shape": shapes["latents"],
        "context_shape": shapes.get("context"),
        "y_shape": shapes.get("y"),
        "null": "null.safetensors" if settings["text"] else None,
        "bytes_per_sample": itemsize * sum(math.prod(v) for v in shapes.values()),
        "shards": shards,
        "skipped": skipped,
        "sources": sources,
    }

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
    missing = [s["file"] for s in shards if not os.path.isfile(os.path.join(folder, s["file"]))]
    if index["settings"]["text"] and not os.path.isfile(os.path.join(folder, "null.safetensors")):
        missing.append("null.safetensors")
    if missing:
        raise FileNotFoundError(f"{path} lists {len(missing)} file(s) missing from {folder}: {', '.join(missing[:5])}"
                                f"{', ...' if len(missing) > 5 else ''}; re-run prepare.py with the same arguments")
    return index


class ShardDataset(Dataset):
    """All samples of a prepared folder as one map-style dataset (DistributedSampler splits it
    by index). ds[i] = {"latents": (16, h, w), "caption": str} plus, when the shards hold text
    embeddings, "context": (L, Dc) and "y": (Dy,). Tensors keep the stored dtype unless `dtype`
    is given. Only the requested rows are read (safetensors slices of memory-mapped files)."""

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
        self._open = {}  # shard number -> (safe_open handle, tensor names, captions)

    def __len__(self):
        return self.starts[-1]

    def _shard(self, s):
        """Open shard s when it is first read (a large set is never opened all at once), and check it
        against the index: a shard that is corrupt, or holds another number of samples, is named."""
        if s not in self._open:
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))  # close the oldest
            path, expected = self.files[s], self.index["shards"][s]["num_samples"]
            try:
                f = safe_open(path, framework="pt")
                names = [name for name in ("latents", "context", "y") if name in f.keys()]
                captions = json.loads((f.metadata() or {})["captions"])
                rows = {name: f.get_slice(name).get_shape()[0] for name in names}
            except Exception as e:  # safetensors' own SafetensorError, OSError, a missing or bad "captions"
                raise ValueError(f"{path} is a corrupt shard ({type(e).__name__}: {e}); delete it and re-run "
                                 "prepare.py with the same arguments to rebuild it") from e
            if "latents" not in rows or set(rows.values()) != {expected} or len(captions) != expected:
                raise ValueError(f"{path} holds {rows} rows and {len(captions)} captions, but index.json says "
                                 f"{expected} samples; delete it and re-run prepare.py with the same arguments")
            self._open[s] = (f, names, captions)
        return self._open[s]

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        s = bisect.bisect_right(self.starts, i) - 1
        row = i - self.starts[s]
        f, names, captions = self._shard(s)
        item = {name: f.get_slice(name)[row] for name in names}  # reads this row only
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
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    precision = DTYPES[args.precision or ("bf16" if device.startswith("cuda") else "fp32")]
    # everything that can be checked is checked before the VAE and the text encoders load
    check_settings(args.resolution, args.shard_size, args.batch_size, args.posterior)
    if not os.path.exists(args.vae):
        raise FileNotFoundError(f"--vae {args.vae}: no such file or folder")
    if args.text_encoders and not os.path.isdir(args.text_encoders):
        raise FileNotFoundError(f"--text-encoders folder not found: {args.text_encoders}")
    root, samples = find_samples(args.images, args.captions)
    cli.output_folder(args.out, "--out")
    checkpoint.remove_temporaries(args.out, owned=owned(rank, world_size))  # what a killed run left of my files
    if rank == 0:
        print(f"{len(samples)} images with captions from {args.captions or args.images}; "
              f"{math.ceil(len(samples) / args.shard_size)} shards of up to {args.shard_size} -> {args.out}")
    vae = load_vae(args.vae, device=device, dtype=precision)
    text_encoder = None
    if args.text_encoders:
        try:
            from embed import TextEncoders  # imported here: prepare.py works (latents only) without embed.py
        except ImportError as e:
            raise ImportError(f"--text-encoders needs embed.TextEncoders (embed.py): {e}") from e
        text_encoder = TextEncoders.from_pretrained(args.text_encoders, device=device, dtype=precision,
                                                    use_t5=not args.no_t5)
    sources = dict(vae=os.path.abspath(args.vae), use_t5=not args.no_t5,
                   text_encoders=os.path.abspath(args.text_encoders) if args.text_encoders else None)
    result = prepare(samples, args.out, vae, args.resolution, root=root, text_encoder=text_encoder,
                     shard_size=args.shard_size, batch_size=args.batch_size, dtype=DTYPES[args.dtype],
                     posterior=args.posterior, seed=args.seed, rank=rank, world_size=world_size,
                     workers=args.workers, sources=sources, progress=rank == 0)
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
    parser.add_argument("--text-encoders", help="folder for embed.TextEncoders.from_pretrained; "
                                                "without it the shards hold latents and captions only")
    parser.add_argument("--no-t5", action="store_true", help="encode without T5 (passed to TextEncoders)")
    parser.add_argument("--resolution", type=int, default=1024, help="resize + centre crop to R x R (multiple of 16)")
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
