"""
The method: how the guidance scale w enters the network (TeEFusion, paper Eq. 6 and 7),
the ablations of the paper's Table 3, and the DICE baseline.

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
baseline: a token enhancer trained alone at one guidance, w = 4). Each is a module with
`conditioning(model, t, y, y_null, w)` -> z and `student_context(...)` -> the tokens the student
reads; distill.Student and samplers.student call them. sd3/student_file.py reads a student file back
(the MMDiT and its fusion module); sd3/text_encoders.py turns prompts into (context, y) as SD3 does.

psi(1000 w) is formed in float32 everywhere in this project (training and sampling); the
authors' released pipeline forms it in the model's dtype (bf16: w = 5 becomes 4992), which
`teefusion_conditioning(..., w_dtype=torch.bfloat16)` reproduces for their released weights.
Their pipeline's `guidance_scale` is this w fed to psi directly, not diffusers' g = 1 + w.

Shape legend: B batch, L tokens, D model width, Dc context width, Dy pooled width.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's pooled-text embedder

from mmdit import Embedder, timestep_embedding  # psi lives with the network that consumes it

__all__ = ["timestep_embedding", "guidance_tensor", "timestep_term", "sd3_conditioning", "teefusion_conditioning",
           "gonly_conditioning", "FUSIONS", "make_fusion"]

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


def teefusion_conditioning(model, t, y, y_null, w, w_dtype=None, scale=RELEASED_SCALE):
    """Eq. 7: z = G(psi(t)) + F(y) + G(psi(w)) * F(y - y_null) * scale, (B, D); scale 1/256 as released.

    The one code path of Eq. 7: training (distill.Student through TeEFusion) and sampling
    (samplers.student, and samplers.student_steps for all steps in one call) call this function.
    t a float or (B,) tensor; y (B, Dy) the pooled conditional text, y_null (B or 1, Dy) the
    pooled null (empty string, or a negative prompt); w a float or (B,) tensor, psi applied to
    1000 * w. "*" is elementwise over the D channels; G and F are the pretrained modules, so
    TeEFusion adds no parameters. The difference is taken on the pooled vectors BEFORE F,
    F(y - y_null), as the paper's Eq. 7 writes it and the release computes it (F is an MLP with a
    bias: F(y) - F(y_null) would be another function).

    What the release adds to the paper's text, kept so that released student weights give the
    right images: scale = 1/256 (RELEASED_SCALE; the paper has no factor), and psi(1000 w).
    w_dtype: the dtype in which 1000 * w is formed. None (float32) is this project's one
    convention, for training and for sampling. The authors' released pipeline forms it in the
    transformer's dtype: with bf16 weights w = 5 enters psi as 4992 and 7.5 as 7488. Pass
    w_dtype=torch.bfloat16 to reproduce its images from its released bf16 weights.
    """
    G, F = model.t_embedder, model.y_embedder
    w = guidance_tensor(w, y.shape[0], y.device)  # (B,)
    psi_w = timestep_embedding(w, model.config.frequency_dim, scale_dtype=w_dtype or torch.float32)  # (B, 256)
    # Eq. 7: G(psi(t)) + [F(y) + G(psi(w)) * F(y - y_null) * scale]
    return timestep_term(model, t, y.shape[0]) + (F(y) + G(psi_w) * F(y - y_null) * scale)  # (B, D)


def gonly_conditioning(model, t, y, w, scale=1.0):
    """Table 3 ablation "G only": z = G(psi(t)) + F(y) + G(psi(w)) * scale, (B, D): Eq. 7 without the
    text factor F(y - y_null). scale 1 is the paper's row (method "gonly"); Eq. 7's scale (1/256 as
    released, method "gonly-scaled") starts the student as near its teacher as TeEFusion's, so that
    the two differ only in that factor."""
    w = guidance_tensor(w, y.shape[0], y.device)  # (B,)
    psi_w = timestep_embedding(w, model.config.frequency_dim)  # (B, 256)
    return timestep_term(model, t, y.shape[0]) + (model.y_embedder(y) + model.t_embedder(psi_w) * scale)  # (B, D)


# -----------------------------------------------------------------------------
# The student's inputs, one module per method, so distill.py can train each by name and the samplers
# can run each: `student_context` (the context tokens the student reads: the conditional prompt's,
# changed only by DICE) and `conditioning` (the vector z, from t, y, y_null and w). `forward` returns both, with y,
# for `model(x, t, context, y, vec=z)`.


class Fusion(nn.Module):
    trains_model = True  # False: the diffusion model stays frozen, only this module learns
    fixed_w = None  # a number: the method is trained and sampled at this one guidance (DICE)
    reads_null_tokens = False  # True: needs the null prompt's context tokens too (DICE)

    def student_context(self, model, context, context_null):
        """The context tokens (B, L, Dc) the student reads; they do not depend on t or w."""
        return context

    def conditioning(self, model, t, y, y_null, w):
        """z (B, D)."""
        raise NotImplementedError

    def forward(self, model, t, context, y, context_null, y_null, w):
        return self.student_context(model, context, context_null), y, self.conditioning(model, t, y, y_null, w)


class TeEFusion(Fusion):
    """Eq. 7 (`teefusion_conditioning`). The student sees the conditional tokens only; the null prompt
    enters through its pooled vector. No parameters. w_dtype, scale: see `teefusion_conditioning`."""

    def __init__(self, w_dtype=None, scale=RELEASED_SCALE):
        super().__init__()
        self.w_dtype, self.scale = w_dtype, float(scale)

    def conditioning(self, model, t, y, y_null, w):
        return teefusion_conditioning(model, t, y, y_null, w, self.w_dtype, self.scale)


class GOnly(Fusion):
    """Table 3 ablation "G only" (`gonly_conditioning`) as the paper writes it: G(psi(w)) at full
    scale. No parameters."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = float(scale)

    def conditioning(self, model, t, y, y_null, w):
        return gonly_conditioning(model, t, y, w, self.scale)


class GOnlyScaled(GOnly):
    """"G only" at Eq. 7's scale (1/256 as released, or the run's --fused-scale): like for like with
    TeEFusion's student, which starts that near its teacher."""

    def __init__(self, scale=RELEASED_SCALE):
        super().__init__(scale)


class DistillCFG(Fusion):
    """Table 3 ablation DistillCFG: z = c + guidance_in(psi(w)), a NEW guidance embedder on psi(w), as
    FLUX.1-dev's guidance_in and the authors' released `guidance_in` (Linear, SiLU, Linear) with
    PyTorch's default initialisation, as theirs: the paper's Sec. 6.3 credits TeEFusion's faster
    convergence to having no randomly initialised part, so this baseline keeps its random one."""

    def __init__(self, config):
        super().__init__()
        self.guidance_in = Embedder(config.frequency_dim, config.hidden_size)

    def conditioning(self, model, t, y, y_null, w):
        w = guidance_tensor(w, y.shape[0], y.device)  # (B,)
        psi_w = timestep_embedding(w, self.guidance_in.mlp[0].in_features)  # (B, 256)
        return timestep_term(model, t, y.shape[0]) + (model.y_embedder(y) + self.guidance_in(psi_w).to(y.dtype))


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

    def student_context(self, model, context, context_null):
        delta = self.alpha * self.tokens(context, context_null).to(context.dtype)  # (B, L, Dc)
        delta[:, 0] = 0  # the start token stays as it was
        return context + delta

    def conditioning(self, model, t, y, y_null, w):
        return sd3_conditioning(model, t, y)  # Eq. 6: the frozen model's own c


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
