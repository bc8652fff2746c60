"""
Tests for sd3/vae.py: the hand-written SD3 VAE against diffusers' AutoencoderKL (test-only
oracle) at a tiny SD3-shaped config, both checkpoint layouts, and the refusal of bad files.

    python -m pytest -q tests/sd3/test_vae.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd3 import vae as vae_module
from sd3.vae import VAEConfig, from_pil, from_uint8, load_image, load_vae, resize_center_crop, to_pil, to_uint8

from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

SCALE, SHIFT = 1.5305, 0.0609


def make_reference(config, seed=0):
    """The diffusers AutoencoderKL of a VAEConfig (conftest's tiny_vae_config: 4 levels, 16 latent
    channels), no quant convs. GroupNorm affines are randomised too, so that every parameter matters."""
    torch.manual_seed(seed)
    levels = len(config.block_out_channels)
    ref = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=SCALE, shift_factor=SHIFT, block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
    )
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return ref.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_vae_config):
    """(diffusers model, a pipeline-style folder holding vae/ written by save_pretrained)."""
    ref = make_reference(tiny_vae_config)
    root = tmp_path_factory.mktemp("pipeline")
    ref.save_pretrained(root / "vae")  # vae/config.json + vae/diffusion_pytorch_model.safetensors
    return ref, root


def test_diffusers_folder_matches_diffusers(reference, tiny_vae_config):
    ref, root = reference
    ours = load_vae(root)  # the pipeline folder: load_vae finds vae/
    assert ours.config == tiny_vae_config == VAEConfig(block_out_channels=[32, 32, 64, 64])
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training

    torch.manual_seed(1)
    z = torch.randn(2, 16, 6, 5)  # non-square: catches a transposed attention reshape
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        x_ref = ref.decode(z / SCALE + SHIFT).sample  # un-normalised, then decoded (docs/DESIGN.md, "The VAE")
        posterior = ref.encode(x).latent_dist
        mean_ref = (posterior.mean - SHIFT) * SCALE
        sample_ref = (posterior.sample(generator=torch.Generator().manual_seed(7)) - SHIFT) * SCALE

    err_decode = (ours.decode(z) - x_ref).abs().max().item()
    err_mean = (ours.encode(x) - mean_ref).abs().max().item()
    err_sample = (ours.encode(x, generator=torch.Generator().manual_seed(7)) - sample_ref).abs().max().item()
    print(f"\nvs diffusers: decode {err_decode:.2e}, encode mean {err_mean:.2e}, encode sample {err_sample:.2e}")
    assert x_ref.abs().max() > 0.1 and mean_ref.std() > 0.1  # the comparison is not between near-zeros
    assert err_decode < 1e-4 and err_mean < 1e-4 and err_sample < 1e-4


def test_stability_single_file_loads_the_same_weights(reference, tiny_vae_config, tmp_path, monkeypatch):
    ref, root = reference
    ours = load_vae(root)
    # A Stability single file: the VAE under first_stage_model.*, attention as 1x1 convs
    # (C, C, 1, 1), next to an MMDiT and a text encoder that the loader must not read.
    stability = {"first_stage_model." + k: v.clone() for k, v in ours.state_dict().items()}
    assert stability["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    others = {"model.diffusion_model.pos_embed": torch.randn(1, 16, 8),
              "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8)}

    # Oracle for the key names: diffusers' own Stability -> diffusers converter must turn our
    # names into a complete diffusers state dict equal to the reference weights.
    converted = convert_ldm_vae_checkpoint({**stability, **others}, dict(ref.config))
    fresh = make_reference(tiny_vae_config, seed=123)
    fresh.load_state_dict(converted, strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    path = tmp_path / "sd3_single_file.safetensors"
    save_file({**stability, **others}, str(path))
    read = []
    real_safe_open = vae_module.safe_open

    class RecordingSafeOpen:  # records which tensors the loader reads
        def __init__(self, *a, **kw):
            self.f = real_safe_open(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, k):
            read.append(k)
            return self.f.get_tensor(k)

    monkeypatch.setattr(vae_module, "safe_open", RecordingSafeOpen)
    from_file = load_vae(path)
    assert read and all(k.startswith("first_stage_model.") for k in read)  # MMDiT, text encoders unread
    assert from_file.config == ours.config
    assert from_file.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(from_file.state_dict()[k], v), k

    # The VAE-only layout (no prefix) with the attention stored as Linear (C, C) loads too.
    bare = {k: (v[:, :, 0, 0] if "attn_1" in k and v.ndim == 4 else v) for k, v in ours.state_dict().items()}
    save_file(bare, str(tmp_path / "vae_only.safetensors"))
    for k, v in load_vae(tmp_path / "vae_only.safetensors").state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_bfloat16_no_worse_than_diffusers_bfloat16(reference, tiny_vae_config):
    """bf16 rounding through ~30 layers of random weights costs a few percent; the bound is
    diffusers' own bf16 error on the same model and inputs."""
    ref, root = reference
    ours32, ours16 = load_vae(root), load_vae(root, dtype=torch.bfloat16)
    ref16 = make_reference(tiny_vae_config).to(torch.bfloat16)
    assert ours16.dtype == torch.bfloat16
    torch.manual_seed(2)
    z = torch.randn(2, 16, 4, 4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x32, x16 = ours32.decode(z), ours16.decode(z)
    m32, m16 = ours32.encode(x), ours16.encode(x)
    assert x16.dtype == m16.dtype == torch.float32  # outputs are float32 whatever the compute dtype
    with torch.no_grad():
        x16_ref = ref16.decode((z / SCALE + SHIFT).bfloat16()).sample.float()
        m16_ref = (ref16.encode(x.bfloat16()).latent_dist.mean.float() - SHIFT) * SCALE

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print(f"\nbf16 vs fp32 relative error: decode {rel(x16, x32):.2e} (diffusers {rel(x16_ref, x32):.2e}), "
          f"encode {rel(m16, m32):.2e} (diffusers {rel(m16_ref, m32):.2e})")
    assert rel(x16, x32) < 1.5 * rel(x16_ref, x32) and rel(m16, m32) < 1.5 * rel(m16_ref, m32)
    assert rel(x16, x32) < 0.1 and rel(m16, m32) < 0.1


def test_chunking_does_not_change_results(reference):
    _, root = reference
    ours = load_vae(root)
    torch.manual_seed(3)
    z = torch.randn(5, 16, 4, 4)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    assert torch.allclose(ours.decode(z, chunk_size=2), ours.decode(z, chunk_size=5), atol=1e-5)
    a = ours.encode(x, generator=torch.Generator().manual_seed(0), chunk_size=1)
    b = ours.encode(x, generator=torch.Generator().manual_seed(0), chunk_size=4)
    assert torch.allclose(a, b, atol=1e-5)  # the noise is drawn for the whole batch at once
    with pytest.raises(ValueError, match="multiple of 8"):
        ours.encode(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 4, 4, 4))


def test_config_json_overrides_scale_and_shift(reference, tmp_path):
    ref, _ = reference
    ref.save_pretrained(tmp_path / "vae")
    config_file = tmp_path / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(scaling_factor=0.5, shift_factor=0.25)  # e.g. a FLUX-style VAE of the same shape
    config_file.write_text(json.dumps(config))
    ours = load_vae(tmp_path / "vae")
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.5, 0.25)


def test_refuses_bad_files(reference, tmp_path):
    _, root = reference
    good = load_vae(root).state_dict()

    for name in ("vae.ckpt", "vae.pt", "vae.bin", "vae.pth"):
        (tmp_path / name).write_bytes(b"\x80\x02}q\x00.")
        with pytest.raises(ValueError, match=f"{name}.*pickle"):
            load_vae(tmp_path / name)
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, disguised)  # a zip, whatever its name
    with pytest.raises(ValueError, match="disguised.safetensors.*pickle"):
        load_vae(disguised)

    # A valid file whose first byte is 0x80 (its header length is 128 mod 256) is not a pickle.
    x80 = tmp_path / "x80.safetensors"
    save_file(good, str(x80), metadata={"pad": ""})
    header_length = int.from_bytes(x80.read_bytes()[:8], "little")  # a multiple of 8
    save_file(good, str(x80), metadata={"pad": "x" * ((128 - header_length) % 256)})
    assert (tmp_path / "x80.safetensors").read_bytes()[:1] == b"\x80"
    assert load_vae(tmp_path / "x80.safetensors").config.block_out_channels == [32, 32, 64, 64]

    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable safetensors"):
        load_vae(tmp_path / "garbage.safetensors")
    save_file(good, str(tmp_path / "whole.safetensors"))
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors is not a readable safetensors"):
        load_vae(tmp_path / "truncated.safetensors")

    save_file({"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)}, str(tmp_path / "mmdit_only.safetensors"))
    with pytest.raises(ValueError, match="mmdit_only.safetensors: no VAE weights"):
        load_vae(tmp_path / "mmdit_only.safetensors")

    missing = {k: v for k, v in good.items() if k != "decoder.up.2.block.1.conv2.bias"}
    missing["decoder.quant_conv.weight"] = torch.zeros(1)
    save_file(missing, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)partial.safetensors.*missing: decoder\.up\.2\.block\.1\.conv2\.bias"
                                         r".*unexpected: decoder\.quant_conv\.weight"):
        load_vae(tmp_path / "partial.safetensors")

    with pytest.raises(ValueError, match="float16"):
        load_vae(root, dtype=torch.float16)
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        load_vae(tmp_path / "no_such_vae.safetensors")
    (tmp_path / "pickled_folder").mkdir()
    (tmp_path / "pickled_folder" / "diffusion_pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="pickled_folder.*only pickle files"):
        load_vae(tmp_path / "pickled_folder")


def test_uint8_and_pil_helpers():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5, 1 / 255]).view(1, 1, 2, 3).expand(2, 3, 2, 3)
    u = to_uint8(x)
    assert u.shape == (2, 2, 3, 3) and u.dtype == torch.uint8
    assert u[0, :, :, 0].flatten().tolist() == [0, 0, 128, 255, 255, 128]  # clamp((x+1)/2, 0, 1) * 255, rounded
    every = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3)
    assert from_uint8(every).min() == -1 and from_uint8(every).max() == 1
    assert torch.equal(to_uint8(from_uint8(every)), every)  # exact round trip for all 256 levels
    pil = to_pil(from_uint8(every))
    assert len(pil) == 1 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    assert torch.equal(to_uint8(from_pil(pil)), every)
    with pytest.raises(ValueError, match="different sizes"):
        from_pil([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 8))])


def test_load_image_resize_crop_rotation_alpha(tmp_path):
    # Three vertical bands: a centre crop of the 60x20 image keeps only the middle (green) one.
    bands = np.zeros((20, 60, 3), np.uint8)
    bands[:, :20, 0] = bands[:, 20:40, 1] = bands[:, 40:, 2] = 255
    crop = np.asarray(resize_center_crop(Image.fromarray(bands), 16))
    assert crop.shape == (16, 16, 3) and (crop[..., 1] > 200).all() and (crop[..., [0, 2]] < 60).all()

    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: stored sideways, shown rotated by 90 degrees
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)

    rgba = Image.new("RGBA", (32, 24), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "transparent.png")
    image = load_image(tmp_path / "transparent.png", size=16)
    assert image.mode == "RGB" and image.size == (16, 16) and np.asarray(image).min() == 255  # over white


@pytest.mark.parametrize("case", ["not-an-image", "out-extension", "no-vae"])
def test_command_line_refuses_bad_input_before_loading(tmp_path, case):
    """python -m sd3.vae: one `error:` line naming the argument, exit 2, before the VAE loads (nothing
    printed on stdout) and before any work whose result could not be written."""
    vae_file, image, out = tmp_path / "vae.safetensors", tmp_path / "photo.png", tmp_path / "roundtrip.png"
    vae_file.write_bytes(b"never read")
    Image.new("RGB", (16, 16)).save(image)
    if case == "not-an-image":
        image = tmp_path / "notes.png"
        image.write_text("not a picture")
        names = [f"--image {image} cannot be read as an image"]
    elif case == "out-extension":
        out, names = tmp_path / "roundtrip.xyz", ["--out", "roundtrip.xyz: not an image file name"]
    else:
        vae_file, names = tmp_path / "missing.safetensors", [f"--vae {tmp_path / 'missing.safetensors'}: no such"]
    r = subprocess.run([sys.executable, "-m", "sd3.vae", "--vae", str(vae_file), "--image", str(image), "--out", str(out),
                        "--size", "16", "--device", "cpu"], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(name in lines[0] for name in names), lines[0]
    assert r.stdout == "" and not out.exists()
