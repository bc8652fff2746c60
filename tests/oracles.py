"""
Independent computations the tests compare the project's code with: every conditioning vector z of
the paper (Eq. 6, Eq. 7, the Table 3 ablations) built from an MMDiT's RAW weights, with psi from
diffusers' own Timesteps module (SD3's time_proj), never through embed.py or samplers.py.

    z = oracles.conditioning(model, "teefusion", t, y, y_null, w)      # (B, D)
"""

import torch
from diffusers.models.embeddings import Timesteps  # test oracle (requirements-test.txt)

RELEASED_SCALE = 1 / 256  # the release's factor on Eq. 7's fused term, written here, not imported


def mlp(seq, h):
    """Linear, SiLU, Linear from the raw weights of an nn.Sequential (G and F are this shape)."""
    a = h @ seq[0].weight.T + seq[0].bias
    return (a * torch.sigmoid(a)) @ seq[2].weight.T + seq[2].bias


def psi(s):
    """SD3's time_proj on 1000 s: diffusers' Timesteps(256, flip_sin_to_cos, shift 0)."""
    s = torch.as_tensor(s, dtype=torch.float32).reshape(-1)
    return Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(1000 * s)  # (B, 256)


def conditioning(model, method, t, y, y_null, w, scale=None, guidance_mlp=None):
    """z for the student input of `method`, each term from the paper's text:
        Eq. 6        c = G(psi(t)) + F(y)
        teefusion    c + G(psi(w)) * F(y - y_null) * scale        (Eq. 7; scale 1/256 as released)
        gonly        c + G(psi(w))                                 (Table 3's row as the paper writes it)
        gonly-scaled c + G(psi(w)) * scale                         (at Eq. 7's scale)
        distillcfg   c + guidance_mlp(psi(w))                      (a new MLP, its raw weights given)
        dice         c                                             (DICE changes the tokens, not z)
    t, w: floats or (B,) tensors; y (B, Dy); y_null (1 or B, Dy)."""
    B = y.shape[0]
    G, F = model.t_embedder.mlp, model.y_embedder.mlp
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(B)
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(B)
    c = mlp(G, psi(t)) + mlp(F, y)  # Eq. 6, (B, D)
    scale = RELEASED_SCALE if scale is None else scale
    if method == "teefusion":
        return c + mlp(G, psi(w)) * mlp(F, y - y_null) * scale
    if method == "gonly":
        return c + mlp(G, psi(w))
    if method == "gonly-scaled":
        return c + mlp(G, psi(w)) * scale
    if method == "distillcfg":
        return c + mlp(guidance_mlp, psi(w))
    if method == "dice":
        return c
    raise ValueError(method)
