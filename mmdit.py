"""
The Stable Diffusion 3 / 3.5 MMDiT, written by hand, loaded from safetensors.

This is the network TeEFusion distills: it predicts the flow velocity v = eps - x0 of a
latent x_t = (1 - t) x0 + t eps, conditioned on text tokens (context) and on a pooled
text vector (y). Three published variants share this file and are told apart by the
tensors of a checkpoint, never by its name:

    SD3-medium     depth 24, no qk norm,   pos_embed_max_size 192
    SD3.5-medium   depth 24, qk RMSNorm,   pos_embed_max_size 384, dual attention (layers 0..12)
    SD3.5-large    depth 38, qk RMSNorm,   pos_embed_max_size 192

The conditioning vector is the paper's Eq. 6, c = G(psi(t)) + F(y), with G = t_embedder
and F = y_embedder. TeEFusion (Eq. 7, embed.py) changes only this vector, which is why
`MMDiT.forward` takes an optional `vec` that replaces it.

Parameter names are the keys of Stability's checkpoints (without their
`model.diffusion_model.` prefix), so a Stability file loads without renaming; diffusers
files go through one small mapping with two scale/shift swaps. The file formats (safetensors
only, both layouts, sharded folders, the diffusers export, atomic writes) are sd3/checkpoint.py's;
this file builds the network from what they hold.

    model = load_mmdit("sd3_medium.safetensors", device="cuda", dtype=torch.bfloat16)
    v = model(x, t, context, y)              # x (B,16,H/8,W/8), t (B,) in [0,1]
    save_mmdit(model, "student.safetensors")   # Stability layout, atomic

    python mmdit.py CHECKPOINT     # the config inferred from a checkpoint's tensors, and its size

Shape legend: B batch, L tokens, D width, nh heads, hs head size.
"""

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from sd3 import checkpoint  # the file formats: safetensors, Stability / diffusers names, atomic writes
from sd3.checkpoint import STABILITY_PREFIX, CheckpointError  # noqa: F401  (part of this module's interface)


# -----------------------------------------------------------------------------
# Configuration and the named sizes


@dataclass
class MMDiTConfig:
    depth: int = 24
    hidden_size: int = 1536  # D = 64 * depth for the published models
    num_heads: int = 24  # head size hs = 64 for the published models
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096  # width of the text tokens (CLIP-L|G padded, T5)
    pooled_dim: int = 2048  # width of the pooled text vector y (CLIP-L ++ CLIP-G)
    frequency_dim: int = 256  # width of the sinusoid psi fed to G
    pos_embed_max_size: int = 192  # M: the stored position table is M x M patches
    mlp_ratio: float = 4.0
    qk_norm: bool = False  # per-head RMSNorm on q and k (SD3.5)
    dual_attention_layers: tuple = ()  # layers whose x_block has attn2 (SD3.5-medium)

    def __post_init__(self):
        self.dual_attention_layers = tuple(sorted(int(i) for i in self.dual_attention_layers))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside 0..{self.depth - 1}")

    @property
    def head_size(self):
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self):
        return round(self.hidden_size * self.mlp_ratio)


CONFIGS = {
    "sd3-medium": MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192),
    "sd3.5-medium": MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=384,
                                qk_norm=True, dual_attention_layers=tuple(range(13))),
    "sd3.5-large": MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm=True),
    # tiny sizes with the same structure, for tests and the CPU toy world
    "tiny-sd3": MMDiTConfig(depth=2, hidden_size=64, num_heads=4, in_channels=4, out_channels=4,
                            context_dim=32, pooled_dim=24, pos_embed_max_size=16),
    "tiny-sd3.5-medium": MMDiTConfig(depth=3, hidden_size=64, num_heads=4, in_channels=4, out_channels=4,
                                     context_dim=32, pooled_dim=24, pos_embed_max_size=16,
                                     qk_norm=True, dual_attention_layers=(0, 1)),
    "tiny-sd3.5-large": MMDiTConfig(depth=2, hidden_size=64, num_heads=4, in_channels=4, out_channels=4,
                                    context_dim=32, pooled_dim=24, pos_embed_max_size=16, qk_norm=True),
}


# -----------------------------------------------------------------------------
# The network


def timestep_embedding(s, dim=256, max_period=10000.0, scale_dtype=torch.float32):
    """psi: the sinusoid that G (and, in TeEFusion, the guidance scale) goes through.

    s is flow time in [0, 1] (or a guidance scale w); the network was trained on 1000 * s.
    Frequencies exp(-ln(max_period) * i / half), i < half; cos first, then sin, in float32.
    scale_dtype: the dtype in which 1000 * s is formed. float32 (the default, used for all of
    this project's training and sampling) is exact for every w and t we use; bfloat16 reproduces
    a pipeline that builds the tensor in a bf16 model's dtype (1000 * 5.0 becomes 4992).
    """
    s = torch.as_tensor(s).reshape(-1)  # (B,)
    s1000 = (s.to(scale_dtype) * 1000.0).float()  # (B,) the network's 1000-step scale
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=s.device) / half)
    args = s1000[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def modulate(h, shift, scale):
    return torch.addcmul(shift, h, 1 + scale)  # h * (1 + scale) + shift, one kernel


def layer_norm(h):
    # LayerNorm(D, eps=1e-6) without affine parameters, always in float32
    return F.layer_norm(h.float(), h.shape[-1:], eps=1e-6)


class RMSNorm(nn.Module):
    """Per-head RMSNorm on q and k (SD3.5); statistics in float32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h):
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (hf * self.weight.float()).to(h.dtype)


class Embedder(nn.Module):
    """Linear, SiLU, Linear. G = t_embedder (on psi(t)) and F = y_embedder (on y)."""

    def __init__(self, in_dim, D):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, h):
        return self.mlp(h.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """Conv2d(C -> D, kernel p, stride p), computed as what it is, a linear map of each p x p
    patch, so that the tokens come out contiguous, (B, h, w, D): a conv's (B, D, h, w) output
    would make the whole image residual stream a transposed view (every later op strided)."""

    def __init__(self, patch_size, in_channels, D):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, D, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.proj.kernel_size[0]
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        patches = patches.reshape(B, H // p, W // p, C * p * p).to(self.proj.weight.dtype)  # (B, h, w, C*p*p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, h, w, D)


class Mlp(nn.Module):
    def __init__(self, D, hidden):
        super().__init__()
        self.fc1 = nn.Linear(D, hidden)
        self.fc2 = nn.Linear(hidden, D)

    def forward(self, h):
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class Attention(nn.Module):
    """qkv projection (+ optional qk RMSNorm) and output projection of one stream."""

    def __init__(self, D, num_heads, qk_norm, pre_only=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(D, 3 * D)  # rows ordered [q; k; v]
        if qk_norm:
            self.ln_q = RMSNorm(D // num_heads)
            self.ln_k = RMSNorm(D // num_heads)
        if not pre_only:
            self.proj = nn.Linear(D, D)

    def heads(self, h):
        """(B, L, D) -> q, k, v packed as (B, L, 3, nh, hs): one matmul, a view of its output."""
        B, L, D = h.shape
        qkv = self.qkv(h).view(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, nh, hs)
        if hasattr(self, "ln_q"):
            q, k, v = qkv.unbind(2)  # each (B, L, nh, hs)
            qkv = torch.stack([self.ln_q(q), self.ln_k(k), v], dim=2)  # (B, L, 3, nh, hs)
        return qkv


def attention(qkv):
    """Softmax attention over all L tokens of a packed qkv (B, L, 3, nh, hs) -> (B, L, D).

    SDPA takes (B, nh, L, hs); here q, k, v are strided views of the packed tensor, which it
    reads without copies, and it returns its output laid out as q is, (B, L, nh, hs) in
    memory, so going back to (B, L, D) is a view too."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, hs), views
    o = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hs)
    return o.transpose(1, 2).flatten(2)  # (B, L, D)


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block: Stability's key layout.

    adaLN chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    (+ shift_msa2, scale_msa2, gate_msa2 with dual attention); a "pre-only" stream
    (the text stream of the last block) has only (shift, scale), a qkv and nothing after.
    """

    def __init__(self, D, num_heads, mlp_hidden, qk_norm, pre_only=False, dual=False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.attn = Attention(D, num_heads, qk_norm, pre_only)
        if dual:
            self.attn2 = Attention(D, num_heads, qk_norm)
        if not pre_only:
            self.mlp = Mlp(D, mlp_hidden)
        self.n_mods = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, self.n_mods * D))

    def chunks(self, mod):
        # adaLN output (B, n_mods * D) -> n_mods tensors (B, 1, D)
        return mod.unsqueeze(1).chunk(self.n_mods, dim=-1)

    def post_attention(self, x, o, mods, x_norm):
        """Gated residual updates after the joint attention; x is the float32 residual stream."""
        dtype = self.attn.qkv.weight.dtype
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        # x + gate * attn, in float32 (addcmul promotes a bf16 branch output itself)
        x = torch.addcmul(x, gate_msa, self.attn.proj(o))
        if self.dual:  # SD3.5-medium: image-only self-attention on the same norm1 output
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            h2 = modulate(x_norm, shift_msa2, scale_msa2).to(dtype)
            x = torch.addcmul(x, gate_msa2, self.attn2.proj(attention(self.attn2.heads(h2))))
        h = modulate(layer_norm(x), shift_mlp, scale_mlp).to(dtype)
        return torch.addcmul(x, gate_mlp, self.mlp(h))


class JointBlock(nn.Module):
    def __init__(self, cfg, index):
        super().__init__()
        args = (cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden, cfg.qk_norm)
        self.context_block = StreamBlock(*args, pre_only=index == cfg.depth - 1)
        self.x_block = StreamBlock(*args, dual=index in cfg.dual_attention_layers)

    def forward(self, context, x, mod_c, mod_x):
        """context (B, Lc, D), x (B, Lx, D): float32 residual streams; mod_c, mod_x: the two
        streams' adaLN outputs (B, n_mods * D), float32 (MMDiT.adaln)."""
        cb, xb = self.context_block, self.x_block
        dtype = xb.attn.qkv.weight.dtype
        mc, mx = cb.chunks(mod_c), xb.chunks(mod_x)
        x_norm = layer_norm(x)
        qkv_c = cb.attn.heads(modulate(layer_norm(context), mc[0], mc[1]).to(dtype))  # (B, Lc, 3, nh, hs)
        qkv_x = xb.attn.heads(modulate(x_norm, mx[0], mx[1]).to(dtype))  # (B, Lx, 3, nh, hs)
        # Joint attention: one softmax over the text and image tokens together
        o = attention(torch.cat([qkv_c, qkv_x], dim=1))  # (B, Lc+Lx, D)
        Lc = context.shape[1]
        x = xb.post_attention(x, o[:, Lc:], mx, x_norm)
        context = None if cb.pre_only else cb.post_attention(context, o[:, :Lc], mc, None)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, D, patch_size, out_channels):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, patch_size * patch_size * out_channels)

    def forward(self, x, mod):
        shift, scale = mod.unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(layer_norm(x), shift, scale).to(self.linear.weight.dtype))


def sincos_pos_embed(D, M):
    """2D sin-cos table (1, M*M, D), rows then columns. Only initialises NEW models:
    a loaded checkpoint brings its own pos_embed table."""
    half = D // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2.0))
    grid = torch.arange(M, dtype=torch.float64)
    def one_axis(pos):  # (M*M,) -> (M*M, half)
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    emb = torch.cat([one_axis(cols.reshape(-1)), one_axis(rows.reshape(-1))], dim=1)  # (M*M, 2*half)
    return F.pad(emb, (0, D - emb.shape[1])).float()[None]  # (1, M*M, D)


class MMDiT(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = Embedder(cfg.frequency_dim, D)  # G
        self.y_embedder = Embedder(cfg.pooled_dim, D)  # F
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.register_buffer("pos_embed", sincos_pos_embed(D, cfg.pos_embed_max_size))
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation for a model trained from scratch (the toy world): xavier
        linears, adaLN-zero (every block starts as the identity), zero output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.t_embedder, self.y_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[1].weight)
                nn.init.zeros_(stream.adaLN_modulation[1].bias)
        for p in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def cropped_pos_embed(self, h, w):
        """The centre h x w of the stored M x M table, (1, h, w, D), a view."""
        M = self.config.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.view(1, M, M, -1)  # (1, M, M, D)
        return table[:, top:top + h, left:left + w]  # (1, h, w, D)

    def check_inputs(self, x, context, y, vec, adaln):
        cfg, p = self.config, self.config.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {p}")
        if max(H, W) // p > cfg.pos_embed_max_size:
            raise ValueError(f"latent size {H}x{W} is {H // p}x{W // p} patches, more than pos_embed_max_size "
                             f"{cfg.pos_embed_max_size} per side: the largest latent is "
                             f"{cfg.pos_embed_max_size * p} per side")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"context must be (B, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if adaln is not None:
            if len(adaln) != 2 * cfg.depth + 1:
                raise ValueError(f"adaln must be the {2 * cfg.depth + 1} tensors of MMDiT.adaln, got {len(adaln)}")
        elif vec is not None:
            if vec.ndim != 2 or vec.shape[-1] != cfg.hidden_size:
                raise ValueError(f"vec must be (B, {cfg.hidden_size}), got {tuple(vec.shape)}")
        elif y.ndim != 2 or y.shape[-1] != cfg.pooled_dim:
            raise ValueError(f"y must be (B, {cfg.pooled_dim}), got {tuple(y.shape)}")

    def adaln(self, c):
        """Every adaLN output of the network from the conditioning vector c (B, D), float32:
        [text stream, image stream] of each block in turn, then the final layer's, each
        (B, n_mods * D). They depend on c alone, not on x: computed here once per forward, SiLU(c)
        once for all of them (each adaLN_modulation is SiLU then Linear on the same c), and a
        sampler that knows c for every step can compute them for all its steps at once."""
        silu_c = F.silu(c.to(self.t_embedder.mlp[0].weight.dtype))  # (B, D)
        streams = [s for b in self.joint_blocks for s in (b.context_block, b.x_block)] + [self.final_layer]
        return [s.adaLN_modulation[1](silu_c).float() for s in streams]

    def forward(self, x, t, context, y, vec=None, adaln=None):
        """x (B, C, H, W) latent; t (B,) flow time in [0, 1]; context (B, L, Dc); y (B, Dy).
        vec (B, D), when given, replaces the conditioning vector c = G(psi(t)) + F(y).
        adaln, when given, is self.adaln(c) for this call's c, computed by the caller
        (then t, y and vec are not used). Returns the velocity (B, C_out, H, W) in x's dtype."""
        self.check_inputs(x, context, y, vec, adaln)
        B, _, H, W = x.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        if adaln is None:
            if vec is None:
                t = torch.as_tensor(t, device=x.device).reshape(-1)
                if t.numel() not in (1, B):
                    raise ValueError(f"t must be a scalar or (B,) = ({B},), got {t.numel()} values")
                t = t.expand(B)
                # Eq. 6: c = G(psi(t)) + F(y)
                vec = self.t_embedder(timestep_embedding(t, self.config.frequency_dim)) + self.y_embedder(y)  # (B, D)
            adaln = self.adaln(vec)
        # residual streams are kept in float32 whatever the weights' dtype
        xs = (self.x_embedder(x).float() + self.cropped_pos_embed(h, w).float()).flatten(1, 2)  # (B, L, D)
        ctx = self.context_embedder(context.to(self.context_embedder.weight.dtype)).float()  # (B, L, D)
        for i, block in enumerate(self.joint_blocks):
            mods = adaln[2 * i], adaln[2 * i + 1]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                ctx, xs = torch.utils.checkpoint.checkpoint(block, ctx, xs, *mods, use_reentrant=False)
            else:
                ctx, xs = block(ctx, xs, *mods)
        out = self.final_layer(xs, adaln[-1])  # (B, h*w, p*p*C)
        out = out.view(B, h, w, p, p, -1)  # (B, h, w, p, p, C)
        out = torch.einsum("bhwpqc->bchpwq", out).reshape(B, -1, h * p, w * p)  # (B, C, H, W)
        return out.to(x.dtype)


def compile_mmdit(model, **options):
    """torch.compile the MMDiT's joint blocks and final layer, in place: parameter names do not
    change (save_mmdit still writes Stability keys), blocks of the same structure share one
    compiled graph (so the compile time does not grow with depth), and the code that runs once
    per forward (embeddings, adaLN, unpatchify) stays eager. options go to torch.compile.
    The first forward of each new input shape compiles (about a minute on a CPU); on a CPU
    the inductor backend needs a C++ compiler. Returns the model."""
    for block in model.joint_blocks:
        block.compile(**options)
    model.final_layer.compile(**options)
    return model


# -----------------------------------------------------------------------------
# Loading and saving (the file formats themselves are sd3/checkpoint.py's)


def infer_config(shapes, num_heads=None):
    """Build an MMDiTConfig from Stability-named tensor shapes alone.

    The head count cannot be read off the shapes of a model without qk norm; then it is
    `num_heads` when known (file metadata, diffusers config.json), else hidden / 64, the
    rule of every published SD3 model."""
    required = ["x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight",
                "t_embedder.mlp.0.weight", "final_layer.linear.weight",
                "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.mlp.fc1.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise CheckpointError(f"missing keys: {checkpoint.listing(missing)}")
    D, C, p, _ = shapes["x_embedder.proj.weight"]
    MM = shapes["pos_embed"][1]
    M = math.isqrt(MM)
    if M * M != MM:
        raise CheckpointError(f"pos_embed has {MM} positions, not a square M*M table")
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks."))
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    if qk_norm:
        num_heads = D // shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0]
    elif num_heads is None:
        num_heads = max(1, D // 64)
    out = shapes["final_layer.linear.weight"][0]
    if out % (p * p):
        raise CheckpointError(f"final_layer.linear.weight has {out} rows, not a multiple of patch {p}x{p}")
    return MMDiTConfig(
        depth=depth, hidden_size=D, num_heads=num_heads, patch_size=p, in_channels=C, out_channels=out // (p * p),
        context_dim=shapes["context_embedder.weight"][1], pooled_dim=shapes["y_embedder.mlp.0.weight"][1],
        frequency_dim=shapes["t_embedder.mlp.0.weight"][1], pos_embed_max_size=M,
        mlp_ratio=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0] / D, qk_norm=qk_norm,
        dual_attention_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
    )


def _read_plan(path, stack):
    """The config inferred from a checkpoint's header, and where each tensor is (checkpoint.read_layout)."""
    where, sources, shapes, num_heads = checkpoint.read_layout(path, stack)
    try:
        cfg = infer_config(shapes, num_heads)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, where, sources, shapes


def read_config(path):
    """The MMDiTConfig of a checkpoint, from its header alone, after checking that every tensor the
    MMDiT needs is there with its shape (`_check_layout`): a file that would not load is refused here,
    before any command does heavy work with it."""
    with ExitStack() as stack:
        cfg, _, sources, shapes = _read_plan(path, stack)
        _check_layout(path, cfg, sources, shapes)
        return cfg


def _check_layout(path, cfg, sources, shapes):
    """Every tensor of the MMDiT of config `cfg` is in the file, with its shape, and nothing else is:
    (the model on the meta device, {name: expected shape}); else a CheckpointError naming the keys."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sources]
    unexpected = [k for k in sources if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the MMDiT inferred from it ({_describe(cfg)})\n"
                              f"  missing keys: {checkpoint.listing(missing) or 'none'}\n"
                              f"  unexpected keys: {checkpoint.listing(unexpected) or 'none'}")
    bad = [f"{k}: {shapes[k]} in the file, {expected[k]} expected" for k in expected if shapes[k] != expected[k]]
    if bad:
        raise CheckpointError(f"{path}: shapes that do not match the inferred config ({_describe(cfg)})\n  "
                              + "\n  ".join(bad[:20]))
    return model, expected


def _describe(cfg):
    return (f"depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, qk_norm {cfg.qk_norm}, "
            f"dual attention layers {list(cfg.dual_attention_layers)}")


def load_mmdit(path, device="cpu", dtype=torch.float32, compile=False):
    """Load an MMDiT from a Stability single file (with or without the
    `model.diffusion_model.` prefix; VAE and text-encoder tensors are never read), a
    diffusers transformer file or folder (sharded too), or a pipeline folder.

    Tensors are read one at a time (safetensors safe_open), so the memory cost is the
    MMDiT's own. Every shape is checked against the configuration inferred from the file.
    compile: torch.compile its blocks (`compile_mmdit`).
    """
    with ExitStack() as stack:
        cfg, where, sources, shapes = _read_plan(path, stack)
        model, expected = _check_layout(path, cfg, sources, shapes)
        state = {}
        for k in expected:
            t = checkpoint.read_tensor(where, sources, k, path)
            if not checkpoint.all_finite(t):
                raise CheckpointError(f"{path}: {k} holds non-finite values (NaN or inf): a diverged or corrupt "
                                      "checkpoint, which no command should use")
            state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(state, assign=True)
    return compile_mmdit(model.eval()) if compile else model.eval()


def load_mmdit_blend(base, finetuned, scale, device="cpu", dtype=torch.float32):
    """base + scale * (finetuned - base), one tensor at a time: W2SD's way of making a model pair
    from one fine-tune (samplers.py; its release: strong = +1.5, weak = -1.5, main = +0.8).

    base, finetuned: any two checkpoints load_mmdit reads (Stability or diffusers layout, also
    mixed) of the same MMDiT. Each tensor is read from both files, blended in float32 and stored
    in `dtype` before the next is read, so the memory cost is the returned model's own: building
    the pair from two SD3-medium files holds two models, never four."""
    with ExitStack() as stack:
        cfg, where, sources, shapes = _read_plan(base, stack)
        cfg_f, where_f, sources_f, shapes_f = _read_plan(finetuned, stack)
        if cfg != cfg_f:
            raise CheckpointError(f"{finetuned} is not a fine-tune of {base}: {_describe(cfg_f)} vs {_describe(cfg)}")
        model, _ = _check_layout(base, cfg, sources, shapes)
        _check_layout(finetuned, cfg_f, sources_f, shapes_f)
        state = {}
        for k in model.state_dict():
            b, f = (checkpoint.read_tensor(w, src, k, path) for w, src, path in ((where, sources, base),
                                                                                 (where_f, sources_f, finetuned)))
            if b.shape != f.shape:
                raise CheckpointError(f"{k}: {tuple(b.shape)} in {base} but {tuple(f.shape)} in {finetuned}")
            blended = b.float() + scale * (f.float() - b.float()) if b.is_floating_point() else b
            if not checkpoint.all_finite(blended):
                bad = base if not checkpoint.all_finite(b) else finetuned
                raise CheckpointError(f"{bad}: {k} holds non-finite values (NaN or inf), or the blend at scale "
                                      f"{scale:g} overflows: a diverged or corrupt checkpoint")
            state[k] = blended.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
            del b, f, blended
    model.load_state_dict(state, assign=True)
    return model.eval()


def save_mmdit(model, path, metadata=None):
    """Save in Stability's layout (keys under `model.diffusion_model.`), as safetensors,
    atomically. Any SD3 loader of Stability files reads it; so does load_mmdit.
    metadata: str -> str pairs stored beside the config."""
    return checkpoint.save_stability(model.state_dict(), path, checkpoint.metadata_with(asdict(model.config), metadata))


def save_mmdit_diffusers(model, folder, extra_config=None):
    """Save as a diffusers transformer folder (config.json + diffusion_pytorch_model.safetensors);
    extra_config: more config.json entries (the student's `txt_align_guidance`)."""
    return checkpoint.save_diffusers(model, folder, checkpoint.metadata_with(asdict(model.config), None), extra_config)


def check_values(path):
    """Read every tensor of a checkpoint, one at a time (the memory of the largest), and refuse one that
    holds NaN or inf, as load_mmdit would. Returns the number of tensors read."""
    with ExitStack() as stack:
        cfg, where, sources, shapes = _read_plan(path, stack)
        _, expected = _check_layout(path, cfg, sources, shapes)
        for k in expected:
            t = checkpoint.read_tensor(where, sources, k, path)
            if not checkpoint.all_finite(t):
                raise CheckpointError(f"{path}: {k} holds non-finite values (NaN or inf): a diverged or corrupt "
                                      "checkpoint, which no command should use")
            del t
        return len(expected)


def main(args):
    # the config is printed only for a checkpoint load_mmdit loads: every key, shape and value checked first
    cfg = read_config(args.path)
    check_values(args.path)
    with torch.device("meta"):
        n = sum(p.numel() for p in MMDiT(cfg).parameters())
    print(json.dumps(asdict(cfg), indent=2))
    print(f"parameters: {n / 1e9:.3f} B")


if __name__ == "__main__":
    from run import cli

    parser = cli.parser("Inspect an MMDiT checkpoint: print the config inferred from its tensors.")
    parser.add_argument("path", help="Stability .safetensors file, diffusers transformer folder or pipeline folder")
    cli.run(main, parser)
