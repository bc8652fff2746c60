"""
evaluation/metrics.py and evaluation/fid.py: each metric's preprocessing against an independent computation written here
from its reference's definition (and transformers' CLIPImageProcessor as an oracle for the
"transformers" convention), on non-square images of sizes other than the network's; each score
through tiny random networks against its formula; FID closed forms; DPG-Bench on a stub VQA.

    python -m pytest -q tests/evaluation/test_metrics.py
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file

from evaluation import fid
from evaluation import dpg
from evaluation import metrics

PROMPTS = ["a red cat", "the blue dog on the grass", "photo of a cat", "a dog"]
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as ImageReward.py and hpsv2 type them
STD = (0.26862954, 0.26130258, 0.27577711)
SIZES = [(35, 61), (83, 35), (47, 100), (40, 32), (32, 45), (20, 40)]  # (H, W); the networks take 32 x 32


def images(B, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def saved_png(x):
    """What a PNG written from x in [-1, 1] holds: uint8 round(255 clamp((x + 1) / 2, 0, 1)), as PIL."""
    u8 = (((x + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in u8]


def random_pil(H, W, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def normalized(x01):
    return (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def ref_shortest(image, S):
    """torchvision Resize(S, BICUBIC) on a PIL image (= transformers' shortest_edge): PIL bicubic,
    the shorter side to S, the longer to int(S * long / short); untouched if the shorter is S."""
    w, h = image.size
    if min(w, h) == S:
        return image
    return image.resize((S, int(S * h / w)) if w <= h else (int(S * w / h), S), Image.BICUBIC)


def ref_crop(image, S, top, left):
    """(3, S, S) in [0, 1]: ToTensor (uint8 / 255) of the S x S window at (top, left)."""
    a = np.asarray(image, dtype=np.float32)[top:top + S, left:left + S] / 255  # (S, S, 3)
    return torch.from_numpy(a).permute(2, 0, 1)


def ref_openai(image, S):
    """OpenAI CLIP's _transform: Resize(S, BICUBIC), CenterCrop(S) (top = int(round((h - S) / 2.))), ToTensor."""
    r = ref_shortest(image, S)
    return ref_crop(r, S, int(round((r.height - S) / 2.0)), int(round((r.width - S) / 2.0)))


def ref_transformers(image, S):
    """CLIPImageProcessor: the same resize, centre crop with top = (h - S) // 2, rescale 1 / 255."""
    r = ref_shortest(image, S)
    return ref_crop(r, S, (r.height - S) // 2, (r.width - S) // 2)


def ref_hps(image, S):
    """hpsv2's val transform: ToTensor, ResizeMaxSize(S) (new side round(side * S / longest), torchvision
    F.resize of a tensor = bicubic interpolate with antialias, skipped at scale 1), pad
    [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2] with 0."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # (1, 3, H, W)
    H, W = x.shape[-2:]
    scale = S / float(max(H, W))
    if scale != 1.0:
        x = F.interpolate(x, size=(round(H * scale), round(W * scale)), mode="bicubic", align_corners=False,
                          antialias=True)
    canvas = torch.zeros(3, S, S)
    top, left = (S - x.shape[-2]) // 2, (S - x.shape[-1]) // 2
    canvas[:, top:top + x.shape[-2], left:left + x.shape[-1]] = x[0]
    return canvas


def clip_image_processor(S):
    """transformers' CLIPImageProcessor with the PIL backend (the one torchmetrics and PickScore ran)."""
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": S}, crop_size={"height": S, "width": S})


def reference_cos(model, tokenizer, pixels, prompts):
    """cos(image, text) from CLIPModel.forward's logits_per_image / logit_scale.exp() (an independent path)."""
    tok = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_tensor_images_are_rounded_as_saved_png():
    x = images(2, 9, 7)
    x[0, 0, 0, 0], x[1, 2, 3, 4] = -1.7, 1.2  # out of range: clamped as the PNG is
    got = metrics.to_pil_images(x)
    for a, b in zip(got, saved_png(x)):
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    gray = Image.new("L", (5, 4), 77)  # PIL images of any mode become RGB
    assert np.asarray(metrics.to_pil_images(gray)[0]).tolist() == [[[77] * 3] * 5] * 4
    with pytest.raises(ValueError, match="expected images"):
        metrics.to_pil_images(torch.zeros(2, 4, 8, 8))


@pytest.mark.parametrize("S", [32, 224])
def test_transformers_preprocessing_is_clip_image_processor(S):
    processor = clip_image_processor(S)
    k = S // 32
    for i, (H, W) in enumerate(SIZES):
        image = random_pil(H * k + i, W * k, seed=i)  # non-square, not S, h - S of every residue mod 4
        ours = metrics.preprocess_transformers(image, S)
        torch.testing.assert_close(ours, ref_transformers(image, S), atol=1e-7, rtol=0)
        oracle = torch.as_tensor(processor(images=[image], return_tensors="pt")["pixel_values"])  # (1, 3, S, S)
        torch.testing.assert_close(metrics.pixel_values([image], "transformers", S), oracle, atol=1e-6, rtol=0)


def test_openai_preprocessing_is_torchvision_resize_and_centre_crop():
    for i, (H, W) in enumerate(SIZES):
        image = random_pil(H, W, seed=10 + i)
        torch.testing.assert_close(metrics.preprocess_openai(image, 32), ref_openai(image, 32), atol=1e-7, rtol=0)
    # 35 x 61 -> 32 x 55: 23 columns to crop; torchvision starts at round(11.5) = 12, transformers at 11
    image = random_pil(35, 61)
    assert metrics.resize_shortest(image, 32).size == (55, 32)
    torch.testing.assert_close(metrics.preprocess_openai(image, 32)[..., :-1],
                               metrics.preprocess_transformers(image, 32)[..., 1:], atol=0, rtol=0)
    assert not torch.equal(metrics.preprocess_openai(image, 32), metrics.preprocess_transformers(image, 32))
    # the resize is PIL's bicubic on uint8 values, not torch's on floats
    r = np.asarray(metrics.resize_shortest(image, 32), dtype=np.float32) / 255
    t = F.interpolate(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None],
                      size=(32, 55), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
    assert np.abs(r - t).max() > 1e-2


def test_hps_preprocessing_resizes_the_float_tensor_and_pads():
    for i, (H, W) in enumerate(SIZES):
        image = random_pil(H, W, seed=20 + i)
        torch.testing.assert_close(metrics.preprocess_hps(image, 32), ref_hps(image, 32), atol=1e-7, rtol=0)
    # wide 20 x 40 -> 16 x 32, 8 black rows above and below (black = 0 before normalisation)
    x = metrics.preprocess_hps(random_pil(20, 40), 32)
    assert x[:, :8].abs().max() == 0 and x[:, 24:].abs().max() == 0 and x[:, 8:24].abs().min() > 0
    # odd padding: 40 x 23 -> 32 x 18 (round(18.4)), 14 columns: 7 left, 7 right; 40 x 25 -> 32 x 20: 6, 6
    x = metrics.preprocess_hps(random_pil(40, 23), 32)
    assert x[:, :, :7].abs().max() == 0 and x[:, :, 25:].abs().max() == 0 and x[:, :, 7].abs().min() > 0
    x = metrics.preprocess_hps(random_pil(33, 40), 32)  # 33 x 40 -> round(26.4) = 26 x 32: 3 above, 3 below
    assert x[:, :3].abs().max() == 0 and x[:, 29:].abs().max() == 0 and x[:, 3].abs().min() > 0
    # longest side already 32: no resize (the reference skips it), only the pad
    image = random_pil(32, 21)
    torch.testing.assert_close(metrics.preprocess_hps(image, 32)[:, :, 5:26], ref_crop(image, 32, 0, 0)[:, :, :21])
    black = normalized(torch.zeros(1, 3, 1, 1)).view(3)
    torch.testing.assert_close(metrics.pixel_values([random_pil(20, 40)], "hps", 32)[0, :, 0, 0], black)
    with pytest.raises(ValueError, match="preprocess"):
        metrics.pixel_values([image], "bilinear", 32)


def test_clip_score_pickscore_and_clip_dice_through_the_network(clip_parts):
    model, tok = clip_parts
    x = images(4, 35, 61)  # 35 x 61: the two centre crops differ by one column
    pil = saved_png(x)
    pix_tf = torch.as_tensor(clip_image_processor(32)(images=pil, return_tensors="pt")["pixel_values"])
    pix_oa = normalized(torch.stack([ref_openai(im, 32) for im in pil]))
    cos_tf, cos_oa = reference_cos(model, tok, pix_tf, PROMPTS), reference_cos(model, tok, pix_oa, PROMPTS)
    clip = metrics.CLIP(model, tok, "transformers")
    clip_s, clip_mean = metrics.clip_type_score(clip, x, PROMPTS, "clip")
    pick_s, _ = metrics.clip_type_score(clip, x, PROMPTS, "pickscore")
    dice_s, dice_mean = metrics.clip_type_score(metrics.CLIP(model, tok, "openai"), x, PROMPTS, "clip-dice")
    torch.testing.assert_close(clip_s, 100 * cos_tf, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pick_s, math.exp(3.0) * cos_tf, atol=1e-4, rtol=1e-5)  # the learned scale
    torch.testing.assert_close(dice_s, cos_oa, atol=1e-6, rtol=1e-5)
    assert clip_mean == pytest.approx(max(100 * cos_tf.double().mean().item(), 0.0), abs=1e-4)
    assert dice_mean == pytest.approx(cos_oa.double().mean().item(), abs=1e-6)
    assert (cos_tf - cos_oa).abs().max() > 1e-5  # the crop convention reaches the score
    # torchmetrics clamps the MEAN (not each score) at 0; the other presets do not clamp
    assert metrics.aggregate(torch.tensor([-5.0, 1.0]), "clip") == 0.0
    assert metrics.aggregate(torch.tensor([-5.0, 4.0]), "clip") == 0.0
    assert metrics.aggregate(torch.tensor([-5.0, 7.0]), "clip") == pytest.approx(1.0)
    assert metrics.aggregate(torch.tensor([-5.0, 1.0]), "pickscore") == pytest.approx(-2.0)
    # PIL images give exactly the scores of the tensor they were saved from
    torch.testing.assert_close(metrics.clip_type_score(clip, pil, PROMPTS, "clip")[0], clip_s, atol=0, rtol=0)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        metrics.clip_type_score(clip, x, PROMPTS[:3], "clip")


def test_hps_score(clip_parts):
    model, tok = clip_parts
    clip = metrics.CLIP(model, tok, "hps")
    x = images(3, 20, 40)  # wide: longest side 40 -> 32, height 20 -> 16, pad 8 above and below
    pixels = normalized(torch.stack([ref_hps(im, 32) for im in saved_png(x)]))
    scores, mean = metrics.clip_type_score(clip, x, PROMPTS[:3], "hps")
    cos = reference_cos(model, tok, pixels, PROMPTS[:3])
    torch.testing.assert_close(scores, 100 * cos, atol=1e-4, rtol=1e-5)  # no logit scale
    assert mean == pytest.approx(100 * cos.double().mean().item(), abs=1e-4)
    with pytest.raises(ValueError, match="preprocess"):
        metrics.clip_type_score(clip, x, PROMPTS[:3], "clip")


def test_load_clip_folder_and_errors(clip_parts, clip_folder, tmp_path):
    model, tok = clip_parts
    clip = metrics.load_clip(clip_folder, "transformers")
    x = images(2, 32, 32)
    ref = metrics.CLIP(model, tok, "transformers")
    torch.testing.assert_close(clip.cosine(x, PROMPTS[:2]), ref.cosine(x, PROMPTS[:2]))
    with pytest.raises(FileNotFoundError, match="nowhere.*not a folder"):
        metrics.load_clip(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        metrics.load_clip(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")  # a config, but no weights
    with pytest.raises(ValueError, match="empty.*not a readable transformers CLIPModel folder"):
        metrics.load_clip(str(tmp_path / "empty"))


def aesthetic_state(dim, seed=3):
    torch.manual_seed(seed)
    state = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((dim, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in) / math.sqrt(n_in)
        state[f"layers.{i}.bias"] = torch.randn(n_out) * 0.1
    return state


def mlp_reference(state, h):
    for i in (0, 2, 4, 6, 7):  # no activations between the layers
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return h.squeeze(-1)


def test_aesthetic_is_mlp_on_normalised_embedding(clip_parts, tmp_path):
    model, tok = clip_parts
    clip = metrics.CLIP(model, tok, "openai")
    state = aesthetic_state(8)
    path = str(tmp_path / "aesthetic.safetensors")
    save_file(state, path)
    mlp = metrics.load_aesthetic(path)
    x = images(3, 48, 37)
    pixels = normalized(torch.stack([ref_openai(im, 32) for im in saved_png(x)]))  # clip.load's preprocess
    with torch.no_grad():
        e = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        ref = mlp_reference(state, e / e.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(metrics.aesthetic_score(clip, mlp, x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="openai"):
        metrics.aesthetic_score(metrics.CLIP(model, tok, "hps"), mlp, x)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        metrics.load_aesthetic(str(tmp_path / "missing.safetensors"))
    (tmp_path / "a.pth").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="safetensors"):
        metrics.load_aesthetic(str(tmp_path / "a.pth"))


def test_load_scorer_by_name_and_check_weights(clip_parts, clip_folder, tmp_path):
    model, tok = clip_parts
    x = images(2, 40, 29)
    for metric in ("clip", "clip-dice", "pickscore", "hps"):
        want = metrics.clip_type_score(metrics.CLIP(model, tok, metrics.PRESETS[metric].preprocess), x,
                                       PROMPTS[:2], metric)[0]
        got = metrics.load_scorer(metric, clip=clip_folder)(x, PROMPTS[:2])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    path = str(tmp_path / "aesthetic.safetensors")
    save_file(aesthetic_state(8), path)
    want = metrics.aesthetic_score(metrics.CLIP(model, tok, "openai"), metrics.load_aesthetic(path), x)
    torch.testing.assert_close(metrics.load_scorer("aesthetic", clip=clip_folder, aesthetic=path)(x), want)
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        metrics.check_weights("fid", clip=clip_folder)
    with pytest.raises(FileNotFoundError, match="--clip.*nowhere"):
        metrics.check_weights("hps", clip=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="aesthetic needs"):
        metrics.check_weights("aesthetic", clip=clip_folder)
    with pytest.raises(FileNotFoundError, match="--aesthetic.*mlp.safetensors"):
        metrics.check_weights("aesthetic", clip=clip_folder, aesthetic=str(tmp_path / "mlp.safetensors"))
    with pytest.raises(ValueError, match="imagereward needs"):
        metrics.check_weights("imagereward", clip=clip_folder)
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        metrics.check_weights("imagereward", clip=clip_folder, imagereward=str(tmp_path / "ImageReward.pt"))


def test_frechet_distance_closed_forms(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    S = A @ A.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert abs(fid.frechet_distance(mu, S, mu, S)) < 1e-9  # identical statistics
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu2 = rng.normal(size=6)
    closed = ((mu - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # diagonal covariances
    assert fid.frechet_distance(mu, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    # full covariances: tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)) (the eigenvalues of S1 S2 are real, >= 0)
    B = rng.normal(size=(6, 6))
    S2 = B @ B.T + 0.1 * np.eye(6)
    tr = np.sqrt(np.linalg.eigvals(S @ S2).real.clip(0)).sum()
    ref = ((mu - mu2) ** 2).sum() + np.trace(S) + np.trace(S2) - 2 * tr
    assert fid.frechet_distance(mu, S, mu2, S2) == pytest.approx(ref, rel=1e-10)
    # statistics: float64 mean and unbiased covariance; .npz round trip; fid() end to end
    feats = rng.normal(size=(50, 6))
    m, s = fid.feature_statistics(feats)
    np.testing.assert_allclose(s, (feats - feats.mean(0)).T @ (feats - feats.mean(0)) / 49, rtol=1e-12)
    path = str(tmp_path / "ref.npz")
    fid.save_statistics(path, m, s)
    got = fid.fid(lambda x: x, [torch.from_numpy(feats[:20]), torch.from_numpy(feats[20:])], path)
    assert abs(got) < 1e-8
    np.savez(tmp_path / "bad.npz", mu=m)
    with pytest.raises(KeyError, match="sigma"):
        fid.load_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="none.npz.*'mu' and 'sigma'"):
        fid.load_statistics(str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu, S, mu[:3], S[:3, :3])


DPG_CSV = """item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,proposition,question
p1,a red cat,,1,0,entity,whole,,,is there a cat?
p1,a red cat,,2,1,attribute,color,,,is the cat red?
p1,a red cat,,3,2,attribute,color,,,is the red cat shiny?
p2,a dog,,1,0,entity,whole,,,is there a dog?
p2,a dog,,2,1,relation,spatial,,,is the dog on grass?
"""


def test_dpg_bench_with_stub_vqa(tmp_path):
    csv_path = tmp_path / "dpg_bench.csv"
    csv_path.write_text(DPG_CSV)
    # tiles of a 2 x 2 grid (tile 4 px): the red channel of each tile says which tile the VQA sees
    def grid(values):
        im = Image.new("RGB", (8, 8))
        for k, v in enumerate(values):
            im.paste((v, 0, 0), ((k % 2) * 4, (k // 2) * 4, (k % 2) * 4 + 4, (k // 2) * 4 + 4))
        return im

    answers = {  # (tile id, question) -> answer; tile id from the red value
        0: {"is there a cat?": "yes", "is the cat red?": "yes", "is the red cat shiny?": "yes"},  # 3/3
        1: {"is there a cat?": "no", "is the cat red?": "yes", "is the red cat shiny?": "yes"},  # zeroed: 0/3
        2: {"is there a cat?": "yes", "is the cat red?": "no", "is the red cat shiny?": "Yes"},  # chain: 1/3
        3: {"is there a cat?": " Yes ", "is the cat red?": "yes", "is the red cat shiny?": "no"},  # 2/3
        10: {"is there a dog?": "yes", "is the dog on grass?": "yes"},  # 2/2
        11: {"is there a dog?": "no", "is the dog on grass?": "yes"},  # 0/2
        12: {"is there a dog?": "yes", "is the dog on grass?": "no"},  # 1/2
        13: {"is there a dog?": "yes", "is the dog on grass?": "yes"},  # 2/2
    }

    def vqa(image, question):
        return answers[image.getpixel((0, 0))[0]][question]

    images = {"p1": grid([0, 1, 2, 3]), "p2": grid([10, 11, 12, 13])}
    out = dpg.dpg_bench(images, str(csv_path), vqa, tile=4)
    p1 = 100 * (3 / 3 + 0 / 3 + 1 / 3 + 2 / 3) / 4
    p2 = 100 * (2 / 2 + 0 / 2 + 1 / 2 + 2 / 2) / 4
    assert out["per_prompt"] == pytest.approx({"p1": p1, "p2": p2})
    assert out["overall"] == pytest.approx((p1 + p2) / 2)
    # entity: p1 q1 yes on tiles 0,2,3; p2 q1 yes on 10,12,13 -> 6 / 8
    # attribute: p1 q2 on tiles 0,3 (tile 1 zeroed); q3 on tile 0 only (tile 2 chain-zeroed) -> 3 / 8
    # relation: p2 q2 on tiles 10, 13 (11 zeroed) -> 2 / 4
    assert out["categories"] == pytest.approx({"entity": 75.0, "attribute": 37.5, "relation": 50.0})
    # a folder of <item_id>.png works the same; a missing image names its path
    for k, im in images.items():
        im.save(tmp_path / f"{k}.png")
    assert dpg.dpg_bench(str(tmp_path), str(csv_path), vqa, tile=4)["overall"] == pytest.approx(out["overall"])
    os.remove(tmp_path / "p2.png")
    with pytest.raises(FileNotFoundError, match="p2.png"):
        dpg.dpg_bench(str(tmp_path), str(csv_path), vqa, tile=4)
    with pytest.raises(FileNotFoundError, match="dpg_bench.csv"):
        dpg.load_dpg_questions(str(tmp_path / "nope" / "dpg_bench.csv"))
    with pytest.raises(ValueError, match="not a grid"):
        dpg.split_tiles(Image.new("RGB", (6, 8)), 4)




def test_tf_resize_bilinear_closed_form():
    # TF legacy resize: output i samples input i * in / out (no half-pixel shift), clamped at the edge
    x = torch.tensor([0.0, 10.0, 20.0]).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    got = fid.tf_resize_bilinear(x, 6)  # src = 0, .5, 1, 1.5, 2, 2.5
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 20.0]))
    torch.testing.assert_close(got[0, 0, :, 0], torch.zeros(6))
    y = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(fid.tf_resize_bilinear(y, 4), y[..., ::2, ::2])  # src = 0, 2, 4, 6
    torch.testing.assert_close(fid.tf_resize_bilinear(y, 8), y)


def bilinear_reference(a, out, half_pixel):
    """(H, W, C) numpy -> (out, out, C), written from the two definitions: output pixel i samples input
    (i + 0.5) * in / out - 0.5 (PyTorch's align_corners=False, negative -> 0) or i * in / out (TF's
    legacy resize); the next pixel is clamped at the last one. Both codes hold the scale in / out and
    the positions in float32 (float64 positions would differ by up to 6e-5 pixel at 600 pixels)."""
    def axis(n):
        scale, i = np.float64(np.float32(n) / np.float32(out)), np.arange(out, dtype=np.float64)
        src = (scale * (i + 0.5) - 0.5 if half_pixel else scale * i).astype(np.float32)  # one rounding
        src = np.maximum(src, 0).astype(np.float64)
        i0 = np.minimum(np.floor(src).astype(int), n - 1)
        return i0, np.minimum(i0 + 1, n - 1), (src - i0)

    (y0, y1, fy), (x0, x1, fx) = axis(a.shape[0]), axis(a.shape[1])
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]  # (out, W, C)
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]  # (out, out, C)


def inception_reference(pil, resize):
    """pytorch-fid: ToTensor, bilinear to 299, 2 x - 1; the TF graph: legacy bilinear on 0 ... 255, (x - 128) / 128."""
    out = []
    for image in pil:
        a = np.asarray(image, dtype=np.float64)  # (H, W, 3) uint8 values
        if resize == "pytorch-fid":
            a = 2 * bilinear_reference(a / 255, 299, half_pixel=True) - 1
        else:
            a = (bilinear_reference(a, 299, half_pixel=False) - 128) / 128
        out.append(torch.from_numpy(a).float().permute(2, 0, 1))
    return torch.stack(out)  # (B, 3, 299, 299)


def test_inception_input_resizes_as_pytorch_fid_or_tensorflow():
    x = images(2, 64, 48)
    pil = saved_png(x)
    small = [random_pil(600, 450)]  # downsampling too
    for resize in fid.RESIZE:  # 5e-6: a CPU kernel that rounds (i + 0.5) s - 0.5 twice, not once, moves
        # a position by one float32 step, a value by up to 4e-6 on these images
        torch.testing.assert_close(fid.inception_input(x, resize), inception_reference(pil, resize),
                                   atol=5e-6, rtol=0)
        torch.testing.assert_close(fid.inception_input(small, resize), inception_reference(small, resize),
                                   atol=5e-6, rtol=0)
    assert (fid.inception_input(x, "pytorch-fid") - fid.inception_input(x, "tensorflow")).abs().max() > 0.01
    with pytest.raises(ValueError, match="resize"):
        fid.inception_input(x, "bicubic")


def test_inception_pool3_loads_and_gives_2048_features(tmp_path):
    torch.manual_seed(0)
    net = fid.InceptionPool3().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # ignored
    path = str(tmp_path / "inception.safetensors")
    save_file(state, path)
    loaded = fid.load_inception(path)
    x = images(2, 64, 48)
    f = loaded(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # after ReLU + mean
    torch.testing.assert_close(f, net(x))
    # the pool3 features are the mean over the 8 x 8 map of Mixed_7c's output, on pytorch-fid's input
    # by default and on the TF graph's with resize="tensorflow"
    for resize, features in (("pytorch-fid", f), ("tensorflow", fid.load_inception(path, resize="tensorflow")(x))):
        with torch.no_grad():
            h = inception_reference(saved_png(x), resize)
            for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "pool", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "pool", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                         "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                h = torch.nn.functional.max_pool2d(h, 3, 2) if name == "pool" else getattr(net, name)(h)
        assert h.shape[1:] == (2048, 8, 8)
        torch.testing.assert_close(features, h.mean((2, 3)), atol=1e-4, rtol=1e-4)
    del state["Mixed_7c.branch_pool.conv.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="Mixed_7c.branch_pool.conv.weight"):
        fid.load_inception(str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        fid.load_inception(str(tmp_path / "nope.safetensors"))


def openclip_layout(model):
    """A transformers CLIPModel's weights written in open_clip's names and layouts (by hand, per key)."""
    sd, out = model.state_dict(), {}
    for tower, src, dst in (("v", "vision_model.encoder.layers", "visual.transformer.resblocks"),
                            ("t", "text_model.encoder.layers", "transformer.resblocks")):
        n = getattr(model.config, "vision_config" if tower == "v" else "text_config").num_hidden_layers
        for i in range(n):
            a, b = f"{src}.{i}", f"{dst}.{i}"
            for kind in ("weight", "bias"):
                out[f"{b}.attn.in_proj_{kind}"] = torch.cat([sd[f"{a}.self_attn.{q}_proj.{kind}"] for q in "qkv"])
                out[f"{b}.attn.out_proj.{kind}"] = sd[f"{a}.self_attn.out_proj.{kind}"]
                out[f"{b}.ln_1.{kind}"] = sd[f"{a}.layer_norm1.{kind}"]
                out[f"{b}.ln_2.{kind}"] = sd[f"{a}.layer_norm2.{kind}"]
                out[f"{b}.mlp.c_fc.{kind}"] = sd[f"{a}.mlp.fc1.{kind}"]
                out[f"{b}.mlp.c_proj.{kind}"] = sd[f"{a}.mlp.fc2.{kind}"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    out["visual.proj"] = sd["visual_projection.weight"].T  # (Dv, P)
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].T  # (Dt, P)
    out["logit_scale"] = sd["logit_scale"]
    out["attn_mask"] = torch.zeros(16, 16)  # open_clip's causal-mask buffer: not a weight
    return {"module." + k: v.contiguous().clone() for k, v in out.items()}


def test_openclip_converter_round_trip(clip_parts, tmp_path):
    model, tok = clip_parts
    state = openclip_layout(model)
    config, tensors = metrics.openclip_to_transformers(state, vision_heads=2, text_heads=2, hidden_act="quick_gelu",
                                                       eos_token_id=4)
    assert config.vision_config.image_size == 32 and config.vision_config.patch_size == 8
    assert config.vision_config.num_hidden_layers == 1 and config.projection_dim == 8
    ref = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    assert sorted(tensors) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(tensors[k], ref[k], atol=0, rtol=0, msg=k)
    # through a file and a folder: same features as the original model
    (tmp_path / "tok").mkdir()
    tok.save_pretrained(str(tmp_path / "tok"))
    save_file(state, str(tmp_path / "hps.safetensors"))
    out = metrics.convert_openclip(str(tmp_path / "hps.safetensors"), str(tmp_path / "tok"), str(tmp_path / "hf"),
                                    vision_heads=2, text_heads=2, hidden_act="quick_gelu", eos_token_id=4)
    x = images(2, 40, 24)
    a = metrics.load_clip(out, "hps").cosine(x, PROMPTS[:2])
    torch.testing.assert_close(a, metrics.CLIP(model, tok, "hps").cosine(x, PROMPTS[:2]), atol=1e-6, rtol=1e-5)
    with pytest.raises(KeyError, match="visual.proj"):
        metrics.openclip_to_transformers({"visual.conv1.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        metrics.convert_openclip(str(tmp_path / "HPS_v2.1_compressed.pt"), str(tmp_path / "tok"), str(tmp_path / "o"))


WORDS = sorted({w for p in PROMPTS for w in p.split()})  # the BERT tokenizer's vocabulary


def bert_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]", "[ENC]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
                                                pad_token="[PAD]", unk_token="[UNK]", model_max_length=35)


def test_image_reward_matches_its_formula(tmp_path):
    torch.manual_seed(0)
    vcfg = transformers.BlipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    tcfg = transformers.BlipTextConfig(vocab_size=6 + len(WORDS), hidden_size=24, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                                       encoder_hidden_size=16, is_decoder=True, pad_token_id=0)
    vision = transformers.BlipVisionModel(vcfg).eval()
    text = transformers.BlipTextModel(tcfg, add_pooling_layer=False).eval()
    mlp = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((24, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        mlp[f"layers.{i}.weight"] = torch.randn(n_out, n_in) / math.sqrt(n_in)
        mlp[f"layers.{i}.bias"] = torch.randn(n_out) * 0.1
    # ImageReward.pt's layout, written by hand: timm ViT names, BERT names, mlp.layers
    state = {f"mlp.{k}": v for k, v in mlp.items()}
    v = vision.state_dict()
    state.update({"blip.visual_encoder.cls_token": v["embeddings.class_embedding"],
                  "blip.visual_encoder.pos_embed": v["embeddings.position_embedding"],
                  "blip.visual_encoder.patch_embed.proj.weight": v["embeddings.patch_embedding.weight"],
                  "blip.visual_encoder.patch_embed.proj.bias": v["embeddings.patch_embedding.bias"],
                  "blip.visual_encoder.norm.weight": v["post_layernorm.weight"],
                  "blip.visual_encoder.norm.bias": v["post_layernorm.bias"]})
    for i in range(2):
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                     ("attn.proj", "self_attn.projection"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                state[f"blip.visual_encoder.blocks.{i}.{a}.{kind}"] = v[f"encoder.layers.{i}.{b}.{kind}"]
    state.update({f"blip.text_encoder.{k}": t for k, t in text.state_dict().items()})
    path = str(tmp_path / "ImageReward.safetensors")
    save_file({k: t.contiguous() for k, t in state.items()}, path)
    (tmp_path / "bert").mkdir()
    tok = bert_tokenizer()
    tok.save_pretrained(str(tmp_path / "bert"))
    ir = metrics.load_image_reward(path, str(tmp_path / "bert"), vision_heads=2, text_heads=2)
    x = images(3, 43, 32)  # tall: shortest side already 32, centre crop rows 6..38 (round(5.5) = 6)
    got = ir(x, PROMPTS[:3])
    # the formula, computed directly on the original modules, on ImageReward.py's _transform(224)
    pixels = normalized(torch.stack([ref_openai(im, 32) for im in saved_png(x)]))
    torch.testing.assert_close(pixels[..., 0, :], normalized(torch.stack([ref_crop(im, 32, 6, 0) for im in
                                                                           saved_png(x)]))[..., 0, :])
    tokens = tok(PROMPTS[:3], padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        img = vision(pixel_values=pixels).last_hidden_state  # (B, 17, 16)
        h = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=img,
                 encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        for i in (0, 2, 4, 6, 7):
            h = h @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
    ref = (h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        metrics.load_image_reward(str(tmp_path / "ImageReward.pt"), str(tmp_path / "bert"))
    with pytest.raises(KeyError, match="mlp.layers.0.weight"):
        metrics.imagereward_to_transformers({k: t for k, t in state.items() if not k.startswith("mlp.")})


