"""evaluate.py: every metric against an independent computation of its formula, on tiny random
models built here (no downloads); FID closed forms; DPG-Bench on a stub VQA; the speed table's NFE."""

import json
import math
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import evaluate
import mmdit

torch.set_num_threads(1)
WORDS = ["a", "red", "blue", "cat", "dog", "on", "the", "grass", "photo", "of"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {tok: i for i, tok in enumerate(["!", "<unk>", "<pad>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 4)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>", unk_token="<unk>", model_max_length=16)


def tiny_clip_model(seed=0, logit_scale=3.0):
    torch.manual_seed(seed)
    text = dict(vocab_size=5 + len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=3, eos_token_id=4, pad_token_id=4)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    return model


@pytest.fixture(scope="module")
def clip_parts():
    return tiny_clip_model(), word_tokenizer()


PROMPTS = ["a red cat", "the blue dog on the grass", "photo of a cat", "a dog"]


def images(B, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def reference_cos(model, tokenizer, pixels, prompts):
    """cos(image, text) from CLIPModel.forward's logits_per_image / logit_scale.exp() (an independent path)."""
    tok = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


def normalized(x01):
    mean = torch.tensor(evaluate.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(evaluate.OPENAI_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def test_clip_score_and_pickscore_match_clip_forward(clip_parts):
    model, tok = clip_parts
    clip = evaluate.CLIP(model, tok, "clip")
    x = images(4, 32, 32)  # already 32 x 32: preprocessing is only (x + 1) / 2 and mean/std
    cos = reference_cos(model, tok, normalized((x + 1) / 2), PROMPTS)
    clip_s, clip_mean = evaluate.clip_type_score(clip, x, PROMPTS, "clip")
    pick_s, _ = evaluate.clip_type_score(clip, x, PROMPTS, "pickscore")
    dice_s, dice_mean = evaluate.clip_type_score(clip, x, PROMPTS, "clip-dice")
    torch.testing.assert_close(clip_s, 100 * cos, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pick_s, math.exp(3.0) * cos, atol=1e-4, rtol=1e-5)  # the learned scale
    torch.testing.assert_close(dice_s, cos, atol=1e-6, rtol=1e-5)
    assert clip_mean == pytest.approx(max(100 * cos.double().mean().item(), 0.0), abs=1e-4)
    assert dice_mean == pytest.approx(cos.double().mean().item(), abs=1e-6)
    # torchmetrics clamps the MEAN (not each score) at 0; the other presets do not clamp
    assert evaluate.aggregate(torch.tensor([-5.0, 1.0]), "clip") == 0.0
    assert evaluate.aggregate(torch.tensor([-5.0, 4.0]), "clip") == 0.0
    assert evaluate.aggregate(torch.tensor([-5.0, 7.0]), "clip") == pytest.approx(1.0)
    assert evaluate.aggregate(torch.tensor([-5.0, 1.0]), "pickscore") == pytest.approx(-2.0)
    # PIL images give the same scores as the tensor they came from (after uint8 rounding)
    pil = [Image.fromarray(a) for a in ((x + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    torch.testing.assert_close(evaluate.clip_type_score(clip, pil, PROMPTS, "clip")[0], clip_s, atol=0.5, rtol=0)


def test_clip_preprocess_shortest_side_and_centre_crop(clip_parts):
    x = images(2, 48, 64)
    got = evaluate.preprocess_clip((x + 1) / 2, 32)
    r = torch.nn.functional.interpolate((x + 1) / 2, size=(32, 42), mode="bicubic", antialias=True)  # 64*32/48=42.7
    torch.testing.assert_close(got, normalized(r[..., :, 5:37]), atol=1e-6, rtol=0)


def test_hps_score_and_preprocessing(clip_parts):
    model, tok = clip_parts
    clip = evaluate.CLIP(model, tok, "hps")
    x = images(3, 20, 40)  # wide: longest side 40 -> 32, height 20 -> 16, pad 8 above and below
    x01 = (x + 1) / 2
    canvas = torch.zeros(3, 3, 32, 32)  # black, before normalisation
    canvas[:, :, 8:24, :] = torch.nn.functional.interpolate(x01, size=(16, 32), mode="bicubic", antialias=True)
    pixels = normalized(canvas)
    torch.testing.assert_close(evaluate.preprocess_hps(x01, 32), pixels, atol=1e-6, rtol=0)
    black = normalized(torch.zeros(1, 3, 1, 1)).view(3)
    torch.testing.assert_close(evaluate.preprocess_hps(x01, 32)[0, :, 0, 0], black)
    # odd padding: 40 x 25 -> 32 x 20, 12 columns of pad: 6 left, 6 right; 40 x 23 -> 32 x 18: 7 left, 7 right
    assert evaluate.preprocess_hps(torch.rand(1, 3, 40, 23), 32).shape == (1, 3, 32, 32)
    scores, mean = evaluate.clip_type_score(clip, x, PROMPTS[:3], "hps")
    cos = reference_cos(model, tok, pixels, PROMPTS[:3])
    torch.testing.assert_close(scores, 100 * cos, atol=1e-4, rtol=1e-5)  # no logit scale
    assert mean == pytest.approx(100 * cos.double().mean().item(), abs=1e-4)
    with pytest.raises(ValueError, match="preprocess"):
        evaluate.clip_type_score(clip, x, PROMPTS[:3], "clip")


def test_load_clip_folder_and_errors(clip_parts, tmp_path):
    model, tok = clip_parts
    folder = str(tmp_path / "clip")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    clip = evaluate.load_clip(folder, "clip")
    x = images(2, 32, 32)
    ref = evaluate.CLIP(model, tok, "clip")
    torch.testing.assert_close(clip.cosine(x, PROMPTS[:2]), ref.cosine(x, PROMPTS[:2]))
    with pytest.raises(FileNotFoundError, match="nowhere.*not a folder"):
        evaluate.load_clip(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.load_clip(str(tmp_path / "empty"))


def test_aesthetic_is_mlp_on_normalised_embedding(clip_parts, tmp_path):
    model, tok = clip_parts
    clip = evaluate.CLIP(model, tok, "clip")
    torch.manual_seed(3)
    state = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((8, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in) / math.sqrt(n_in)
        state[f"layers.{i}.bias"] = torch.randn(n_out) * 0.1
    path = str(tmp_path / "aesthetic.safetensors")
    save_file(state, path)
    mlp = evaluate.load_aesthetic(path)
    x = images(3, 32, 32)
    with torch.no_grad():
        e = model.visual_projection(model.vision_model(pixel_values=normalized((x + 1) / 2)).pooler_output)
        h = e / e.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # no activations between the layers
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(evaluate.aesthetic_score(clip, mlp, x), h.squeeze(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        evaluate.load_aesthetic(str(tmp_path / "missing.safetensors"))
    (tmp_path / "a.pth").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="safetensors"):
        evaluate.load_aesthetic(str(tmp_path / "a.pth"))


def test_frechet_distance_closed_forms(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    S = A @ A.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert abs(evaluate.frechet_distance(mu, S, mu, S)) < 1e-9  # identical statistics
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu2 = rng.normal(size=6)
    closed = ((mu - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # diagonal covariances
    assert evaluate.frechet_distance(mu, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    # full covariances: tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)) (the eigenvalues of S1 S2 are real, >= 0)
    B = rng.normal(size=(6, 6))
    S2 = B @ B.T + 0.1 * np.eye(6)
    tr = np.sqrt(np.linalg.eigvals(S @ S2).real.clip(0)).sum()
    ref = ((mu - mu2) ** 2).sum() + np.trace(S) + np.trace(S2) - 2 * tr
    assert evaluate.frechet_distance(mu, S, mu2, S2) == pytest.approx(ref, rel=1e-10)
    # statistics: float64 mean and unbiased covariance; .npz round trip; fid() end to end
    feats = rng.normal(size=(50, 6))
    m, s = evaluate.feature_statistics(feats)
    np.testing.assert_allclose(s, (feats - feats.mean(0)).T @ (feats - feats.mean(0)) / 49, rtol=1e-12)
    path = str(tmp_path / "ref.npz")
    evaluate.save_statistics(path, m, s)
    got = evaluate.fid(lambda x: x, [torch.from_numpy(feats[:20]), torch.from_numpy(feats[20:])], path)
    assert abs(got) < 1e-8
    np.savez(tmp_path / "bad.npz", mu=m)
    with pytest.raises(KeyError, match="sigma"):
        evaluate.load_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="none.npz.*'mu' and 'sigma'"):
        evaluate.load_statistics(str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="do not match"):
        evaluate.frechet_distance(mu, S, mu[:3], S[:3, :3])


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
    out = evaluate.dpg_bench(images, str(csv_path), vqa, tile=4)
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
    assert evaluate.dpg_bench(str(tmp_path), str(csv_path), vqa, tile=4)["overall"] == pytest.approx(out["overall"])
    os.remove(tmp_path / "p2.png")
    with pytest.raises(FileNotFoundError, match="p2.png"):
        evaluate.dpg_bench(str(tmp_path), str(csv_path), vqa, tile=4)
    with pytest.raises(FileNotFoundError, match="dpg_bench.csv"):
        evaluate.load_dpg_questions(str(tmp_path / "nope" / "dpg_bench.csv"))
    with pytest.raises(ValueError, match="not a grid"):
        evaluate.split_tiles(Image.new("RGB", (6, 8)), 4)


def test_speed_table_counts_and_ratios():
    torch.manual_seed(0)
    cfg = mmdit.CONFIGS["tiny-sd3"]
    models = [mmdit.MMDiT(cfg).eval() for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, cfg.in_channels, 8, 8, generator=g)  # (B, C, H, W)
    context, y = torch.randn(2, 5, cfg.context_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)
    cn, yn = torch.randn(1, 5, cfg.context_dim, generator=g), torch.randn(1, cfg.pooled_dim, generator=g)
    rows = evaluate.speed_table(models[0], noise, context, y, cn, yn, w=4.0, steps=3, strong=models[1],
                                weak=models[2], warmup_steps=1)
    by = {r["method"]: r for r in rows}
    assert list(by) == list(evaluate.samplers.METHODS)
    N = 3  # SPEC section 6: Euler N, CFG 2N, reflection 6(N - 1) + 2, student N
    assert {m: r["nfe"] for m, r in by.items()} == dict(euler=N, cfg=2 * N, zsampling=6 * (N - 1) + 2,
                                                        w2sd=6 * (N - 1) + 2, student=N)
    assert by["w2sd"]["nfe_ratio"] == pytest.approx(14 / 3)
    assert by["student"]["wall_ratio"] == 1.0 and all(r["wall_s"] > 0 for r in rows)
    rows = evaluate.speed_table(models[0], noise, context, y, cn, yn, w=4.0, steps=2, warmup_steps=1)
    assert "w2sd" not in [r["method"] for r in rows]  # runs only with a strong and a weak model


def test_tables_plots_and_grid(tmp_path):
    rows = [dict(method="cfg", nfe=100, hps=30.123), dict(method="student", nfe=50, hps=29.5)]
    md = evaluate.write_table(rows, str(tmp_path / "t"), title="Table 1")
    assert "| method | nfe | hps |" in md and "| student | 50 | 29.50 |" in md
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == rows
    assert (tmp_path / "t.md").read_text() == md
    # Fig. 5b from a JSONL and a CSV log
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(dict(step=s, loss=1 / (s + 1))) for s in range(20)) + "\n")
    steps, loss = evaluate.read_log(str(log))
    assert steps[3] == 3 and loss[3] == pytest.approx(0.25)
    (tmp_path / "log.csv").write_text("step,loss\n0,1.0\n10,0.5\n")
    assert evaluate.read_log(str(tmp_path / "log.csv")) == ([0.0, 10.0], [1.0, 0.5])
    with pytest.raises(KeyError, match="score"):
        evaluate.read_log(str(log), key="score")
    img = evaluate.line_plot({"loss": (steps, loss)}, str(tmp_path / "loss.png"), xlabel="step", ylabel="loss")
    assert Image.open(tmp_path / "loss.png").size == (640, 420)
    assert evaluate.COLORS[0] in {c for _, c in img.getcolors(1 << 20)}  # the curve is drawn
    # Fig. 5a from a results JSON (string keys for w)
    results = {"cfg": {"2": {"hps": 28.0}, "5": {"hps": 30.0}}, "student": {"2": {"hps": 27.0}, "5": {"hps": 29.0}}}
    evaluate.sweep_plot(results, "hps", str(tmp_path / "sweep.png"))
    with pytest.raises(KeyError, match="clip"):
        evaluate.sweep_plot(results, "clip", str(tmp_path / "x.png"))
    # Fig. 4: methods x w
    cells = [[Image.new("RGB", (16, 16), (i * 80, j * 80, 0)) for j in range(3)] for i in range(2)]
    grid = evaluate.image_grid(cells, str(tmp_path / "grid.png"), ["cfg", "student"], [2, 5, 8], cell=32)
    assert grid.size == (110 + 3 * 32, 20 + 2 * 32)
    assert grid.getpixel((110 + 32 + 5, 20 + 32 + 5)) == (80, 80, 0)


def test_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="anime.json"):
        evaluate.load_hps_prompts(str(tmp_path))
    for s in evaluate.HPS_STYLES:
        (tmp_path / f"{s}.json").write_text(json.dumps([f"{s} 1", f"{s} 2"]))
    assert evaluate.load_hps_prompts(str(tmp_path))["photo"] == ["photo 1", "photo 2"]
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    assert evaluate.load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluate.load_prompts(str(tmp_path / "missing.txt"))
    os.makedirs(tmp_path / "dpg")
    (tmp_path / "dpg" / "item7.txt").write_text("a red cat\n")
    assert evaluate.load_dpg_prompts(str(tmp_path / "dpg")) == {"item7": "a red cat"}
    coco = dict(annotations=[dict(image_id=1, caption="A cat. "), dict(image_id=1, caption="x"),
                             dict(image_id=2, caption="A dog")])
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert evaluate.load_coco_captions(str(tmp_path / "c.json")) == [(1, "A cat."), (2, "A dog")]


def test_cli_score_and_fid(clip_parts, tmp_path, capsys):
    model, tok = clip_parts
    folder = str(tmp_path / "clip")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    os.makedirs(tmp_path / "imgs")
    x = images(2, 32, 32)
    for i, im in enumerate(evaluate.vae.to_pil(x)):
        im.save(tmp_path / "imgs" / f"{i:03d}.png")
    (tmp_path / "p.txt").write_text("a red cat\na dog\n")
    import argparse
    args = argparse.Namespace(command="score", metric="pickscore", clip=folder, aesthetic=None,
                              images=str(tmp_path / "imgs"), prompts=str(tmp_path / "p.txt"), batch=1, device="cpu",
                              out=str(tmp_path / "s.json"))
    evaluate.main(args)
    got = json.loads(capsys.readouterr().out)["score"]
    ref = evaluate.clip_type_score(evaluate.CLIP(model, tok), evaluate.vae.to_pil(x), ["a red cat", "a dog"],
                                   "pickscore")[1]
    assert got == pytest.approx(ref, abs=1e-4)
    (tmp_path / "p.txt").write_text("a red cat\n")
    with pytest.raises(ValueError, match="2 images.*1 prompts"):
        evaluate.main(args)
    evaluate.save_statistics(str(tmp_path / "a.npz"), np.zeros(3), np.eye(3))
    evaluate.save_statistics(str(tmp_path / "b.npz"), np.ones(3), 4 * np.eye(3))
    evaluate.main(argparse.Namespace(command="fid", stats=[str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]))
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(3 + 3 * (2 - 1) ** 2)


def test_tf_resize_bilinear_closed_form():
    # TF legacy resize: output i samples input i * in / out (no half-pixel shift), clamped at the edge
    x = torch.tensor([0.0, 10.0, 20.0]).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    got = evaluate.tf_resize_bilinear(x, 6)  # src = 0, .5, 1, 1.5, 2, 2.5
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 20.0]))
    torch.testing.assert_close(got[0, 0, :, 0], torch.zeros(6))
    y = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(evaluate.tf_resize_bilinear(y, 4), y[..., ::2, ::2])  # src = 0, 2, 4, 6
    torch.testing.assert_close(evaluate.tf_resize_bilinear(y, 8), y)


def test_inception_pool3_loads_and_gives_2048_features(tmp_path):
    torch.manual_seed(0)
    net = evaluate.InceptionPool3().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # ignored
    path = str(tmp_path / "inception.safetensors")
    save_file(state, path)
    loaded = evaluate.load_inception(path)
    x = images(2, 64, 48)
    f = loaded(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # after ReLU + mean
    torch.testing.assert_close(f, net(x))
    # the pool3 features are the mean over the 8 x 8 map of Mixed_7c's output
    with torch.no_grad():
        h = evaluate.tf_resize_bilinear((x + 1) / 2, 299) * 2 - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "pool", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "pool", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            h = torch.nn.functional.max_pool2d(h, 3, 2) if name == "pool" else getattr(net, name)(h)
    assert h.shape[1:] == (2048, 8, 8)
    torch.testing.assert_close(f, h.mean((2, 3)))
    del state["Mixed_7c.branch_pool.conv.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match="Mixed_7c.branch_pool.conv.weight"):
        evaluate.load_inception(str(tmp_path / "bad.safetensors"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        evaluate.load_inception(str(tmp_path / "nope.safetensors"))


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
    config, tensors = evaluate.openclip_to_transformers(state, vision_heads=2, text_heads=2, hidden_act="quick_gelu",
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
    out = evaluate.convert_openclip(str(tmp_path / "hps.safetensors"), str(tmp_path / "tok"), str(tmp_path / "hf"),
                                    vision_heads=2, text_heads=2, hidden_act="quick_gelu", eos_token_id=4)
    x = images(2, 40, 24)
    a = evaluate.load_clip(out, "hps").cosine(x, PROMPTS[:2])
    torch.testing.assert_close(a, evaluate.CLIP(model, tok, "hps").cosine(x, PROMPTS[:2]), atol=1e-6, rtol=1e-5)
    with pytest.raises(KeyError, match="visual.proj"):
        evaluate.openclip_to_transformers({"visual.conv1.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        evaluate.convert_openclip(str(tmp_path / "HPS_v2.1_compressed.pt"), str(tmp_path / "tok"), str(tmp_path / "o"))


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
    ir = evaluate.load_image_reward(path, str(tmp_path / "bert"), vision_heads=2, text_heads=2)
    x = images(3, 40, 32)  # tall: shortest side 32 -> 32 x 40, centre crop rows 4..36
    got = ir(x, PROMPTS[:3])
    # the formula, computed directly on the original modules
    pixels = normalized(torch.nn.functional.interpolate((x + 1) / 2, size=(40, 32), mode="bicubic",
                                                        antialias=True)[:, :, 4:36])
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
        evaluate.load_image_reward(str(tmp_path / "ImageReward.pt"), str(tmp_path / "bert"))
    with pytest.raises(KeyError, match="mlp.layers.0.weight"):
        evaluate.imagereward_to_transformers({k: t for k, t in state.items() if not k.startswith("mlp.")})


def test_w_sweep_and_grid(tmp_path):
    def generate(method, w, prompts):  # a stub: brightness = w for the teacher, w / 2 for the student
        level = w / 10 if method == "cfg" else w / 20
        return torch.full((len(prompts), 3, 8, 8), 2 * level - 1)  # (B, 3, H, W) in [-1, 1]

    metrics = {"clip": lambda x, p: 100 * ((x + 1) / 2).mean((1, 2, 3)) - 30}  # mean clamped at 0
    results, imgs = evaluate.w_sweep(generate, metrics, ["a", "b"], ["cfg", "student"], [2.0, 5.0])
    assert results["cfg"][5.0]["clip"] == pytest.approx(20.0) and results["student"][2.0]["clip"] == 0.0
    evaluate.sweep_plot(results, "clip", str(tmp_path / "sweep.png"))
    rows = [[evaluate.vae.to_pil(imgs[m][w][:1])[0] for w in (2.0, 5.0)] for m in ("cfg", "student")]
    grid = evaluate.image_grid(rows, str(tmp_path / "grid.png"), ["cfg", "student"], ["w=2", "w=5"], cell=16)
    assert grid.getpixel((110 + 16 + 8, 20 + 8)) == (128, 128, 128)  # cfg at w = 5: level 0.5
