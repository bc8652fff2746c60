"""
The paper's per-image metrics, offline, preprocessed exactly as each metric's reference code does
(TeEFusion Tables 1-4; FID is in evaluation/fid.py). Weights come from local paths; nothing downloads.

    metric       network (local weights)                   score of one image I with prompt T
    clip         CLIP ViT-L/14                              100 cos(e_I, e_T); the MEAN is clamped at 0
                                                            (torchmetrics CLIPScore)
    clip-dice    open_clip ViT-g-14 (converted)             cos(e_I, e_T), plain mean (DICE's script,
                                                            taken from Restart's eval_clip_score.py)
    pickscore    PickScore_v1 (CLIP-H)                      exp(logit_scale) cos(e_I, e_T)
    hps          HPS v2 / v2.1 (ViT-H-14, converted)        100 cos(e_I, e_T), no logit scale
    aesthetic    CLIP ViT-L/14 + the LAION MLP              MLP(e_I / ||e_I||)
    imagereward  ImageReward.pt (BLIP ViT-L + BERT)         (MLP(BERT(T cross-attending to I)[CLS])
                                                             - 0.16717) / 1.03334
    (DPG-Bench, a VQA protocol rather than a per-image score, is evaluation/dpg.py's)

e_I, e_T: the projected image and text embeddings. One `CLIP` wrapper (a transformers CLIPModel
called through its submodules, the same on transformers 4 and 5) serves the first five;
`convert_openclip` turns open_clip checkpoints (HPS, ViT-g-14) into transformers folders.

Preprocessing. Images are (B, 3, H, W) tensors in [-1, 1] (VAE.decode's output) or PIL images.
A tensor is first rounded to uint8, round(255 (x + 1) / 2), exactly as vae.to_pil saves it to PNG:
the reference codes score image files. Then, with S the network's input size (224 released):

    "transformers"  clip, pickscore: transformers' CLIPImageProcessor (PIL backend), as torchmetrics
                    and PickScore call it: shortest side to S by PIL bicubic on the uint8 image (the
                    other side int(S * long / short)), centre crop with top = (h - S) // 2, x / 255,
                    OpenAI mean/std.
    "openai"        clip-dice, aesthetic, imagereward: OpenAI CLIP's torchvision pipeline (open_clip's
                    default and ImageReward's copy of it): the same PIL resize, torchvision's
                    CenterCrop (top = int(round((h - S) / 2))), x / 255, OpenAI mean/std.
    "hps"           HPS v2 / v2.1: its own open_clip copy converts to a tensor FIRST (x / 255), then
                    resizes the longest side to S on the float tensor (bicubic with antialias, as
                    torchvision >= 0.17's resize of a tensor; round(side * S / longest)), pads with 0
                    to S x S (left = pad_w // 2, top = pad_h // 2), OpenAI mean/std.

    python evaluate.py score --metric hps --clip /weights/hps-v2.1 --images out/ --prompts prompts.txt
    python evaluate.py convert-hps /weights/HPS_v2.1_compressed.pt --tokenizer /weights/clip-vit-large-patch14 \
        --out /weights/hps-v2.1
    python -m pytest -q tests/evaluation/test_metrics.py

Shape legend: B images, S input size, P projection width, L tokens, D width.
"""

import dataclasses
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from run import cli
from sd3 import vae

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# -----------------------------------------------------------------------------
# Preprocessing: uint8 images, resized where and how each reference resizes them


def to_pil_images(images):
    """(B, 3, H, W) in [-1, 1], one PIL image or a list of them -> a list of RGB PIL images.
    A tensor is rounded to uint8 as vae.to_pil saves it to PNG: round(255 clamp((x + 1) / 2, 0, 1))."""
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, Image.Image) for im in images):
        return [im.convert("RGB") for im in images]
    if torch.is_tensor(images) and images.ndim == 4 and images.shape[1] == 3:
        return vae.to_pil(images)
    shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
    raise ValueError(f"expected images (B, 3, H, W) in [-1, 1] or PIL images, got {shape}")


def pil_to_tensor(image):
    """RGB PIL image -> (3, H, W) float32 holding its uint8 values (0 ... 255)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()  # (3, H, W)


def resize_shortest(image, size):
    """Shortest side to `size` with PIL's bicubic filter, the other side int(size * long / short)
    (torchvision's Resize(int) and transformers' shortest_edge compute it the same way)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    return image.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)


def center_crop(image, size, round_half):
    """The centre size x size of a PIL image. round_half: torchvision's offset int(round((h - size) / 2));
    otherwise transformers' (h - size) // 2. They differ by one pixel when h - size = 4k + 3."""
    w, h = image.size
    if round_half:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_transformers(image, size):
    """CLIPImageProcessor: PIL bicubic shortest side, crop at (h - S) // 2, / 255 -> (3, S, S)."""
    return pil_to_tensor(center_crop(resize_shortest(image, size), size, round_half=False)) / 255


def preprocess_openai(image, size):
    """OpenAI CLIP / open_clip / ImageReward: Resize(S, BICUBIC) on PIL, CenterCrop(S), ToTensor -> (3, S, S)."""
    return pil_to_tensor(center_crop(resize_shortest(image, size), size, round_half=True)) / 255


def preprocess_hps(image, size, antialias=True):
    """HPS v2: ToTensor, then the longest side to S on the float tensor (bicubic; antialias=True is
    torchvision >= 0.17's default, older torchvision resized tensors without it), zero pad to S x S.
    The reference pads only when it resized: an image whose longest side is already S but which is
    not square stays unpadded there (and cannot be batched); here it is padded too."""
    x = pil_to_tensor(image)[None] / 255  # (1, 3, H, W) in [0, 1]
    H, W = x.shape[-2:]
    if max(H, W) != size:
        scale = size / float(max(H, W))
        h, w = round(H * scale), round(W * scale)
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)  # (1, 3, h, w)
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)  # (1, 3, S, S)
    return x[0]


PREPROCESS = {"transformers": preprocess_transformers, "openai": preprocess_openai, "hps": preprocess_hps}


def normalize(x, mean=OPENAI_MEAN, std=OPENAI_STD):
    """(x - mean) / std per channel of (B, 3, H, W)."""
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def pixel_values(images, preprocess, size):
    """images -> (B, 3, size, size) float32 network input, by the `preprocess` convention."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {sorted(PREPROCESS)}, got {preprocess!r}")
    pixels = torch.stack([PREPROCESS[preprocess](im, size) for im in to_pil_images(images)])  # (B, 3, S, S)
    return normalize(pixels)


# -----------------------------------------------------------------------------
# One CLIP wrapper for CLIP score, PickScore, HPS and the aesthetic predictor


def _need_dir(path, what):
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path!r} is not a folder (expected a transformers folder with "
                                f"config.json, model weights and tokenizer files)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what}: {path!r} has no config.json (expected a transformers CLIPModel folder)")


class CLIP(nn.Module):
    """A transformers CLIPModel and its tokenizer; unit-norm image and text embeddings.
    preprocess: "transformers", "openai" or "hps" (the module docstring)."""

    def __init__(self, model, tokenizer, preprocess="transformers"):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {sorted(PREPROCESS)}, got {preprocess!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings

    @property
    def device(self):
        return self.model.visual_projection.weight.device

    @torch.no_grad()
    def image_features(self, images):
        """images -> (B, P) unit-norm projected image embeddings."""
        pixels = pixel_values(images, self.preprocess, self.image_size)  # (B, 3, S, S)
        pixels = pixels.to(self.device, self.model.visual_projection.weight.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (B, Dv)
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # (B, P)

    @torch.no_grad()
    def text_features(self, prompts):
        """list of B strings -> (B, P) unit-norm projected text embeddings."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)  # (B, P)

    def cosine(self, images, prompts):
        """(B,) cos(image_i, prompt_i)."""
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


def load_clip(path, preprocess="transformers", device="cpu", dtype=torch.float32):
    """A CLIP wrapper from a local transformers folder (CLIPModel + tokenizer files)."""
    from transformers import AutoTokenizer, CLIPModel
    _need_dir(path, "CLIP weights")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
    except (OSError, ValueError) as e:  # no weights file, a config.json that is not a CLIP config
        raise ValueError(f"CLIP weights: {path!r} is not a readable transformers CLIPModel folder: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"CLIP weights: no tokenizer in {path!r} (expected tokenizer.json or "
                                f"vocab.json + merges.txt next to config.json): {e}") from e
    return CLIP(model, tokenizer, preprocess)


# open_clip -> transformers: HPS v2 / v2.1 (ViT-H-14) and DICE's ViT-g-14 are open_clip models.
# Same computation, different names: in_proj (q; k; v stacked) splits into q/k/v_proj, the (D, P)
# projections transpose into Linear weights, ln_pre/ln_post/ln_final rename.

VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}  # width -> heads (ViT-B/L/H/g/bigG)


def _block_keys(src, dst):
    return [(f"{src}.ln_1.", f"{dst}.layer_norm1."), (f"{src}.ln_2.", f"{dst}.layer_norm2."),
            (f"{src}.attn.out_proj.", f"{dst}.self_attn.out_proj."), (f"{src}.mlp.c_fc.", f"{dst}.mlp.fc1."),
            (f"{src}.mlp.c_proj.", f"{dst}.mlp.fc2.")]


def openclip_to_transformers(state, vision_heads=None, text_heads=None, hidden_act="gelu", eos_token_id=49407):
    """An open_clip CLIP state dict -> (transformers CLIPConfig, CLIPModel state dict).

    Sizes come from the shapes; head counts cannot, so they default to VISION_HEADS[width] and
    text width / 64 (right for ViT-L-14, ViT-H-14, ViT-g-14). hidden_act: "gelu" for open_clip's
    LAION models (HPS, ViT-g-14), "quick_gelu" for OpenAI's. eos_token_id: the text is pooled at
    its first end-of-text token (open_clip pools at the largest token id, which is that one).
    """
    from transformers import CLIPConfig
    state = {k.removeprefix("module."): v for k, v in state.items()}
    need = ["visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight", "logit_scale"]
    missing = [k for k in need if k not in state]
    if missing:
        raise cli.MissingKey(f"not an open_clip CLIP state dict: missing {missing} "
                             f"(has {sorted(state)[:6]} ...)")
    vis_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    txt_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    Dv, _, patch, _ = state["visual.conv1.weight"].shape
    Dt = state["token_embedding.weight"].shape[1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    text = dict(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=Dt,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=txt_layers, num_attention_heads=text_heads or Dt // 64,
                max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=hidden_act,
                bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    vision = dict(hidden_size=Dv, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=vis_layers, num_attention_heads=vision_heads or VISION_HEADS.get(Dv, Dv // 64),
                  image_size=grid * patch, patch_size=patch, hidden_act=hidden_act)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1])
    renames = [("visual.conv1.", "vision_model.embeddings.patch_embedding."),
               ("visual.ln_pre.", "vision_model.pre_layrnorm."), ("visual.ln_post.", "vision_model.post_layernorm."),
               ("token_embedding.", "text_model.embeddings.token_embedding."),
               ("ln_final.", "text_model.final_layer_norm.")]
    for i in range(vis_layers):
        renames += _block_keys(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    for i in range(txt_layers):
        renames += _block_keys(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    out = {"vision_model.embeddings.class_embedding": state["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
           "visual_projection.weight": state["visual.proj"].T.contiguous(),  # (P, Dv)
           "text_projection.weight": state["text_projection"].T.contiguous(),  # (P, Dt)
           "logit_scale": state["logit_scale"].reshape(())}
    for k, v in state.items():
        if ".attn.in_proj_" in k:  # rows [q; k; v]
            prefix = k.split(".attn.")[0]
            dst = ("vision_model.encoder.layers." if k.startswith("visual.") else "text_model.encoder.layers.") + \
                prefix.split(".")[-1]
            kind = k.rsplit("_", 1)[1]  # weight or bias
            for name, part in zip("qkv", v.chunk(3)):
                out[f"{dst}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        for src, dst in renames:
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                break
    return config, out


def _read_state(path):
    """A state dict from .safetensors, or from a pickle read with weights_only=True (no code runs)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        check_safetensors_header(path, "the checkpoint")
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle's and torch's many errors on a file that is no torch.save output
        raise cli.InputError(f"{path}: not a torch checkpoint this command reads ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise cli.InputError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def convert_openclip(checkpoint, tokenizer_dir, out_dir, **kwargs):
    """An open_clip checkpoint (HPS_v2.1_compressed.pt, open_clip_pytorch_model.bin or .safetensors)
    + an OpenAI CLIP tokenizer folder (open_clip's tokenizer is OpenAI's BPE) -> a transformers
    CLIPModel folder that `load_clip(out_dir, "hps")` reads."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"open_clip checkpoint: no file {checkpoint!r} (expected e.g. HPS_v2.1_compressed.pt)")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"--tokenizer {tokenizer_dir}: not a folder (expected an OpenAI CLIP tokenizer "
                                f"folder, e.g. a local copy of openai/clip-vit-large-patch14)")
    from transformers import AutoTokenizer, CLIPModel
    config, tensors = openclip_to_transformers(_read_state(checkpoint), **kwargs)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise cli.MissingKey(f"open_clip conversion of {checkpoint!r}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclasses.dataclass(frozen=True)
class Preset:
    """How a CLIP-type score is computed: preprocessing, scale of the cosine, aggregation."""
    preprocess: str
    scale: str  # "100", "1" or "logit" (the model's logit_scale.exp())
    clamp_mean: bool  # torchmetrics: max(mean, 0)
    network: str  # what weights the preset expects (documentation and errors)


PRESETS = {
    "clip": Preset("transformers", "100", True, "CLIP ViT-L/14 (openai/clip-vit-large-patch14)"),
    "clip-dice": Preset("openai", "1", False, "open_clip ViT-g-14 laion2b_s12b_b42k, converted to transformers"),
    "pickscore": Preset("transformers", "logit", False, "PickScore_v1 (CLIP-H)"),
    "hps": Preset("hps", "100", False, "HPS v2 / v2.1 (open_clip ViT-H-14), converted to transformers"),
}
METRICS = sorted(PRESETS) + ["aesthetic", "imagereward"]  # the per-image scores `load_scorer` builds


def clip_type_score(clip, images, prompts, metric):
    """(per-image scores (B,), aggregate over the batch) of one of PRESETS.

    The aggregate of a whole benchmark is the mean of all per-image scores (clamped at 0 for
    "clip"): use `aggregate` on the concatenated per-image scores, not the mean of batch means.
    """
    preset = PRESETS[metric]
    if clip.preprocess != preset.preprocess:
        raise ValueError(f"{metric} needs preprocess={preset.preprocess!r}, the CLIP wrapper has {clip.preprocess!r}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    cos = clip.cosine(images, prompts)  # (B,)
    scale = {"100": 100.0, "1": 1.0}.get(preset.scale)
    if scale is None:  # PickScore: the learned temperature
        scale = clip.model.logit_scale.float().exp().item()
    per_image = scale * cos
    return per_image, aggregate(per_image, metric)


def aggregate(per_image, metric):
    """Mean of per-image scores; torchmetrics' CLIPScore clamps the mean at 0."""
    mean = torch.as_tensor(per_image, dtype=torch.float64).mean().item()
    return max(mean, 0.0) if metric in PRESETS and PRESETS[metric].clamp_mean else mean


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor head (improved-aesthetic-predictor): 768 -> 1024 -> 128 -> 64
    -> 16 -> 1; dropout between (inactive in eval). Keys layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, e):
        return self.layers(e).squeeze(-1)  # (B,)


def need_safetensors(path, what, expected):
    """Refuse (naming `what` and the path) a missing file or one that is not .safetensors."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path!r} (expected {expected})")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{what}: {path!r} is not .safetensors; convert the released .pth once with "
                         f"safetensors.torch.save_file(torch.load(pth, weights_only=True), 'out.safetensors')")
    check_safetensors_header(path, what)


def check_safetensors_header(path, what):
    """The header of a .safetensors file read (nothing else): a truncated file, a renamed pickle or
    PNG, an integer tensor are refused naming `what` and the file, before any model loads."""
    from contextlib import ExitStack

    from sd3 import checkpoint

    with ExitStack() as stack:
        try:
            f = checkpoint.open_safetensors(path, stack)
            checkpoint.check_floats(f, f.keys(), path, f"{what}'s weights")
        except (checkpoint.CheckpointError, OSError) as e:
            raise cli.InputError(f"{what}: {e}") from None


def load_aesthetic(path, device="cpu"):
    """The LAION aesthetic MLP from a .safetensors file (sac+logos+ava1-l14-linearMSE.pth converted)."""
    from safetensors.torch import load_file
    need_safetensors(path, "aesthetic predictor", "a .safetensors file with layers.{0,2,4,6,7}.{weight,bias}, "
                      "e.g. sac+logos+ava1-l14-linearMSE converted")
    state = load_file(path)
    if "layers.0.weight" not in state:
        raise cli.MissingKey(f"aesthetic predictor: {path!r} has no layers.0.weight (keys: {sorted(state)[:8]})")
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.to(device).eval().requires_grad_(False)


@torch.no_grad()
def aesthetic_score(clip, mlp, images):
    """(B,) LAION aesthetic scores: the MLP on the L2-normalised CLIP ViT-L/14 image embedding
    (OpenAI CLIP's preprocessing, as the predictor's simple_inference.py uses clip.load)."""
    if clip.preprocess != "openai":
        raise ValueError(f"aesthetic needs preprocess='openai', the CLIP wrapper has {clip.preprocess!r}")
    e = clip.image_features(images)  # (B, 768), unit norm
    return mlp(e.to(next(mlp.parameters()).dtype)).float()


# -----------------------------------------------------------------------------
# ImageReward: BLIP ViT-L image tokens -> BERT with cross-attention -> [CLS] -> MLP head

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072


class ImageReward(nn.Module):
    """ImageReward on transformers' BlipVisionModel and BlipTextModel (cross-attention, no pooler).

    reward = (MLP(text_encoder(prompt, cross-attending to the image tokens)[:, 0]) - mean) / std;
    the prompt is tokenized to 35 tokens (BERT, padded to max_length); the image preprocessing is
    "openai" (ImageReward.py's _transform: Resize(224, BICUBIC), CenterCrop, ToTensor, OpenAI
    mean/std). The MLP is the aesthetic head's shape (768 -> ... -> 1).
    """

    def __init__(self, vision, text, mlp, tokenizer, max_length=35):
        super().__init__()
        self.vision, self.text, self.mlp = vision.eval(), text.eval(), mlp.eval()
        self.requires_grad_(False)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.image_size = vision.config.image_size

    @torch.no_grad()
    def forward(self, images, prompts):
        """(B,) rewards for B images and B prompts."""
        device = self.vision.post_layernorm.weight.device
        pixels = pixel_values(images, "openai", self.image_size).to(device)  # (B, 3, S, S)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + N, Dv), after the final LN
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        ones = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=device)  # (B, 1 + N)
        h = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                      encoder_hidden_states=image_tokens, encoder_attention_mask=ones,
                      is_decoder=False).last_hidden_state  # (B, L, Dt), bidirectional self-attention
        r = self.mlp(h[:, 0].float())  # (B,)
        return (r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward_to_transformers(state):
    """ImageReward.pt's state dict -> (vision config, vision state, text config, text state, mlp state).

    Only blip.visual_encoder.*, blip.text_encoder.* and mlp.* are used. The text encoder's names
    are already transformers' BERT names; the ViT's are timm's (blocks.N.attn.qkv -> encoder.layers.N
    .self_attn.qkv, attn.proj -> self_attn.projection, norm1/2 -> layer_norm1/2, norm -> post_layernorm).
    """
    from transformers import BlipTextConfig, BlipVisionConfig
    state = {k.removeprefix("module."): v for k, v in state.items()}
    need = ["blip.visual_encoder.patch_embed.proj.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
            "mlp.layers.0.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise cli.MissingKey(f"not an ImageReward state dict: missing {missing} (has {sorted(state)[:6]} ...)")
    v_in = {k[len("blip.visual_encoder."):]: t for k, t in state.items() if k.startswith("blip.visual_encoder.")}
    t_in = {k[len("blip.text_encoder."):]: t for k, t in state.items() if k.startswith("blip.text_encoder.")}
    mlp = {k[len("mlp."):]: t for k, t in state.items() if k.startswith("mlp.")}
    Dv, _, patch, _ = v_in["patch_embed.proj.weight"].shape
    n_vis = len({k.split(".")[1] for k in v_in if k.startswith("blocks.")})
    vcfg = BlipVisionConfig(hidden_size=Dv, intermediate_size=v_in["blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=n_vis, num_attention_heads=Dv // 64, patch_size=patch,
                            image_size=patch * math.isqrt(v_in["pos_embed"].shape[1] - 1),
                            layer_norm_eps=1e-6)  # BLIP's ViT: LayerNorm eps 1e-6
    vis = {"embeddings.class_embedding": v_in["cls_token"], "embeddings.position_embedding": v_in["pos_embed"],
           "embeddings.patch_embedding.weight": v_in["patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": v_in["patch_embed.proj.bias"],
           "post_layernorm.weight": v_in["norm.weight"], "post_layernorm.bias": v_in["norm.bias"]}
    for k, t in v_in.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                         ("attn.proj.", "self_attn.projection."), ("mlp.", "mlp.")):
                if rest.startswith(a):
                    vis[f"encoder.layers.{i}.{b}{rest[len(a):]}"] = t
    Dt = t_in["embeddings.word_embeddings.weight"].shape[1]
    tcfg = BlipTextConfig(vocab_size=t_in["embeddings.word_embeddings.weight"].shape[0], hidden_size=Dt,
                          intermediate_size=t_in["encoder.layer.0.intermediate.dense.weight"].shape[0],
                          num_hidden_layers=len({k.split(".")[2] for k in t_in if k.startswith("encoder.layer.")}),
                          num_attention_heads=Dt // 64,
                          max_position_embeddings=t_in["embeddings.position_embeddings.weight"].shape[0],
                          encoder_hidden_size=t_in["encoder.layer.0.crossattention.self.key.weight"].shape[1],
                          is_decoder=True)  # is_decoder builds the cross-attention; forward runs bidirectional
    text = {k: t for k, t in t_in.items() if "position_ids" not in k}
    return vcfg, vis, tcfg, text, mlp


def _need_imagereward(path, tokenizer_dir):
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"ImageReward: no file {path!r} (expected ImageReward.pt or a .safetensors "
                                f"with blip.visual_encoder.*, blip.text_encoder.*, mlp.*)")
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"ImageReward: tokenizer {tokenizer_dir!r} is not a folder (expected a BERT "
                                f"tokenizer, e.g. a local copy of bert-base-uncased)")
    if path.endswith(".safetensors"):
        check_safetensors_header(path, "ImageReward")


def load_image_reward(path, tokenizer_dir, device="cpu", vision_heads=None, text_heads=None):
    """ImageReward from ImageReward.pt (or a .safetensors of the same state dict) and a BERT tokenizer
    folder (bert-base-uncased; BLIP adds [DEC] and [ENC], which prompts never contain).
    Pickles load with weights_only=True."""
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel
    _need_imagereward(path, tokenizer_dir)
    vcfg, vis, tcfg, text, mlp_state = imagereward_to_transformers(_read_state(path))
    if vision_heads:
        vcfg.num_attention_heads = vision_heads
    if text_heads:
        tcfg.num_attention_heads = text_heads
    vision, text_model = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
    for name, module, tensors in (("vision", vision, vis), ("text", text_model, text)):
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise cli.MissingKey(f"ImageReward {name} weights in {path!r}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    mlp = AestheticMLP(mlp_state["layers.0.weight"].shape[1])
    mlp.load_state_dict(mlp_state)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return ImageReward(vision, text_model, mlp, tokenizer).to(device)


# -----------------------------------------------------------------------------
# Any metric by name: check the weights without loading them, then build fn(images, prompts) -> (B,)


def check_weights(metric, clip=None, aesthetic=None, imagereward=None):
    """Raise a clear error naming the path if `metric`'s weights are missing; loads nothing.
    clip: the transformers CLIP folder (for imagereward: the BERT tokenizer folder)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if metric == "imagereward":
        if not imagereward:
            raise ValueError("imagereward needs imagereward=ImageReward.pt (--imagereward) and clip= a BERT "
                             "tokenizer folder (--clip)")
        return _need_imagereward(imagereward, clip)
    _need_dir(clip, f"{metric}: --clip")
    if metric == "aesthetic":
        if not aesthetic:
            raise ValueError("aesthetic needs aesthetic= the LAION MLP as .safetensors (--aesthetic)")
        need_safetensors(aesthetic, "aesthetic: --aesthetic", "the LAION MLP as .safetensors")


def load_scorer(metric, clip=None, aesthetic=None, imagereward=None, device="cpu"):
    """fn(images, prompts) -> (B,) per-image scores of `metric` (one of METRICS); aggregate them
    with `aggregate(scores, metric)`. Arguments as `check_weights`."""
    check_weights(metric, clip, aesthetic, imagereward)
    if metric == "imagereward":
        return load_image_reward(imagereward, clip, device)
    if metric == "aesthetic":
        model, mlp = load_clip(clip, "openai", device), load_aesthetic(aesthetic, device)
        return lambda images, prompts=None: aesthetic_score(model, mlp, images)
    model = load_clip(clip, PRESETS[metric].preprocess, device)
    return lambda images, prompts: clip_type_score(model, images, prompts, metric)[0]
