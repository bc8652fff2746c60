"""
The paper's metrics offline, the speed table, and the figures (TeEFusion Tables 1-4, Fig. 4-5).

Everything reads weights and prompt files from local paths given by the user; nothing downloads.
The formulas and preprocessing follow SPEC.md section 8:

    metric     network (local weights)                     score per image
    clip       CLIP ViT-L/14                               100 cos(image, text); the MEAN is clamped
                                                            at 0 (torchmetrics CLIPScore)
    clip-dice  open_clip ViT-g-14 (converted)              cos(image, text), plain mean (DICE's
                                                            evaluation script, taken from Restart)
    pickscore  PickScore CLIP-H                            logit_scale.exp() cos(image, text)
    hps        HPS v2 / v2.1 (ViT-H-14, converted)         100 cos(image, text), no logit scale; HPS
                                                            preprocessing (longest side to 224, pad)
    aesthetic  CLIP ViT-L/14 + the LAION MLP (.safetensors) MLP(image embedding / ||.||)
    imagereward  ImageReward.pt (BLIP ViT-L + BERT)        (MLP(BERT [CLS] cross-attending to the
                                                            image) - 0.16717) / 1.03334

`convert_openclip` turns HPS's (and ViT-g-14's) open_clip checkpoint into a transformers folder.
One `CLIP` wrapper serves all of them. It calls CLIPModel's submodules directly
(vision_model + visual_projection, text_model + text_projection), so it behaves the same on
transformers 4 and 5. Images are (B, 3, H, W) tensors in [-1, 1] (VAE.decode's output) or PIL
images; the wrapper resizes them on the float tensor.

FID: `frechet_distance` in float64 (the matrix square root by eigendecomposition, no scipy),
statistics from (N, 2048) features, reference statistics in .npz files (mu, sigma); features
from `InceptionPool3` (the TF 2015-12-05 graph in pytorch-fid's layout and names, loaded from a
.safetensors conversion of pytorch-fid's weights; TensorFlow's legacy bilinear resize to 299,
then [-1, 1] as pytorch-fid scales it) or from any callable you pass to `fid`.
DPG-Bench: `dpg_bench` scores images with any `vqa(image, question) -> str` (the CSV of
questions with dependencies, the 2 x 2 tile split, dependency zeroing, category means, x 100).
Speed: `speed_table` runs every sampler of samplers.py on the same model, noise and prompt and
reports NFE and wall time per image, with ratios to the student.
Outputs: `write_table` (Markdown + JSON, rows = methods, columns = metrics, as Tables 1-4),
`line_plot` (score vs w, Fig. 5a; loss vs step from distill.py's log, Fig. 5b) and
`image_grid` (methods x w, Fig. 4) as PNG files drawn with pillow (matplotlib is not a dependency).
The toy world reports its own adherence and agreement scores in toy.py.

`w_sweep` runs any generate(method, w, prompts) over methods x w and scores the images.

ABSENT (not built; nothing here pretends to compute them):
  - a VQA model for DPG-Bench (mPLUG); `dpg_bench` takes yours, and the CLI has no dpg command;
  - a command that loads SD3 (text encoders, MMDiT, VAE) and generates the sweep's images: `w_sweep`
    takes your generate function; the CLI plots a sweep from its results JSON (plot-sweep);
  - numeric parity with the released checkpoints (CLIP-L, PickScore, HPS, ImageReward, the aesthetic
    MLP, the FID Inception): the tests check each formula, preprocessing and key mapping on tiny
    random models, not against the real weights or the reference packages.

    python evaluate.py convert-hps /weights/HPS_v2.1_compressed.pt --tokenizer /weights/clip-vit-large-patch14 \
        --out /weights/hps-v2.1
    python evaluate.py score --metric hps --clip /weights/hps-v2.1 --images out/ --prompts prompts.txt
    python evaluate.py score --metric aesthetic --clip /weights/clip-vit-large-patch14 \
        --aesthetic /weights/sac+logos+ava1-l14-linearMSE.safetensors --images out/
    python evaluate.py score --metric imagereward --imagereward /weights/ImageReward.pt \
        --clip /weights/bert-base-uncased --images out/ --prompts prompts.txt
    python evaluate.py fid ours.npz coco_ref.npz
    python evaluate.py fid-stats --inception pt_inception.safetensors --images out/ --out ours.npz
    python evaluate.py speed --mmdit /weights/sd3_medium.safetensors --res 1024 --steps 50 --w 5
    python evaluate.py speed                       # a tiny random MMDiT on the CPU
    python evaluate.py plot-loss runs/log.jsonl --out loss.png
    python evaluate.py plot-sweep results.json --metric hps --out sweep.png
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm import tqdm

import samplers
import vae
from mmdit import atomic_write

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -----------------------------------------------------------------------------
# Images and preprocessing (on float tensors in [0, 1])


def to_unit(images):
    """(B, 3, H, W) in [-1, 1], or PIL image(s) -> (B, 3, H, W) float32 in [0, 1]."""
    if isinstance(images, Image.Image) or (isinstance(images, (list, tuple)) and images
                                           and isinstance(images[0], Image.Image)):
        images = vae.from_pil(images)  # (B, 3, H, W) in [-1, 1]
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W) in [-1, 1] or PIL images, got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    return ((images.float() + 1) / 2).clamp(0, 1)


def normalize(x, mean=OPENAI_MEAN, std=OPENAI_STD):
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_bicubic(x, h, w):
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)  # (B, 3, h, w)


def preprocess_clip(x, size):
    """CLIP's own preprocessing: shortest side to `size` (bicubic), centre crop, OpenAI mean/std."""
    H, W = x.shape[-2:]
    h, w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
    x = resize_bicubic(x, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return normalize(x[..., top:top + size, left:left + size])  # (B, 3, size, size)


def preprocess_hps(x, size):
    """HPS v2: longest side to `size` (bicubic, on the float tensor), pad black to size x size
    (centred, the odd pixel on the right/bottom), OpenAI mean/std."""
    H, W = x.shape[-2:]
    scale = size / max(H, W)
    h, w = round(H * scale), round(W * scale)
    x = resize_bicubic(x, h, w)
    pad_h, pad_w = size - h, size - w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)  # black
    return normalize(x)  # (B, 3, size, size)


PREPROCESS = {"clip": preprocess_clip, "hps": preprocess_hps}


# -----------------------------------------------------------------------------
# One CLIP wrapper for CLIP score, PickScore, HPS and the aesthetic predictor


def _need_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path!r} is not a folder (expected a transformers folder with "
                                f"config.json, model weights and tokenizer files)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what}: {path!r} has no config.json (expected a transformers CLIPModel folder)")


class CLIP(nn.Module):
    """A transformers CLIPModel and its tokenizer; unit-norm image and text embeddings.

    preprocess: "clip" (shortest side + centre crop) or "hps" (longest side + black pad).
    """

    def __init__(self, model, tokenizer, preprocess="clip"):
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
        pixels = PREPROCESS[self.preprocess](to_unit(images).to(self.device), self.image_size)  # (B, 3, S, S)
        pixels = pixels.to(self.model.visual_projection.weight.dtype)
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


def load_clip(path, preprocess="clip", device="cpu", dtype=torch.float32):
    """A CLIP wrapper from a local transformers folder (CLIPModel + tokenizer files)."""
    from transformers import AutoTokenizer, CLIPModel
    _need_dir(path, "CLIP weights")
    model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
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
        raise KeyError(f"not an open_clip CLIP state dict: missing {missing} (has {sorted(state)[:6]} ...)")
    vis_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    txt_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    Dv, _, patch, _ = state["visual.conv1.weight"].shape
    Dt = state["token_embedding.weight"].shape[1]
    n_pos = state["visual.positional_embedding"].shape[0]
    grid = math.isqrt(n_pos - 1)
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


def convert_openclip(checkpoint, tokenizer_dir, out_dir, **kwargs):
    """An open_clip checkpoint (HPS_v2.1_compressed.pt, open_clip_pytorch_model.bin or .safetensors)
    + an OpenAI CLIP tokenizer folder (open_clip's tokenizer is OpenAI's BPE) -> a transformers
    CLIPModel folder that `load_clip(out_dir, "hps")` reads. Pickles load with weights_only=True."""
    from transformers import AutoTokenizer, CLIPModel
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"open_clip checkpoint: no file {checkpoint!r} (expected e.g. HPS_v2.1_compressed.pt)")
    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    config, tensors = openclip_to_transformers(state, **kwargs)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise KeyError(f"open_clip conversion of {checkpoint!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True) if os.path.isdir(tokenizer_dir) \
        else None
    if tokenizer is None:
        raise FileNotFoundError(f"tokenizer: {tokenizer_dir!r} is not a folder (expected an OpenAI CLIP tokenizer "
                                f"folder, e.g. a local copy of openai/clip-vit-large-patch14)")
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
    "clip": Preset("clip", "100", True, "CLIP ViT-L/14 (openai/clip-vit-large-patch14)"),
    "clip-dice": Preset("clip", "1", False, "open_clip ViT-g-14 laion2b_s12b_b42k, converted to transformers"),
    "pickscore": Preset("clip", "logit", False, "PickScore_v1 (CLIP-H)"),
    "hps": Preset("hps", "100", False, "HPS v2 / v2.1 (open_clip ViT-H-14), converted to transformers"),
}


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


def load_aesthetic(path, device="cpu"):
    """The LAION aesthetic MLP from a .safetensors file (convert the released .pth once with
    safetensors.torch.save_file(torch.load(pth, weights_only=True), out))."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"aesthetic predictor: no file {path!r} (expected a .safetensors file with "
                                f"layers.{{0,2,4,6,7}}.{{weight,bias}}, e.g. sac+logos+ava1-l14-linearMSE converted)")
    if not path.endswith(".safetensors"):
        raise ValueError(f"aesthetic predictor: {path!r} is not .safetensors; convert the released .pth with "
                         f"safetensors.torch.save_file(torch.load(pth, weights_only=True), 'out.safetensors')")
    state = load_file(path)
    if "layers.0.weight" not in state:
        raise KeyError(f"aesthetic predictor: {path!r} has no layers.0.weight (keys: {sorted(state)[:8]})")
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.to(device).eval().requires_grad_(False)


@torch.no_grad()
def aesthetic_score(clip, mlp, images):
    """(B,) LAION aesthetic scores: the MLP on the L2-normalised CLIP ViT-L/14 image embedding."""
    e = clip.image_features(images)  # (B, 768), unit norm
    return mlp(e.to(next(mlp.parameters()).dtype)).float()


# -----------------------------------------------------------------------------
# ImageReward: BLIP ViT-L image tokens -> BERT with cross-attention -> [CLS] -> MLP head

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072


class ImageReward(nn.Module):
    """ImageReward on transformers' BlipVisionModel and BlipTextModel (cross-attention, no pooler).

    reward = (MLP(text_encoder(prompt, cross-attending to the image tokens)[:, 0]) - mean) / std;
    the prompt is tokenized to 35 tokens (BERT, padded to max_length); the image preprocessing is
    CLIP's (shortest side 224 bicubic, centre crop, OpenAI mean/std). The MLP is the aesthetic
    head's shape (768 -> ... -> 1).
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
        pixels = preprocess_clip(to_unit(images).to(device), self.image_size)  # (B, 3, S, S)
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
        raise KeyError(f"not an ImageReward state dict: missing {missing} (has {sorted(state)[:6]} ...)")
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


def load_image_reward(path, tokenizer_dir, device="cpu", vision_heads=None, text_heads=None):
    """ImageReward from ImageReward.pt (or a .safetensors of the same state dict) and a BERT tokenizer
    folder (bert-base-uncased; BLIP adds [DEC] and [ENC], which prompts never contain).
    Pickles load with weights_only=True."""
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ImageReward: no file {path!r} (expected ImageReward.pt or a .safetensors "
                                f"with blip.visual_encoder.*, blip.text_encoder.*, mlp.*)")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"ImageReward: tokenizer {tokenizer_dir!r} is not a folder (expected a BERT "
                                f"tokenizer, e.g. a local copy of bert-base-uncased)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    vcfg, vis, tcfg, text, mlp_state = imagereward_to_transformers(state)
    if vision_heads:
        vcfg.num_attention_heads = vision_heads
    if text_heads:
        tcfg.num_attention_heads = text_heads
    vision, text_model = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
    for name, module, tensors in (("vision", vision, vis), ("text", text_model, text)):
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise KeyError(f"ImageReward {name} weights in {path!r}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    mlp = AestheticMLP(mlp_state["layers.0.weight"].shape[1])
    mlp.load_state_dict(mlp_state)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return ImageReward(vision, text_model, mlp, tokenizer).to(device)


# -----------------------------------------------------------------------------
# FID: Frechet distance between Gaussians fitted to features


def feature_statistics(features):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma is the unbiased covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs (N >= 2, D) features, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(S):
    lam, U = np.linalg.eigh((S + S.T) / 2)
    return (U * np.sqrt(np.clip(lam, 0, None))) @ U.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix,
    so both square roots come from eigendecompositions (negative round-off eigenvalues -> 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    S1, S2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or S1.shape != S2.shape or S1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {S1.shape} / {S2.shape}")
    r1 = _sqrt_psd(S1)
    M = r1 @ S2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt)


def load_statistics(path):
    """(mu, sigma) from an .npz reference-statistics file (pytorch-fid / clean-fid layout)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics: no file {path!r} (expected an .npz with arrays 'mu' and 'sigma')")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise KeyError(f"FID statistics: {path!r} lacks {missing} (has {f.files}; expected 'mu' and 'sigma')")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def save_statistics(path, mu, sigma):
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    atomic_write(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma), suffix=".npz")


# The FID Inception network: pool3 (2048-d) of TensorFlow's 2015-12-05 Inception v3 graph, in the
# layout of pytorch-fid's FIDInceptionV3 (torchvision-style names: Conv2d_1a_3x3.conv.weight,
# Mixed_5b.branch1x1.bn.running_mean, ...). Differences from torchvision's inception_v3 that the
# TF graph has: the average pools of the A, C and first E blocks do not count the padding, and the
# last E block pools with a max pool. The classifier (fc.*) is not needed and is ignored.


class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c_in, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block pools with a max pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


def tf_resize_bilinear(x, size):
    """TensorFlow's legacy ResizeBilinear (align_corners=False, no half-pixel centres), as in the
    FID graph: output pixel i samples input coordinate i * in / out, clamped at the last pixel."""
    def axis(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).float().to(x.device)

    y0, y1, fy = axis(x.shape[-2], size)
    x0, x1, fx = axis(x.shape[-1], size)
    rows = x[..., y0, :] * (1 - fy[:, None]) + x[..., y1, :] * fy[:, None]  # (B, C, size, W)
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx  # (B, C, size, size)


class InceptionPool3(nn.Module):
    """images -> (B, 2048) pool3 features. Input: (B, 3, H, W) in [-1, 1] (or PIL); resized to
    299 x 299 with TF's legacy bilinear resize, then scaled to [-1, 1] (2 x - 1, as pytorch-fid;
    the TF graph itself computes (x - 128) / 128 on [0, 255] values, within 1/128 of this)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)

    @torch.no_grad()
    def forward(self, images):
        x = to_unit(images).to(self.Conv2d_1a_3x3.conv.weight.device)  # (B, 3, H, W) in [0, 1]
        x = tf_resize_bilinear(x, 299) * 2 - 1  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))  # (B, 2048)


def load_inception(path, device="cpu"):
    """The FID Inception from a .safetensors state dict in pytorch-fid's names (convert
    pt_inception-2015-12-05-6726825d.pth once with safetensors.torch.save_file)."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception: no file {path!r} (expected a .safetensors state dict of "
                                f"pytorch-fid's FIDInceptionV3: Conv2d_1a_3x3.conv.weight, ..., Mixed_7c.*)")
    if not path.endswith(".safetensors"):
        raise ValueError(f"FID Inception: {path!r} is not .safetensors; convert the .pth with "
                         f"safetensors.torch.save_file(torch.load(pth, weights_only=True), 'out.safetensors')")
    state = {k: v for k, v in load_file(path).items() if not k.startswith(("fc.", "AuxLogits."))}
    net = InceptionPool3()
    expected = net.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise KeyError(f"FID Inception: {path!r} does not match (missing {missing[:5]} of {len(missing)}, "
                       f"unexpected {unexpected[:5]} of {len(unexpected)})")
    net.load_state_dict(state, strict=False)
    return net.to(device).eval().requires_grad_(False)


def fid(features, batches, reference):
    """FID of images against reference statistics.

    features: a callable images -> (B, D), e.g. load_inception(path) (pool3, 2048-d);
    batches: an iterable of image batches; reference: (mu, sigma) or an .npz path.
    """
    mu_r, sigma_r = load_statistics(reference) if isinstance(reference, (str, os.PathLike)) else reference
    feats = np.concatenate([np.asarray(torch.as_tensor(features(b)).double().cpu()) for b in tqdm(batches, "FID")])
    mu, sigma = feature_statistics(feats)
    return frechet_distance(mu, sigma, mu_r, sigma_r)


# -----------------------------------------------------------------------------
# DPG-Bench


@dataclasses.dataclass(frozen=True)
class Question:
    qid: int
    text: str
    parents: tuple  # qids that must be answered "yes" for this one to count (0 = none)
    category: str  # level-1 category (category_broad)


def load_dpg_questions(path):
    """DPG-Bench's dpg_bench.csv -> {item_id: [Question, ...] sorted by qid}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DPG-Bench: no file {path!r} (expected dpg_bench.csv with columns item_id, "
                                f"proposition_id, dependency, category_broad, question)")
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"item_id", "proposition_id", "dependency", "category_broad", "question"}
        if not need <= set(reader.fieldnames or ()):
            raise KeyError(f"DPG-Bench: {path!r} lacks columns {sorted(need - set(reader.fieldnames or ()))}")
        for row in reader:
            parents = tuple(int(p) for p in str(row["dependency"]).replace(" ", "").split(",") if p not in ("", "0"))
            out.setdefault(row["item_id"], []).append(
                Question(int(row["proposition_id"]), row["question"], parents, row["category_broad"]))
    for qs in out.values():
        qs.sort(key=lambda q: q.qid)
    return out


def split_tiles(image, tile):
    """A grid image (the benchmark's 2 x 2 of `tile`-pixel images) -> its tiles, row-major."""
    W, H = image.size
    if W % tile or H % tile:
        raise ValueError(f"DPG-Bench: image {W}x{H} is not a grid of {tile}x{tile} tiles")
    return [image.crop((c, r, c + tile, r + tile)) for r in range(0, H, tile) for c in range(0, W, tile)]


def dpg_scores(tile_image, questions, vqa):
    """{qid: 0/1} for one tile: 1 where the VQA answers "yes"; then a question whose parent
    scored 0 scores 0 (in qid order, so zeros propagate down a chain)."""
    scores = {q.qid: float(vqa(tile_image, q.text).strip().lower() == "yes") for q in questions}
    for q in questions:
        if any(scores.get(p, 1.0) == 0 for p in q.parents):
            scores[q.qid] = 0.0
    return scores


def dpg_bench(images, questions, vqa, tile=512):
    """DPG-Bench score with a pluggable vqa(image, question) -> str.

    images: {item_id: PIL image (a grid of tiles)} or a folder of {item_id}.png; questions:
    load_dpg_questions output or the CSV path. Per prompt: mean over tiles of the mean over its
    questions. Returns {"overall": mean over prompts x 100, "categories": {level-1 category:
    mean over all (prompt, tile, question) of that category x 100}, "per_prompt": {...}}.
    """
    if isinstance(questions, (str, os.PathLike)):
        questions = load_dpg_questions(questions)
    per_prompt, cat_sum, cat_n = {}, {}, {}
    for item_id, qs in tqdm(sorted(questions.items()), "DPG-Bench"):
        if isinstance(images, dict):
            if item_id not in images:
                raise KeyError(f"DPG-Bench: no image for prompt {item_id!r}")
            image = images[item_id]
        else:
            path = os.path.join(images, f"{item_id}.png")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"DPG-Bench: no image {path!r} for prompt {item_id!r}")
            image = Image.open(path).convert("RGB")
        tile_means = []
        for t in split_tiles(image, tile):
            scores = dpg_scores(t, qs, vqa)
            tile_means.append(sum(scores.values()) / len(scores))
            for q in qs:
                cat_sum[q.category] = cat_sum.get(q.category, 0.0) + scores[q.qid]
                cat_n[q.category] = cat_n.get(q.category, 0) + 1
        per_prompt[item_id] = 100 * sum(tile_means) / len(tile_means)
    return {"overall": sum(per_prompt.values()) / len(per_prompt),
            "categories": {c: 100 * cat_sum[c] / cat_n[c] for c in sorted(cat_sum)},
            "per_prompt": per_prompt}


# -----------------------------------------------------------------------------
# Prompt sets from local files


def load_prompts(path):
    """A list of prompts from a .txt (one per line), .json (a list) or .jsonl ({"prompt": ...})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts: no file {path!r} (expected .txt one prompt per line, a .json list, "
                                f"or .jsonl with a 'prompt' field)")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["prompt"] for line in f if line.strip()]
        if path.endswith(".json"):
            data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"prompts: {path!r} is not a JSON list of strings")
            return [str(p) for p in data]
        return [line.rstrip("\n") for line in f if line.strip()]


HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def load_hps_prompts(folder):
    """HPS v2 benchmark: {style: [800 prompts]} from folder/{anime,concept-art,paintings,photo}.json."""
    out = {}
    for style in HPS_STYLES:
        path = os.path.join(folder, f"{style}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HPS v2 benchmark: no file {path!r} (expected {', '.join(HPS_STYLES)} .json "
                                    f"files, each a list of prompts, in {folder!r})")
        out[style] = load_prompts(path)
    return out


def load_dpg_prompts(folder):
    """DPG-Bench: {item_id: prompt} from folder/*.txt (the benchmark's prompts/ folder)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"DPG-Bench prompts: {folder!r} is not a folder (expected one <item_id>.txt each)")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                out[name[:-4]] = f.read().strip()
    if not out:
        raise FileNotFoundError(f"DPG-Bench prompts: no .txt files in {folder!r}")
    return out


def load_coco_captions(path, per_image=1):
    """COCO captions_*.json -> [(image_id, caption)], the first `per_image` captions of each image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO captions: no file {path!r} (expected captions_val2014.json or similar)")
    with open(path, encoding="utf-8") as f:
        anns = json.load(f).get("annotations")
    if anns is None:
        raise KeyError(f"COCO captions: {path!r} has no 'annotations' list")
    seen, out = {}, []
    for a in anns:
        if seen.get(a["image_id"], 0) < per_image:
            seen[a["image_id"]] = seen.get(a["image_id"], 0) + 1
            out.append((a["image_id"], a["caption"].strip()))
    return out


def load_image_folder(folder):
    """Sorted image files of a folder -> (names, list of RGB PIL images)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"images: {folder!r} is not a folder of {'/'.join(IMAGE_SUFFIXES)} files")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder!r}")
    return names, [Image.open(os.path.join(folder, n)).convert("RGB") for n in names]


# -----------------------------------------------------------------------------
# Speed: NFE and wall time per image of every sampler, same model, noise and prompt


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_table(model, noise, context, y, context_null, y_null, *, w, steps, methods=None, strong=None,
                weak=None, repeats=1, warmup_steps=2, **kwargs):
    """Rows {method, nfe, wall_s (per image), nfe_ratio, wall_ratio} (ratios to the student).

    Every method runs on the same noise (B, C, H, W) and conditioning; methods run in turns,
    `repeats` times, and the fastest run counts (load on a shared machine only adds time).
    W2SD runs only with both a strong and a weak model (`methods` defaults to those that can run).
    """
    if methods is None:
        methods = [m for m in samplers.METHODS if m != "w2sd" or (strong is not None and weak is not None)]
    methods = [samplers.canonical(m, samplers.METHODS) for m in methods]
    if "student" not in methods:
        raise ValueError("speed_table reports ratios to the student: include 'student' in methods")
    device, B = noise.device, noise.shape[0]

    def run(method, n):
        return samplers.sample(method, model, noise, context, y, context_null, y_null,
                               w=None if method == "euler" else w, steps=n, strong=strong, weak=weak, **kwargs)

    for m in methods:  # warm-up (kernels, allocator)
        run(m, warmup_steps)
    wall, nfe = {m: math.inf for m in methods}, {}
    for _ in tqdm(range(repeats), "speed", disable=repeats < 2):
        for m in methods:
            _sync(device)
            t0 = time.perf_counter()
            x0, nfe[m] = run(m, steps)
            _sync(device)
            wall[m] = min(wall[m], (time.perf_counter() - t0) / B)
            if not torch.isfinite(x0).all():
                raise RuntimeError(f"speed_table: {m} produced non-finite latents")
    return [dict(method=m, nfe=nfe[m], wall_s=wall[m], nfe_ratio=nfe[m] / nfe["student"],
                 wall_ratio=wall[m] / wall["student"]) for m in methods]


# -----------------------------------------------------------------------------
# The w-sweep (Fig. 4 and 5a): every method at every w, scored by every metric


def w_sweep(generate, metrics, prompts, methods, ws):
    """results {method: {w: {metric: mean score}}} and images {method: {w: images}}.

    generate(method, w, prompts) -> images for those prompts (same seeds for every method and w,
    e.g. a closure over samplers.sample, vae.decode and fixed noise); metrics: {name: fn(images,
    prompts) -> (B,) per-image scores}. The first image of each (method, w) feeds `image_grid`.
    """
    results, images = {}, {}
    for method in methods:
        for w in tqdm(ws, f"w-sweep {method}"):
            x = generate(method, w, prompts)
            images.setdefault(method, {})[w] = x
            results.setdefault(method, {})[w] = {
                name: aggregate(torch.as_tensor(fn(x, prompts)), name) for name, fn in metrics.items()}
    return results, images


# -----------------------------------------------------------------------------
# Tables (Markdown + JSON)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def markdown_table(rows, columns=None):
    """rows: list of dicts -> a Markdown table (columns default to the keys in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_table(rows, stem, columns=None, title=None):
    """Writes stem.md and stem.json (the same rows); returns the Markdown text."""
    md = (f"### {title}\n\n" if title else "") + markdown_table(rows, columns)
    _write_text(stem + ".md", md)
    _write_text(stem + ".json", json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    return md


# -----------------------------------------------------------------------------
# Figures with pillow: line plots (Fig. 5a, 5b) and image grids (Fig. 4)

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def _ticks(lo, hi, n=5):
    if hi == lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def line_plot(series, path, title="", xlabel="", ylabel="", size=(640, 420)):
    """series: {name: (xs, ys)} -> a PNG line plot with markers, axes, ticks and a legend."""
    W, H = size
    left, right, top, bottom = 70, 20, 30, 50
    font = ImageFont.load_default()
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for y in s[1] if math.isfinite(y)]
    if not xs or not ys:
        raise ValueError("line_plot: nothing to plot")
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (y1 - y) / (y1 - y0) * (H - top - bottom))

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for tx in _ticks(x0, x1):
        p = px(tx, y0)
        d.line([p, (p[0], p[1] + 4)], fill="black")
        d.text((p[0] - 8, p[1] + 6), f"{tx:g}", fill="black", font=font)
    for ty in _ticks(y0, y1):
        p = px(x0, ty)
        d.line([(p[0] - 4, p[1]), p], fill="black")
        d.line([(p[0] + 1, p[1]), (W - right - 1, p[1])], fill=(230, 230, 230))
        d.text((4, p[1] - 6), f"{ty:.4g}", fill="black", font=font)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = [px(x, y) for x, y in zip(sx, sy) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        if len(pts) <= 60:
            for p in pts:
                d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        d.rectangle([W - right - 150, top + 8 + 14 * i, W - right - 140, top + 18 + 14 * i], fill=c)
        d.text((W - right - 135, top + 6 + 14 * i), str(name), fill="black", font=font)
    d.text((left, 8), title, fill="black", font=font)
    d.text(((W + left) // 2 - 3 * len(xlabel), H - 18), xlabel, fill="black", font=font)
    d.text((4, top - 20), ylabel, fill="black", font=font)
    img.save(path)
    return img


def read_log(path, key="loss"):
    """(steps, values) of `key` from a training log: .jsonl (one dict per line with "step") or .csv
    with a header that has "step" and `key`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log: no file {path!r} (expected .jsonl lines with 'step' and {key!r}, or a .csv)")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else list(csv.DictReader(f))
    rows = [r for r in rows if r.get(key) not in (None, "") and r.get("step") not in (None, "")]
    if not rows:
        raise KeyError(f"log: {path!r} has no rows with both 'step' and {key!r}")
    return [float(r["step"]) for r in rows], [float(r[key]) for r in rows]


def image_grid(rows, path, row_labels=(), col_labels=(), cell=256):
    """rows: list of lists of PIL images (methods x w, Fig. 4) -> a labelled PNG grid."""
    font = ImageFont.load_default()
    lw = 110 if row_labels else 0
    th = 20 if col_labels else 0
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (lw + n_cols * cell, th + len(rows) * cell), "white")
    d = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        d.text((lw + j * cell + 4, 4), str(label), fill="black", font=font)
    for i, row in enumerate(rows):
        if i < len(row_labels):
            d.text((4, th + i * cell + cell // 2), str(row_labels[i]), fill="black", font=font)
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell), Image.BICUBIC), (lw + j * cell, th + i * cell))
    grid.save(path)
    return grid


def sweep_plot(results, metric, path):
    """Fig. 5a: results {method: {w: {metric: value}}} (JSON keys may be strings) -> score vs w."""
    series = {}
    for method, by_w in results.items():
        pts = sorted((float(w), float(v[metric])) for w, v in by_w.items() if metric in v)
        if pts:
            series[method] = ([p[0] for p in pts], [p[1] for p in pts])
    if not series:
        raise KeyError(f"sweep_plot: no {metric!r} values in the results")
    return line_plot(series, path, title=f"{metric} vs guidance w", xlabel="w", ylabel=metric)


# -----------------------------------------------------------------------------
# Command line


def cmd_score(args):
    names, images = load_image_folder(args.images)
    if args.metric == "imagereward":
        if not (args.imagereward and args.prompts):
            raise ValueError("--metric imagereward needs --imagereward ImageReward.pt, --clip a BERT tokenizer "
                             "folder, and --prompts")
        prompts = load_prompts(args.prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images in {args.images!r} but {len(prompts)} prompts in {args.prompts!r}")
        ir = load_image_reward(args.imagereward, args.clip, args.device)
        scores = torch.cat([ir(images[i:i + args.batch], prompts[i:i + args.batch])
                            for i in tqdm(range(0, len(images), args.batch), "imagereward")])
        result = scores.double().mean().item()
    elif args.metric == "aesthetic":
        if not args.aesthetic:
            raise ValueError("--metric aesthetic needs --aesthetic PATH.safetensors (the LAION MLP)")
        clip, mlp = load_clip(args.clip, "clip", args.device), load_aesthetic(args.aesthetic, args.device)
        scores = torch.cat([aesthetic_score(clip, mlp, images[i:i + args.batch])
                            for i in tqdm(range(0, len(images), args.batch), "aesthetic")])
        result = scores.double().mean().item()
    else:
        if not args.prompts:
            raise ValueError(f"--metric {args.metric} needs --prompts (one per image, in sorted file-name order)")
        prompts = load_prompts(args.prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images in {args.images!r} but {len(prompts)} prompts in {args.prompts!r}")
        clip = load_clip(args.clip, PRESETS[args.metric].preprocess, args.device)
        scores = torch.cat([clip_type_score(clip, images[i:i + args.batch], prompts[i:i + args.batch], args.metric)[0]
                            for i in tqdm(range(0, len(images), args.batch), args.metric)])
        result = aggregate(scores, args.metric)
    print(json.dumps({"metric": args.metric, "images": len(images), "score": result}))
    if args.out:
        _write_text(args.out, json.dumps({"metric": args.metric, "score": result,
                                            "per_image": dict(zip(names, scores.tolist()))}, indent=2) + "\n")


def cmd_speed(args):
    import mmdit
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.mmdit:
        load = lambda p: mmdit.load_mmdit(p, device, dtype).eval().requires_grad_(False)  # noqa: E731
        model = load(args.mmdit)
        strong, weak = (load(args.strong) if args.strong else None), (load(args.weak) if args.weak else None)
    else:  # a tiny random MMDiT: the cost of a forward does not depend on its weights
        torch.manual_seed(0)
        model = mmdit.MMDiT(mmdit.CONFIGS["tiny-sd3"]).to(device, dtype).eval().requires_grad_(False)
        strong = weak = None
    cfg = model.config
    g = torch.Generator().manual_seed(args.seed)
    side = args.res // 8
    noise = torch.randn(args.batch, cfg.in_channels, side, side, generator=g).to(device)  # (B, C, H, W)
    # random conditioning of the right shapes: the cost does not depend on the prompt
    context = torch.randn(args.batch, args.tokens, cfg.context_dim, generator=g).to(device, dtype)  # (B, L, Dc)
    y = torch.randn(args.batch, cfg.pooled_dim, generator=g).to(device, dtype)  # (B, Dy)
    context_null = torch.randn(1, args.tokens, cfg.context_dim, generator=g).to(device, dtype)
    y_null = torch.randn(1, cfg.pooled_dim, generator=g).to(device, dtype)
    rows = speed_table(model, noise, context, y, context_null, y_null, w=args.w, steps=args.steps,
                       strong=strong, weak=weak, repeats=args.repeats)
    title = f"speed: {args.steps} steps, w = {args.w}, {args.res}px, batch {args.batch}, {device.type}"
    print(write_table(rows, args.out, title=title))


def main(args):
    if args.command == "score":
        cmd_score(args)
    elif args.command == "fid":
        print(json.dumps({"fid": frechet_distance(*load_statistics(args.stats[0]), *load_statistics(args.stats[1]))}))
    elif args.command == "convert-hps":
        print(convert_openclip(args.checkpoint, args.tokenizer, args.out))
    elif args.command == "fid-stats":
        net = load_inception(args.inception, args.device)
        _, images = load_image_folder(args.images)
        feats = torch.cat([net(images[i:i + args.batch]).double().cpu()
                           for i in tqdm(range(0, len(images), args.batch), "Inception")])
        save_statistics(args.out, *feature_statistics(feats.numpy()))
        print(json.dumps({"images": len(images), "out": args.out}))
    elif args.command == "speed":
        cmd_speed(args)
    elif args.command == "plot-loss":
        steps, values = read_log(args.log, args.key)
        line_plot({args.key: (steps, values)}, args.out, title=f"{args.key} vs step", xlabel="step", ylabel=args.key)
    elif args.command == "plot-sweep":
        with open(args.results, encoding="utf-8") as f:
            sweep_plot(json.load(f), args.metric, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="a CLIP-type metric or the aesthetic score of a folder of images")
    p.add_argument("--metric", required=True, choices=sorted(PRESETS) + ["aesthetic", "imagereward"])
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder (with tokenizer files); "
                   "for imagereward: the BERT tokenizer folder")
    p.add_argument("--imagereward", help="ImageReward.pt (for --metric imagereward)")
    p.add_argument("--aesthetic", help="LAION aesthetic MLP .safetensors (for --metric aesthetic)")
    p.add_argument("--images", required=True, help="folder of images, scored in sorted file-name order")
    p.add_argument("--prompts", help=".txt/.json/.jsonl prompts, one per image in sorted file-name order")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON file for the per-image scores")
    p = sub.add_parser("fid", help="Frechet distance between two .npz statistics files (mu, sigma)")
    p.add_argument("stats", nargs=2)
    p = sub.add_parser("convert-hps", help="open_clip checkpoint (HPS v2/v2.1, ViT-g-14) -> transformers folder")
    p.add_argument("checkpoint")
    p.add_argument("--tokenizer", required=True, help="an OpenAI CLIP tokenizer folder (openai/clip-vit-*)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("fid-stats", help="Inception pool3 statistics (mu, sigma) of a folder of images, as .npz")
    p.add_argument("--inception", required=True, help="FID Inception weights (.safetensors, pytorch-fid names)")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p = sub.add_parser("speed", help="NFE and wall time per image of every sampler, ratios to the student")
    p.add_argument("--mmdit", help="MMDiT checkpoint (default: a tiny random MMDiT)")
    p.add_argument("--strong", help="strong model for W2SD")
    p.add_argument("--weak", help="weak model for W2SD")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--tokens", type=int, default=333, help="text tokens (SD3: 333)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--w", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="speed", help="output stem: writes STEM.md and STEM.json")
    p = sub.add_parser("plot-loss", help="loss vs step from distill.py's log (Fig. 5b)")
    p.add_argument("log")
    p.add_argument("--key", default="loss")
    p.add_argument("--out", default="loss.png")
    p = sub.add_parser("plot-sweep", help="score vs w from a results JSON {method: {w: {metric: v}}} (Fig. 5a)")
    p.add_argument("results")
    p.add_argument("--metric", required=True)
    p.add_argument("--out", default="sweep.png")
    main(parser.parse_args())
