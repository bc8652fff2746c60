"""
The Stable Diffusion 3 VAE (an AutoencoderKL with 16 latent channels), written by hand.

It maps images (B, 3, H, W) in [-1, 1] to latents (B, 16, H/8, W/8) and back. TeEFusion's
training data x0 are its latents (prepare.py) and every sampled latent becomes a picture
through its decoder (evaluate.py). SD3 shifts and scales the latents so that the MMDiT sees
roughly zero mean and unit variance (docs/DESIGN.md, "The VAE"):

    encode:  z = (posterior mean or sample - 0.0609) * 1.5305
    decode:  x = decoder(z / 1.5305 + 0.0609)            image = clamp((x + 1) / 2, 0, 1)

Unlike the SD1/SDXL VAEs there is no quant_conv / post_quant_conv.

Parameter names are Stability's (`encoder.down.0.block.1.conv2.weight`, ...), so the VAE of
a Stability single file (`first_stage_model.*`) loads without renaming and the MMDiT and
text encoders stored beside it are never read; a diffusers `vae/` folder loads through one
small mapping (`diffusers_to_stability`). Sizes are inferred from tensor shapes.

    vae = load_vae("sd3.5_medium.safetensors", device="cuda", dtype=torch.bfloat16)
    z = vae.encode(images)                  # (B, 16, H/8, W/8), the posterior mean
    z = vae.encode(images, generator=g)     # a posterior sample (training data)
    x = vae.decode(z)                       # (B, 3, H, W), about [-1, 1]
    to_pil(x)[0].save("image.png")

Round-trip one image and print the reconstruction PSNR (a quick check of a checkpoint):

    python -m sd3.vae --vae /path/to/sd3_medium.safetensors --image photo.jpg --out roundtrip.png

Shape legend: B batch, C channels, H x W pixels, h x w latent pixels.
"""

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a file (python sd3/vae.py): the repository's root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open

from sd3 import checkpoint
from run import cli
from sd3.checkpoint import all_finite, listing

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class VAEConfig:
    block_out_channels: list = field(default_factory=lambda: [128, 256, 512, 512])  # one per level
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more
    latent_channels: int = 16
    image_channels: int = 3
    norm_groups: int = 32  # GroupNorm groups (eps 1e-6) everywhere
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self):
        self.block_out_channels = list(self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"VAEConfig: block_out_channels {bad} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample(self):
        return 2 ** (len(self.block_out_channels) - 1)  # 8 for SD3


# -----------------------------------------------------------------------------
# Building blocks (names = Stability checkpoint keys)


def Norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus a 1x1 conv on the skip path
    when the channel count changes (Stability calls it nin_shortcut, diffusers conv_shortcut)."""

    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = Norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs for q, k, v and the output."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = Norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, H*W, C)
                   for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), softmax(q k^T / sqrt(C)) v
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row/column at the bottom/right, then a stride-2 conv3x3."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a conv3x3."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Mid(nn.Module):
    """The bottleneck at the latent resolution: resnet, attention, resnet."""

    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    def __init__(self, c_in, c_out, n_blocks, groups, downsample):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_blocks)])
        if downsample:
            self.downsample = Downsample(c_out)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class UpLevel(nn.Module):
    def __init__(self, c_in, c_out, n_blocks, groups, upsample):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_blocks)])
        if upsample:
            self.upsample = Upsample(c_out)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class Encoder(nn.Module):
    """(B, 3, H, W) -> posterior moments (B, 2 * 16, H/8, W/8): mean and log-variance."""

    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList([
            DownLevel(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.mid = Mid(ch[-1], g)
        self.norm_out = Norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for level in self.down:
            h = level(h)  # (B, ch[-1], h, w) after the last level
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * 16, h, w)


class Decoder(nn.Module):
    """Latents (B, 16, h, w), un-normalised -> images (B, 3, 8h, 8w). The levels are stored
    as up[0] (full resolution) ... up[n-1] (latent resolution) and run from n-1 down to 0."""

    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = Mid(ch[-1], g)
        self.up = nn.ModuleList([
            UpLevel(ch[min(i + 1, len(ch) - 1)], ch[i], cfg.layers_per_block + 1, g, upsample=i > 0)
            for i in range(len(ch))
        ])
        self.norm_out = Norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.image_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, ch[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch[0], H, W) after up[0]
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class VAE(nn.Module):
    """The SD3 VAE. `encode` and `decode` take and return normalised latents (the MMDiT's
    scale); they run under no_grad (the VAE is frozen everywhere in this project), in chunks
    of `chunk_size` samples on the VAE's device, and return float32 on the input's device."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def device(self):
        return self.decoder.conv_out.weight.device

    @property
    def dtype(self):
        return self.decoder.conv_out.weight.dtype

    @torch.no_grad()
    def encode(self, images, generator=None, chunk_size=4):
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> latents (B, 16, H/8, W/8).

        Without a generator: the posterior mean (deterministic, for evaluation). With one: a
        posterior sample mean + std * eps, eps drawn for the whole batch at once on the
        generator's device, so the result does not depend on chunk_size or on the VAE's device.
        """
        cfg = self.config
        _check_images(images, cfg)
        moments = torch.cat([
            self.encoder(chunk.to(self.device, self.dtype)).float().to(images.device)
            for chunk in images.split(chunk_size)
        ])  # (B, 2 * 16, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, 16, h, w) each
        z = mean
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
            z = mean + std * eps.to(mean.device)
        return (z - cfg.shift_factor) * cfg.scaling_factor  # docs/DESIGN.md, "The VAE"

    @torch.no_grad()
    def decode(self, latents, chunk_size=4):
        """Normalised latents (B, 16, h, w) -> images (B, 3, 8h, 8w), about [-1, 1], not clamped
        (to_uint8 / to_pil clamp). Decoding is chunked over the batch: peak memory is that of
        chunk_size images, so a large batch of 1024 x 1024 images fits on one GPU."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
            raise ValueError(f"VAE.decode expects latents (B, {cfg.latent_channels}, h, w), got {tuple(latents.shape)}")
        z = latents.float() / cfg.scaling_factor + cfg.shift_factor  # docs/DESIGN.md, "The VAE"
        return torch.cat([
            self.decoder(chunk.to(self.device, self.dtype)).float().to(latents.device)
            for chunk in z.split(chunk_size)
        ])  # (B, 3, H, W)


def _check_images(images, cfg):
    if images.ndim != 4 or images.shape[1] != cfg.image_channels:
        raise ValueError(f"VAE.encode expects images (B, {cfg.image_channels}, H, W), got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % cfg.downsample or W % cfg.downsample:
        raise ValueError(f"VAE.encode: image size {H}x{W} is not a multiple of {cfg.downsample}")


# -----------------------------------------------------------------------------
# Images: tensors in [-1, 1] <-> uint8 <-> PIL


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU; clamp((x + 1) / 2, 0, 1)."""
    x = ((images.detach().float() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # (B, H, W, 3)


def from_uint8(images):
    """(B, H, W, 3) uint8 (tensor or numpy) -> (B, 3, H, W) float32 in [-1, 1]; 0 -> -1, 255 -> 1."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"from_uint8 expects uint8 (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)


def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> a list of B RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images).numpy()]


def from_pil(images):
    """One PIL image or a list of same-size ones -> (B, 3, H, W) float32 in [-1, 1]."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"from_pil: images have different sizes {sorted(sizes)}; resize them first")
    return from_uint8(np.stack([np.asarray(im.convert("RGB")) for im in images]))  # (B, 3, H, W)


def resize_center_crop(image, size):
    """Resize so that the image covers `size` (bicubic), then crop its centre. size: an int (a square,
    the shorter side resized to it) or (width, height)."""
    W, H = (size, size) if isinstance(size, int) else size
    w, h = image.size
    s = max(W / w, H / h)
    new_w, new_h = max(W, round(w * s)), max(H, round(h * s))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - W) // 2, (new_h - H) // 2
    return image.crop((left, top, left + W, top + H))


def load_image(path, size=None):
    """Read an image file as RGB (EXIF rotation applied, transparency over white); with `size` (an int
    for a square, or (width, height)), resized and centre-cropped to it. Raises whatever PIL raises on a
    bad file."""
    with Image.open(path) as image:
        if size is not None:
            side = size if isinstance(size, int) else max(size)  # either orientation: EXIF may rotate it
            image.draft("RGB", (side, side))  # JPEG only: decode at 1/2, 1/4, 1/8 scale, never below size
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        image = image.convert("RGB")  # a new, fully decoded image: the file can close
    return resize_center_crop(image, size) if size is not None else image


def image_size(path):
    """(width, height) of an image file as load_image returns it (EXIF rotation applied), from its header."""
    with Image.open(path) as image:
        w, h = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn the picture by 90 degrees
            w, h = h, w
    return w, h


# -----------------------------------------------------------------------------
# Loading: Stability single files and diffusers folders, safetensors only


def diffusers_to_stability(key, num_levels):
    """A diffusers AutoencoderKL key -> the Stability key. diffusers numbers the decoder's
    up_blocks from the latent resolution (0) to full resolution (n-1), Stability the other way.
    The attention's 1x1 convs are stored as Linear (C, C) by diffusers; the loader reshapes
    them to (C, C, 1, 1)."""
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _refuse_pickle_name(path):
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{path}: refusing a pickle checkpoint (.ckpt/.pt/.pth/.bin): loading it could execute "
                         "code. Convert it to safetensors; sd3/vae.py reads only .safetensors files.")


def _unreadable(path, error):
    """The error for a file safetensors cannot open. The content is sniffed only now: a valid
    safetensors file may itself begin with 0x80 or "PK" (its first 8 bytes are a header length)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK" or head[:1] == b"\x80":  # a torch.save zip or a raw pickle, whatever its name
        return ValueError(f"{path}: this looks like a pickle/zip (torch.save) file, not safetensors; "
                          "sd3/vae.py reads only safetensors, because pickles can execute code")
    return ValueError(f"{path} is not a readable safetensors file (truncated download, or another "
                      f"format): {error}")


def _resolve(path):
    """A .safetensors file, a diffusers vae/ folder, or a pipeline folder holding vae/ ->
    (the safetensors file, the diffusers config dict or None)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path, None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    if os.path.isdir(os.path.join(path, "vae")) and not os.path.exists(os.path.join(path, "config.json")):
        path = os.path.join(path, "vae")
    config_file = os.path.join(path, "config.json")
    config = None
    if os.path.exists(config_file):
        config = cli.read_json(config_file)
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: not a diffusers VAE config (a JSON object)")
    names = sorted(os.listdir(path))
    defaults = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    weights = [n for n in defaults if n in names]
    weights = weights or [n for n in names if n.endswith(".safetensors")]
    if len(weights) == 0:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        hint = f" (only pickle files {pickles}: convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no .safetensors file in the VAE folder {path}{hint}; it holds {names}")
    if len(weights) > 1 and not weights[0].startswith("diffusion_pytorch_model"):
        raise ValueError(f"VAE folder {path} holds several .safetensors files {weights}: pass the file itself")
    return os.path.join(path, weights[0]), config


def weights_file(path):
    """The safetensors file a VAE path names: the file itself, or the weights of a vae/ folder."""
    return _resolve(path)[0]


def _vae_prefix(keys, path):
    for prefix in ("first_stage_model.", "vae."):  # a Stability single file; some merged files
        if any(k.startswith(prefix) for k in keys):
            return prefix
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return ""  # a VAE-only file (Stability or diffusers names)
    raise ValueError(f"{path}: no VAE weights found: expected keys under first_stage_model.* (a Stability "
                     f"single file) or encoder.* / decoder.* (a VAE file); the file has {listing(keys, 12)}")


def _read_vae_tensors(path, dtype):
    """The VAE tensors of a safetensors file, under Stability names, cast to dtype. Only the
    VAE's tensors are read: a single file's MMDiT and text encoders stay on disk."""
    _refuse_pickle_name(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            prefix = _vae_prefix(keys, path)
            tensors = {k[len(prefix):]: f.get_tensor(k).to(dtype) for k in keys if k.startswith(prefix)}
    except SafetensorError as e:
        raise _unreadable(path, e) from e
    tensors = _stability_names(tensors)
    for k, v in tensors.items():
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k) and v.ndim == 2:
            tensors[k] = v[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
    return tensors


def _stability_names(tensors):
    """{name: tensor or shape} under Stability names (a diffusers VAE's renamed, diffusers_to_stability)."""
    if any(re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.", k) for k in tensors):  # diffusers
        levels = {int(m[1]) for k in tensors if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
        tensors = {diffusers_to_stability(k, len(levels)): v for k, v in tensors.items()}
    return tensors


def read_config(path):
    """The VAEConfig of a checkpoint from its header alone (no tensor is read), its tensor names and
    shapes checked as load_vae checks them: a file that is no SD3-style VAE is refused before any
    command does heavy work with it."""
    file, diffusers_config = _resolve(path)
    _refuse_pickle_name(file)
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            prefix = _vae_prefix(keys, file)
            shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith(prefix)}
            checkpoint.check_floats(f, [k for k in keys if k.startswith(prefix)], file, "VAE weights")
    except SafetensorError as e:
        raise _unreadable(file, e) from e
    shapes = _stability_names(shapes)
    config = _infer_config(shapes, file, diffusers_config)
    _check_layout(file, config, shapes)
    return config


def _check_layout(file, config, shapes):
    """Every tensor of the VAE of `config` is there with its shape ((C, C) Linear weights of a diffusers
    attention stand for (C, C, 1, 1) convs), and nothing else is; else a ValueError naming them."""
    with torch.device("meta"):
        vae = VAE(config)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file}: the VAE weights do not match an SD3 VAE of inferred config {config}:\n"
                         f"  missing: {listing(missing, 40) or 'none'}\n"
                         f"  unexpected: {listing(unexpected, 40) or 'none'}")
    linear = re.compile(r".*attn_1\.(q|k|v|proj_out)\.weight$")  # the loader makes these (C, C, 1, 1)
    wrong = [f"{k} {tuple(shapes[k])} (expected {s})" for k, s in expected.items()
             if tuple(shapes[k]) != s and not (linear.match(k) and tuple(shapes[k]) + (1, 1) == s)]
    if wrong:
        raise ValueError(f"{file}: VAE tensors with unexpected shapes: {'; '.join(wrong[:20])}")


def _infer_config(tensors, path, diffusers_config):
    """Sizes from tensor shapes (tensors: {name: tensor or shape}); norm groups, scaling and shift from
    a diffusers config.json when there is one (SD3's values otherwise: shapes cannot tell them)."""
    def shape(key):
        if key not in tensors:
            raise ValueError(f"{path}: VAE tensor {key} is missing, so the VAE's size cannot be inferred")
        return tuple(getattr(tensors[key], "shape", tensors[key]))

    levels = sorted({int(m[1]) for k in tensors if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ValueError(f"{path}: no encoder.down.* tensors: not an SD3-style VAE ({listing(tensors, 12)})")
    blocks = {int(m[1]) for k in tensors if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    kw = dict(
        block_out_channels=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(len(levels))],
        layers_per_block=len(blocks),
        latent_channels=shape("decoder.conv_in.weight")[1],
        image_channels=shape("encoder.conv_in.weight")[1],
    )
    if diffusers_config is not None:
        kw["norm_groups"] = diffusers_config.get("norm_num_groups", 32)
        kw["scaling_factor"] = diffusers_config.get("scaling_factor", VAEConfig.scaling_factor)
        kw["shift_factor"] = diffusers_config.get("shift_factor") or 0.0
    return VAEConfig(**kw)


def load_vae(path, device="cpu", dtype=torch.float32):
    """Load the SD3 VAE from a Stability single file (`first_stage_model.*`, everything else
    skipped unread), a VAE-only safetensors file, or a diffusers `vae/` folder (or the pipeline
    folder holding it). Returns the VAE in eval mode with requires_grad off.
    dtype: torch.float32 or torch.bfloat16."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"load_vae: dtype {dtype} is not supported; use torch.float32 or torch.bfloat16 "
                         "(diffusers runs the SD3 VAE upcast to float32 rather than in float16)")
    file, diffusers_config = _resolve(path)
    tensors = _read_vae_tensors(file, dtype)
    config = _infer_config(tensors, file, diffusers_config)
    _check_layout(file, config, {k: tuple(v.shape) for k, v in tensors.items()})
    bad = [k for k, v in tensors.items() if not all_finite(v)]
    if bad:
        raise ValueError(f"{file}: VAE tensors with non-finite values (NaN or inf): {listing(bad, 5)}")
    with torch.device("meta"):
        vae = VAE(config)
    vae.load_state_dict(tensors, strict=True, assign=True)
    return vae.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Command line: round-trip one image


def round_trip_bytes(config, size, dtype):
    """Lower bounds of the memory `python -m sd3.vae` needs at size x size: (on the CPU, the image as PIL,
    decoded and resized, 2 x 3 bytes a pixel, and as float32, x, its reconstruction and the two side by
    side, 4 x 12 bytes; on the VAE's device, the encoder's and decoder's full-resolution activations: at
    least three tensors of the first level's channels alive at once, a GroupNorm's input and output and
    a conv's output)."""
    itemsize = torch.finfo(dtype).bits // 8
    return size * size * (2 * 3 + 4 * 12), size * size * 3 * config.block_out_channels[0] * itemsize


def _read_image(path, size=None):
    """--image decoded at size x size (load_image), or with size None its header only (is it an image?);
    a file PIL cannot read is bad input naming --image, a MemoryError a failure (no fault of the image)."""
    try:
        if size is None:
            with Image.open(path):
                return None
        return load_image(path, size)
    except FileNotFoundError:
        raise FileNotFoundError(f"--image {path}: no such file") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"--image {path} cannot be read as an image ({type(e).__name__}: {e})") from e


def main(args):
    # everything that can be checked is checked before the VAE loads
    if args.size <= 0 or args.size % 8:
        raise ValueError(f"--size {args.size} must be a positive multiple of 8 (the VAE's downsampling)")
    if os.path.isdir(args.out):
        raise IsADirectoryError(f"--out {args.out} is a folder: give an image file name, e.g. roundtrip.png")
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: not an image file name PIL can write (e.g. .png, .jpg)")
    device = cli.check_device(args.device)
    if not os.path.exists(args.vae):
        raise FileNotFoundError(f"--vae {args.vae}: no such file or folder")
    vae_file = weights_file(args.vae)
    cli.output_file(args.out, "--out", inputs=[("--image", args.image), ("--vae", vae_file)])
    cli.regular_file(args.image, f"--image {args.image}")
    _read_image(args.image)  # its header: is it an image at all?
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = read_config(args.vae)  # from its header: a file that is no VAE is refused before any heavy work
    images, activations = round_trip_bytes(config, args.size, dtype)
    what = f"the round trip of a {args.size} x {args.size} image ({config.block_out_channels[0]} channels at full size)"
    if device.type == "cpu":
        cli.check_memory(images + activations, what, "--size")
    else:
        cli.check_memory(images, what + ", the images", "--size")
        cli.check_memory(activations, what + ", the VAE's activations", "--size", device)
    cli.output_folder(os.path.dirname(os.path.abspath(args.out)), "the folder of --out")  # all checked: made now
    name = os.path.basename(args.out)  # a killed run's temporary of --out is this command's own
    checkpoint.remove_temporaries(os.path.dirname(os.path.abspath(args.out)), owned=lambda n: n == name)
    image = _read_image(args.image, args.size)
    vae = load_vae(args.vae, device=device, dtype=dtype)
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"loaded {args.vae}: {vae.config} ({n_params / 1e6:.1f}M parameters, {dtype})")
    x = from_pil(image)  # (1, 3, size, size)
    z = vae.encode(x)  # (1, 16, size/8, size/8)
    print(f"latents {tuple(z.shape)}: mean {z.mean():.3f} std {z.std():.3f} (roughly 0 and 1 for SD3 latents)")
    x_rec = vae.decode(z)  # (1, 3, size, size)
    mse = ((to_uint8(x_rec).float() - to_uint8(x).float()) ** 2).mean().item()
    print(f"round-trip PSNR {10 * math.log10(255 ** 2 / max(mse, 1e-10)):.2f} dB")
    side_by_side = torch.cat([x, x_rec], dim=3)  # (1, 3, size, 2 * size): input | reconstruction
    picture = to_pil(side_by_side)[0]
    # atomically (a kill leaves the old file or none); the temporary keeps the extension PIL reads the format from
    checkpoint.atomic_write(args.out, picture.save, suffix=os.path.splitext(args.out)[1])
    print(f"wrote {args.out} (input | reconstruction)")


if __name__ == "__main__":
    parser = cli.parser("Round-trip an image through the SD3 VAE.", prog="python -m sd3.vae")
    parser.add_argument("--vae", required=True,
                        help="Stability single file, VAE .safetensors, or diffusers vae/ folder")
    parser.add_argument("--image", required=True, help="an image file")
    parser.add_argument("--size", type=int, default=1024, help="resize + centre crop to size x size (multiple of 8)")
    parser.add_argument("--out", default="roundtrip.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    cli.run(main, parser)
