"""
GPU memory of `python generate.py` on SD3-medium, ESTIMATED (no GPU was at hand to measure it):
parameter counts (the models built on the meta device from SD3-medium's configurations) x bytes per
parameter, plus the largest activations alive at once, from the tensor shapes, per phase of generate.py:

    phase 1  the text encoders (CLIP-L, CLIP-G, T5-XXL) encode the prompts, ENCODE_CHUNK at a time,
             then are freed
    phase 2  the MMDiT(s) sample (CFG: 2 rows per image) and the VAE decodes

    python benchmarks/memory_generate.py                        # 1024 px, bf16, cfg, batch 1
    python benchmarks/memory_generate.py --method w2sd --w2sd-main --res 1024

Not counted: the CUDA context (a few hundred MB outside PyTorch's allocator) and allocator slack.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level modules
from run import cli  # noqa: E402
import generate  # noqa: E402
import mmdit  # noqa: E402
from sd3 import vae  # noqa: E402

GB = 1e9


def count(build):
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def text_encoders():
    """Parameters of SD3's three text encoders (their diffusers config.json values)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = dict(vocab_size=49408, max_position_embeddings=77)
    return {
        "CLIP-L": count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            projection_dim=768, hidden_act="quick_gelu", **clip))),
        "CLIP-G": count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu", **clip))),
        "T5-XXL": count(lambda: T5EncoderModel(T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu"))),
    }


def main(args):
    cfg = mmdit.CONFIGS["sd3-medium"]
    side = 8 * cfg.patch_size  # pixels per patch
    if args.res < side or args.res % side or args.res > side * cfg.pos_embed_max_size:
        raise cli.InputError(f"--res {args.res}: must be a positive multiple of {side} and at most "
                             f"{side * cfg.pos_embed_max_size} (SD3-medium's position table holds "
                             f"{cfg.pos_embed_max_size} x {cfg.pos_embed_max_size} patches of {side} px)")
    cli.at_least(args.batch, 1, "--batch")
    b = 2 if args.dtype in ("bf16", "fp16") else 4  # bytes per weight and activation
    n_text = text_encoders()
    n_mmdit = count(lambda: mmdit.MMDiT(cfg))
    n_vae = count(lambda: vae.VAE(vae.VAEConfig()))
    # phase 1: the largest activations are T5's, per chunk of prompts: attention scores (fp32 softmax)
    # and the gated feed-forward's two hidden tensors
    P, L_t5 = generate.ENCODE_CHUNK, 256
    act_text = P * 64 * L_t5 ** 2 * 4 + 2 * P * L_t5 * 10240 * b
    # phase 2, one joint block at a time (inference frees each block's tensors): both residual streams
    # in fp32 (input and output), qkv, the attention output, the MLP's hidden tensor before and after GELU;
    # attention itself by SDPA's fused kernels (no L x L scores)
    rows = args.batch * (1 if args.method in ("euler", "student") else 2)
    Lx, D = (args.res // 16) ** 2, cfg.hidden_size
    L = Lx + 77 + 256
    act_mmdit = rows * (2 * L * D * 4 + L * 3 * D * b + L * D * b + 2 * Lx * 4 * D * b)
    # the VAE decoder at full resolution: about four 256-channel tensors alive at once (the last upsample's
    # input and output, the first resnet's normalised input and its conv output), one image at a time
    act_vae = 4 * 256 * args.res ** 2 * b
    models = 1 + (args.method == "w2sd") + (args.method == "w2sd" and args.w2sd_main)
    weights_text = sum(n_text.values()) * b
    weights_2 = models * n_mmdit * b + n_vae * (4 if args.dtype == "fp16" else b)
    print(f"SD3-medium, {args.res} x {args.res}, {args.dtype}, --method {args.method}, batch {args.batch} "
          f"({rows} rows per MMDiT forward), ESTIMATE")
    print("parameters: " + ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in n_text.items())
          + f", MMDiT {n_mmdit / 1e9:.3f} B, VAE {n_vae / 1e6:.1f} M")
    print(f"phase 1, text encoders ({sum(n_text.values()) / 1e9:.2f} B parameters): weights "
          f"{weights_text / GB:.2f} GB + activations {act_text / GB:.2f} GB "
          f"= {(weights_text + act_text) / GB:.1f} GB")
    print(f"phase 2, {models} MMDiT + VAE: weights {weights_2 / GB:.2f} GB + MMDiT activations "
          f"{act_mmdit / GB:.2f} GB + VAE decode {act_vae / GB:.2f} GB = "
          f"{(weights_2 + max(act_mmdit, act_vae)) / GB:.1f} GB (sampling and decoding take turns)")
    peak = max(weights_text + act_text, weights_2 + max(act_mmdit, act_vae))
    print(f"peak: {peak / GB:.1f} GB; without freeing the text encoders it would be "
          f"{(weights_text + weights_2 + max(act_mmdit, act_vae)) / GB:.1f} GB")


if __name__ == "__main__":
    parser = cli.parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--method", choices=("euler", "cfg", "zsampling", "w2sd", "student"), default="cfg")
    parser.add_argument("--w2sd-main", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    cli.run(main, parser)
