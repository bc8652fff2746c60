"""
The method: how the guidance scale w enters the network (TeEFusion, paper Eq. 6 and 7),
the ablations of the paper's Table 3, the DICE baseline, and SD3 prompt encoding.

An SD3 MMDiT is conditioned on a vector c made from the flow time t and the pooled text
vector y by two of its own modules, G = model.t_embedder and F = model.y_embedder:

    Eq. 6   c = G(psi(t)) + F(y)
    Eq. 7   z = G(psi(t)) + F(y) + G(psi(w)) * F(y - y_null)            (TeEFusion, the paper)
            z = G(psi(t)) + F(y) + G(psi(w)) * F(y - y_null) / 256      (as released: this project's default)

Eq. 7 takes the difference of the pooled vectors BEFORE F, F(y - y_null), in the paper and in the
release alike. The release adds two things the paper does not write: the factor 1/256 on the fused
term (RELEASED_SCALE; `scale` below), and w fed to psi on the timestep's scale, psi(1000 w).

The student is the same network called with `vec=z`: one forward pass per sampling step
instead of two (CFG) or six (Z-Sampling / W2SD with CFG), and no new parameters.

    import embed, mmdit
    z = embed.teefusion_conditioning(model, t, y, y_null, w=5.0)   # (B, D)
    v = model(x, t, context, y, vec=z)                             # the student's velocity

`FUSIONS` names every way distill.py can build the student's inputs, each as its paper trains it:
"teefusion" (Eq. 7), "gonly" (Table 3's row G(psi(w)): c + G(psi(w)), the text factor left out, at
full scale as the paper writes it), "gonly-scaled" (the same at Eq. 7's scale, G(psi(w)) / 256, so
that it starts as near the teacher as TeEFusion does), "distillcfg" (Table 3: a new
default-initialised guidance MLP, as FLUX's guidance_in, at full scale), and "dice" (the DICE
baseline: a token enhancer trained alone at one guidance, w = 4). All of them condition on
z = G(psi(t)) + text with `text` independent of t, so samplers compute it once per image
(`Fusion.prepare`). `load_student(path)` reads back what distill.py wrote: the MMDiT and its
fusion, the method taken from the file's metadata (`teefusion_method`). `TextEncoders` turns
prompts into (context, y) as SD3 does (CLIP-L, CLIP-G, T5 through transformers).

psi(1000 w) is formed in float32 everywhere in this project (training and sampling); the
authors' released pipeline forms it in the model's dtype (bf16: w = 5 becomes 4992), which
`teefusion_conditioning(..., w_dtype=torch.bfloat16)` reproduces for their released weights.
Their pipeline's `guidance_scale` is this w fed to psi directly, not diffusers' g = 1 + w.

Shape legend: B batch, L tokens, D model width, Dc context width, Dy pooled width.
"""

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's pooled-text embedder

from run import cli
from mmdit import Embedder, load_mmdit, timestep_embedding  # psi lives with the network that consumes it

__all__ = ["timestep_embedding", "guidance_tensor", "timestep_term", "sd3_conditioning", "teefusion_text_term",
           "teefusion_conditioning", "gonly_conditioning", "FUSIONS", "make_fusion", "student_files", "load_student",
           "TextEncoders"]

DICE_W = 4.0  # the one guidance DICE is trained for: diffusers' guidance_scale 5 (its release), g = 1 + w
# The fused term's factor in the authors' released model (their transformer divides G(psi(w)) * F(y - y_null)
# by 256; the paper's Eq. 7 has no factor). A power of two: multiplying by it is exactly dividing by 256.
RELEASED_SCALE = 1 / 256


def guidance_tensor(w, batch, device):
    """w as a float32 (B,) tensor; w is a float or a (B,) tensor in the paper's
    convention (CFG = (1 + w) v_c - w v_null). Negative or non-finite w is an error."""
    w = torch.as_tensor(w, dtype=torch.float32, device=device).reshape(-1)
    if w.numel() == 1:
        w = w.expand(batch)
    if w.numel() != batch:
        raise ValueError(f"guidance scale w must be a float or a ({batch},) tensor, got {w.numel()} values")
    if not torch.isfinite(w).all():
        raise ValueError(f"guidance scale w must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"guidance scale w must be >= 0 (paper convention, w = diffusers' guidance_scale - 1), "
                         f"got {w.tolist()}")
    return w


def timestep_term(model, t, batch=None):
    """G(psi(t)), the time half of Eq. 6, (B, D). t: a float or a (B,) tensor."""
    G = model.t_embedder
    device = G.mlp[0].weight.device
    t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
    if batch is not None:
        t = t.expand(batch)
    return G(timestep_embedding(t, model.config.frequency_dim))  # (B, D)


def sd3_conditioning(model, t, y):
    """Eq. 6: c = G(psi(t)) + F(y), with the model's own G = t_embedder, F = y_embedder."""
    # Eq. 6
    return timestep_term(model, t, y.shape[0]) + model.y_embedder(y)  # (B, D)


def teefusion_text_term(model, y, y_null, w, w_dtype=None, scale=RELEASED_SCALE):
    """The part of Eq. 7 that does not depend on t: F(y) + G(psi(w)) * F(y - y_null) * scale, (B, D).
    A sampler computes it once per image and adds G(psi(t)) at every step (`teefusion_conditioning`)."""
    G, F = model.t_embedder, model.y_embedder
    w = guidance_tensor(w, y.shape[0], y.device)
    psi_w = timestep_embedding(w, model.config.frequency_dim, scale_dtype=w_dtype or torch.float32)  # (B, 256)
    # Eq. 7, the guidance term: G(psi(w)) * F(y - y_null), times 1/256 as released
    return F(y) + G(psi_w) * F(y - y_null) * scale  # (B, D)


def teefusion_conditioning(model, t, y, y_null, w, w_dtype=None, scale=RELEASED_SCALE):
    """Eq. 7: z = G(psi(t)) + F(y) + G(psi(w)) * F(y - y_null) * scale, scale 1/256 as released.

    y (B, Dy) is the pooled conditional text, y_null (B or 1, Dy) the pooled null (empty
    string, or a negative prompt); w a float or (B,) tensor, psi applied to 1000 * w. "*" is
    elementwise over the D channels; G and F are the pretrained modules, so TeEFusion adds no
    parameters. The difference is taken on the pooled vectors BEFORE F, F(y - y_null), as the
    paper's Eq. 7 writes it and the release computes it (F is an MLP with a bias: F(y) - F(y_null)
    would be another function).

    What the release adds to the paper's text, kept so that released student weights give the
    right images: scale = 1/256 (RELEASED_SCALE; the paper has no factor), and psi(1000 w).
    w_dtype: the dtype in which 1000 * w is formed. None (float32) is this project's one
    convention, for training and for sampling. The authors' released pipeline forms it in the
    transformer's dtype: with bf16 weights w = 5 enters psi as 4992 and 7.5 as 7488. Pass
    w_dtype=torch.bfloat16 to reproduce its images from its released bf16 weights.
    """
    # Eq. 7 = G(psi(t)) + [F(y) + G(psi(w)) * F(y - y_null) * scale]
    return timestep_term(model, t, y.shape[0]) + teefusion_text_term(model, y, y_null, w, w_dtype, scale)  # (B, D)


def gonly_conditioning(model, t, y, w, scale=1.0):
    """Table 3 ablation "G only": z = G(psi(t)) + F(y) + G(psi(w)) * scale: Eq. 7 without the text
    factor F(y - y_null). scale 1 is the paper's row (method "gonly"); Eq. 7's scale (1/256 as
    released, method "gonly-scaled") starts the student as near its teacher as TeEFusion's, so that
    the two differ only in that factor."""
    return timestep_term(model, t, y.shape[0]) + GOnly.text_term(model, y, w, scale)


# -----------------------------------------------------------------------------
# The student's inputs, one class per method, so distill.py can train each by name.
# Every method conditions the MMDiT on z = G(psi(t)) + text, where text does not depend on t:
# `prepare` computes (context, y, text) once per image, and a sampler adds G(psi(t)) per step.
# `forward` does both, for training: (context, y, vec) for `model(x, t, context, y, vec=vec)`.


class Fusion(nn.Module):
    trains_model = True  # False: the diffusion model stays frozen, only this module learns
    fixed_w = None  # a number: the method is trained and sampled at this one guidance (DICE)
    reads_null_tokens = False  # True: needs the null prompt's context tokens too (DICE)

    def prepare(self, model, context, y, context_null, y_null, w):
        """-> (context (B, L, Dc), y (B, Dy), text (B, D)): everything that does not depend on t."""
        raise NotImplementedError

    def forward(self, model, t, context, y, context_null, y_null, w):
        context, y, text = self.prepare(model, context, y, context_null, y_null, w)
        return context, y, timestep_term(model, t, y.shape[0]) + text


class TeEFusion(Fusion):
    """Eq. 7. The student sees the conditional tokens only; the null prompt enters through
    its pooled vector. No parameters. w_dtype, scale: see `teefusion_conditioning`."""

    def __init__(self, w_dtype=None, scale=RELEASED_SCALE):
        super().__init__()
        self.w_dtype, self.scale = w_dtype, float(scale)

    def prepare(self, model, context, y, context_null, y_null, w):
        return context, y, teefusion_text_term(model, y, y_null, w, self.w_dtype, self.scale)


class GOnly(Fusion):
    """Table 3 ablation "G only" (`gonly_conditioning`) as the paper writes it: G(psi(w)) at full
    scale. No parameters."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = float(scale)

    @staticmethod
    def text_term(model, y, w, scale):
        w = guidance_tensor(w, y.shape[0], y.device)
        psi_w = timestep_embedding(w, model.config.frequency_dim)  # (B, 256)
        return model.y_embedder(y) + model.t_embedder(psi_w) * scale  # (B, D)

    def prepare(self, model, context, y, context_null, y_null, w):
        return context, y, self.text_term(model, y, w, self.scale)


class GOnlyScaled(GOnly):
    """"G only" at Eq. 7's scale (1/256 as released, or the run's --fused-scale): like for like with
    TeEFusion's student, which starts that near its teacher."""

    def __init__(self, scale=RELEASED_SCALE):
        super().__init__(scale)


class DistillCFG(Fusion):
    """Table 3 ablation DistillCFG: a NEW guidance embedder on psi(w) added to c, as
    FLUX.1-dev's guidance_in and the authors' released `guidance_in` (Linear, SiLU, Linear) with
    PyTorch's default initialisation, as theirs: the paper's Sec. 6.3 credits TeEFusion's faster
    convergence to having no randomly initialised part, so this baseline keeps its random one."""

    def __init__(self, config):
        super().__init__()
        self.guidance_in = Embedder(config.frequency_dim, config.hidden_size)

    def prepare(self, model, context, y, context_null, y_null, w):
        w = guidance_tensor(w, y.shape[0], y.device)
        psi_w = timestep_embedding(w, self.guidance_in.mlp[0].in_features)  # (B, 256)
        return context, y, model.y_embedder(y) + self.guidance_in(psi_w).to(y.dtype)


class Sharpener(nn.Module):
    """DICE's enhancer: a shared Linear (width -> 512) and ReLU on both inputs, one
    cross-attention layer (queries from the conditional tokens, keys and values from the null
    tokens, 8 heads, no qkv bias, an output Linear), ReLU, Linear (512 -> width). PyTorch's
    default initialisation, as DICE's release."""

    def __init__(self, width, inner=512, heads=8):
        super().__init__()
        self.heads = heads
        self.fc1 = nn.Linear(width, inner)
        self.to_q = nn.Linear(inner, inner, bias=False)
        self.to_k = nn.Linear(inner, inner, bias=False)
        self.to_v = nn.Linear(inner, inner, bias=False)
        self.to_out = nn.Linear(inner, inner)
        self.fc2 = nn.Linear(inner, width)

    def forward(self, c, null):
        """c (B, L, W), null (B or 1, L', W) -> (B, L, W)"""
        dtype = self.fc1.weight.dtype
        hc, hn = F_.relu(self.fc1(c.to(dtype))), F_.relu(self.fc1(null.to(dtype)))  # (B, L, 512)
        hn = hn.expand(hc.shape[0], -1, -1)
        B, L, inner = hc.shape
        q = self.to_q(hc).view(B, L, self.heads, -1).transpose(1, 2)  # (B, nh, L, hs)
        k = self.to_k(hn).view(B, hn.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, L', hs)
        v = self.to_v(hn).view(B, hn.shape[1], self.heads, -1).transpose(1, 2)
        o = F_.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, inner)  # (B, L, 512)
        return self.fc2(F_.relu(self.to_out(o)))


class DICE(Fusion):
    """The DICE baseline: refine the text TOKENS, keep the diffusion model FROZEN.

    c' = c + alpha * enhancer(c, null) over the context tokens (B, L, Dc), attending to the null
    (or negative) prompt's tokens; the first token (CLIP's start token) is kept unchanged and the
    pooled vector y is left untouched, as DICE's SDXL release does (a cross-attention of one
    pooled query over one pooled key would be a constant: a softmax over one key is 1).
    DICE is trained so that the UNGUIDED model on c' matches CFG at ONE guidance, fixed_w (its
    release: diffusers' scale 5, w = 4); the w given at sampling time is ignored.
    """

    trains_model = False
    reads_null_tokens = True

    def __init__(self, config, alpha=1.0, inner=512, heads=8, w=DICE_W):
        super().__init__()
        self.alpha, self.fixed_w = alpha, float(w)
        self.tokens = Sharpener(config.context_dim, inner, heads)

    def prepare(self, model, context, y, context_null, y_null, w):
        delta = self.alpha * self.tokens(context, context_null).to(context.dtype)  # (B, L, Dc)
        delta[:, 0] = 0  # the start token stays as it was
        return context + delta, y, model.y_embedder(y)


FUSIONS = {"teefusion": TeEFusion, "gonly": GOnly, "gonly-scaled": GOnlyScaled, "distillcfg": DistillCFG,
           "dice": DICE}
SCALED = ("teefusion", "gonly-scaled")  # the methods whose w term takes Eq. 7's scale (--fused-scale)
SCALE_METADATA = "teefusion_scale"  # a student file's record of that scale (absent: RELEASED_SCALE)


def make_fusion(name, config, scale=None, **kwargs):
    """The student-input module for a method name (see FUSIONS); config is an MMDiTConfig.
    scale: Eq. 7's factor for the methods of SCALED (None: RELEASED_SCALE). kwargs go to the class
    (TeEFusion: w_dtype; DICE: alpha, w)."""
    if name not in FUSIONS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(FUSIONS)}")
    cls = FUSIONS[name]
    if name in SCALED:
        kwargs["scale"] = RELEASED_SCALE if scale is None else scale
    elif scale is not None:
        raise ValueError(f"method {name!r} has no Eq. 7 scale (only {SCALED} do)")
    return cls(config, **kwargs) if cls in (DistillCFG, DICE) else cls(**kwargs)


def _student_metadata(path):
    """(method, scale) a student file says it was trained with: safetensors metadata `teefusion_method`
    and SCALE_METADATA (written by distill.py), or, for a diffusers transformer folder, its
    config.json's `txt_align_guidance: true` (the flag of the authors' released TeEFusion pipeline,
    which computes Eq. 7 at RELEASED_SCALE). (None, None) if neither; scale None if not recorded."""
    from safetensors import safe_open

    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if os.path.isfile(config):
            data = cli.read_json(config)
            if isinstance(data, dict) and data.get("txt_align_guidance"):
                return "teefusion", RELEASED_SCALE
        path = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None, None
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    scale = meta.get(SCALE_METADATA)
    return meta.get("teefusion_method"), None if scale is None else float(scale)


def student_files(path, method=None):
    """(method, fusion file or None) of a student written by distill.py, from file headers only.

    method: one of FUSIONS, else read from the student's metadata (`_student_metadata`). The methods
    with trained weights of their own (distillcfg, dice) keep them in a file beside the student:
    its name with "student" replaced by "fusion" (student.safetensors -> fusion.safetensors,
    student-ema -> fusion-ema, a checkpoint's ema-student -> ema-fusion)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"student: no file or folder {path!r}")
    stored, _ = _student_metadata(path)
    if method is None and stored is None:
        raise ValueError(f"student {path!r}: its metadata does not say how it was trained (no 'teefusion_method', "
                         f"no txt_align_guidance in config.json); name the method, one of {sorted(FUSIONS)}")
    if method is not None and stored is not None and method != stored:
        raise ValueError(f"student {path!r} was trained as {stored!r} (its metadata), not {method!r}")
    method = method or stored
    if method not in FUSIONS:
        raise ValueError(f"student {path!r}: unknown method {method!r}; choose one of {sorted(FUSIONS)}")
    if FUSIONS[method] not in (DistillCFG, DICE):
        return method, None
    name = os.path.basename(os.path.normpath(path))
    fusion = os.path.join(os.path.dirname(os.path.abspath(path)),
                          name.replace("student", "fusion") if "student" in name else "fusion.safetensors")
    if not os.path.isfile(fusion):
        raise FileNotFoundError(f"{fusion}: the {method!r} student {path} needs its trained fusion module, "
                                "which distill.py writes beside the student")
    return method, fusion


def load_student(path, method=None, device="cpu", dtype=torch.float32, w_dtype=None):
    """A student written by distill.py (or a released TeEFusion transformer): (model, fusion).

    model: the MMDiT (mmdit.load_mmdit: Stability file or diffusers folder), frozen, in `dtype`.
    fusion: the student-input module of its method (FUSIONS, from its metadata unless `method` is
    given; see `student_files`), with its trained weights when it has any, for samplers.student:
    TeEFusion(w_dtype, scale) for Eq. 7, at the scale its metadata records (RELEASED_SCALE when it
    records none, as for the authors' released weights). The fusion's own weights stay in float32 (they are tiny, and
    psi(w) is float32)."""
    from safetensors.torch import load_file

    method, fusion_file = student_files(path, method)
    if method != "teefusion" and w_dtype not in (None, torch.float32):
        raise ValueError(f"w_dtype (the rounding of 1000 w) applies to TeEFusion students, not {method!r}")
    model = load_mmdit(path, device=device, dtype=dtype).eval().requires_grad_(False)
    scale = _student_metadata(path)[1] if method in SCALED else None  # Eq. 7's factor it was trained with
    kwargs = dict(w_dtype=w_dtype) if method == "teefusion" else {}
    fusion = make_fusion(method, model.config, scale, **kwargs)
    if fusion_file is not None:
        fusion.load_state_dict(load_file(fusion_file))
    return model, fusion.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# SD3 prompt encoding: prompts -> (context, y)


class TextEncoders:
    """SD3's three text encoders (transformers models), as one callable.

    Per token: CLIP-L and CLIP-G penultimate hidden states (hidden_states[-2], no final
    LayerNorm), concatenated on features (768 + 1280 = 2048), zero-padded to the T5 width
    (4096), then T5-XXL's last hidden state appended on the sequence axis: 77 + 256 tokens.
    Pooled: CLIP-L's and CLIP-G's projected pooled outputs, concatenated (2048). SD3's
    CLIP-L ships an identity text_projection, so "projected" and "not projected" agree.
    Without T5 its part of the context is zeros (as diffusers does). No attention masks.
    The null prompt is the encoded EMPTY STRING, through all three encoders.
    """

    def __init__(self, clip_l, tokenizer_l, clip_g, tokenizer_g, t5=None, tokenizer_t5=None,
                 max_t5_tokens=256, context_dim=4096, device="cpu", dtype=torch.float32):
        if (t5 is None) != (tokenizer_t5 is None):
            raise ValueError("T5 needs both its model and its tokenizer (or neither)")
        self.clips = [(clip_l.to(device, dtype).eval(), tokenizer_l), (clip_g.to(device, dtype).eval(), tokenizer_g)]
        # T5 overflows in fp16 (NaN): it runs in bf16 when fp16 is asked for
        self.t5_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        self.t5 = (t5.to(device, self.t5_dtype).eval(), tokenizer_t5) if t5 is not None else None
        self.max_t5_tokens, self.device, self.dtype = max_t5_tokens, torch.device(device), dtype
        self.context_dim = t5.config.d_model if t5 is not None else context_dim
        for m in [clip_l, clip_g] + ([t5] if t5 is not None else []):
            m.requires_grad_(False)
        self._null = None

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32, use_t5=True, max_t5_tokens=256,
                        context_dim=4096):
        """From a folder in the diffusers layout: text_encoder (CLIP-L), text_encoder_2
        (CLIP-G), text_encoder_3 (T5), tokenizer, tokenizer_2, tokenizer_3. context_dim is
        the MMDiT's context width, used only without T5 (with T5 it is T5's width)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        parts = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        parts += ["text_encoder_3", "tokenizer_3"] if use_t5 else []
        missing = [p for p in parts if not os.path.isdir(os.path.join(folder, p))]
        if missing:
            raise FileNotFoundError(f"{folder}: missing text-encoder folders {missing} (expected the diffusers "
                                    f"layout: {', '.join(parts)}); pass use_t5=False to run without T5")
        sub = lambda p: os.path.join(folder, p)  # noqa: E731
        kw = {"use_safetensors": True}  # weights must be safetensors: pickles can execute code
        clip_l = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder"), **kw)
        clip_g = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder_2"), **kw)
        t5 = tok3 = None
        if use_t5:
            t5 = T5EncoderModel.from_pretrained(sub("text_encoder_3"), **kw)
            tok3 = AutoTokenizer.from_pretrained(sub("tokenizer_3"))
        return cls(clip_l, AutoTokenizer.from_pretrained(sub("tokenizer")), clip_g,
                   AutoTokenizer.from_pretrained(sub("tokenizer_2")), t5, tok3, max_t5_tokens, context_dim,
                   device=device, dtype=dtype)

    def _tokenize(self, tokenizer, prompts, max_length, name):
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids  # (B, max_length)
        full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[1] > max_length:
            cut = [p for p, n in zip(prompts, (full != tokenizer.pad_token_id).sum(1).tolist()) if n > max_length]
            warnings.warn(f"{name}: {len(cut)} prompt(s) longer than {max_length} tokens were truncated, "
                          f"e.g. {cut[0][:80]!r}", stacklevel=3)
        return ids.to(self.device)

    @torch.no_grad()
    def encode(self, prompts):
        """prompts (list of B str) -> context (B, 77 + max_t5_tokens, Dc), y (B, Dy)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("encode() needs at least one prompt, got an empty list")
        tokens, pooled = [], []
        for (model, tokenizer), name in zip(self.clips, ("CLIP-L", "CLIP-G")):
            ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length, name)
            out = model(ids, output_hidden_states=True)
            tokens.append(out.hidden_states[-2])  # (B, 77, 768 | 1280): penultimate layer
            pooled.append(out.text_embeds)  # (B, 768 | 1280)
        clip_tokens = torch.cat(tokens, dim=-1)  # (B, 77, 2048)
        if clip_tokens.shape[-1] > self.context_dim:
            raise ValueError(f"CLIP token width {clip_tokens.shape[-1]} exceeds the context width {self.context_dim}")
        clip_tokens = F_.pad(clip_tokens, (0, self.context_dim - clip_tokens.shape[-1]))  # (B, 77, Dc)
        if self.t5 is not None:
            model, tokenizer = self.t5
            ids = self._tokenize(tokenizer, prompts, self.max_t5_tokens, "T5")
            t5_tokens = model(ids).last_hidden_state  # (B, max_t5_tokens, Dc)
        else:
            t5_tokens = torch.zeros(len(prompts), self.max_t5_tokens, self.context_dim, device=self.device)
        context = torch.cat([clip_tokens.to(self.dtype), t5_tokens.to(self.dtype)], dim=1)  # (B, L, Dc)
        return context, torch.cat(pooled, dim=-1).to(self.dtype)  # (B, Dy)

    def encode_null(self):
        """The null prompt (the paper's empty-set symbol): the encoded empty string,
        (1, L, Dc) and (1, Dy). Cached."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null

    def encode_with_negative(self, prompts, negative_prompts=None):
        """(context, y, context_null, y_null); the null side is the empty string, or the
        negative prompts (one per prompt) when given."""
        context, y = self.encode(prompts)
        if negative_prompts is None:
            context_null, y_null = self.encode_null()
            return context, y, context_null.expand_as(context), y_null.expand_as(y)
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(context)
        if len(negative_prompts) != len(context):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(context)} prompts")
        return (context, y) + self.encode(negative_prompts)
