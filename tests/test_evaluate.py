"""evaluate.py: the protocols on top of evaluation/metrics.py and evaluation/fid.py: the speed table's NFE, tables and
figures, prompt files, scoring a folder, the w-sweep, and the command line (one `error:` line and
exit status 2 for bad input, before any model loads).

    python -m pytest -q tests/test_evaluate.py
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from evaluation import plots
from evaluation import fid
from evaluation import metrics
import mmdit
from sd3 import vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(B, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


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
    img = plots.line_plot({"loss": (steps, loss)}, str(tmp_path / "loss.png"), xlabel="step", ylabel="loss")
    assert Image.open(tmp_path / "loss.png").size == (640, 420)
    assert plots.COLORS[0] in {c for _, c in img.getcolors(1 << 20)}  # the curve is drawn
    # Fig. 5a from a results JSON (string keys for w)
    results = {"cfg": {"2": {"hps": 28.0}, "5": {"hps": 30.0}}, "student": {"2": {"hps": 27.0}, "5": {"hps": 29.0}}}
    evaluate.sweep_plot(results, "hps", str(tmp_path / "sweep.png"))
    with pytest.raises(KeyError, match="clip"):
        evaluate.sweep_plot(results, "clip", str(tmp_path / "x.png"))
    # Fig. 4: methods x w
    cells = [[Image.new("RGB", (16, 16), (i * 80, j * 80, 0)) for j in range(3)] for i in range(2)]
    grid = plots.image_grid(cells, str(tmp_path / "grid.png"), ["cfg", "student"], [2, 5, 8], cell=32)
    assert grid.size == (110 + 3 * (32 + 2), 20 + 2 * (32 + 2))  # 2-pixel white gutters
    assert grid.getpixel((110 + 34 + 5, 20 + 34 + 5)) == (80, 80, 0)
    wide = plots.image_grid([[Image.new("RGB", (16, 8), (9, 9, 9))]], str(tmp_path / "wide.png"), cell=64)
    assert wide.size == (64 + 2, 32 + 2) and wide.getpixel((63, 31)) == (9, 9, 9)  # the aspect ratio is kept


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
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="blank.txt.*holds no prompts"):
        evaluate.load_prompts(str(tmp_path / "blank.txt"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a red cat"}) + "\n")
    assert evaluate.load_prompts(str(tmp_path / "p.jsonl")) == ["a red cat"]
    os.makedirs(tmp_path / "dpg")
    (tmp_path / "dpg" / "item7.txt").write_text("a red cat\n")
    assert evaluate.load_dpg_prompts(str(tmp_path / "dpg")) == {"item7": "a red cat"}
    coco = dict(annotations=[dict(image_id=1, caption="A cat. "), dict(image_id=1, caption="x"),
                             dict(image_id=2, caption="A dog")])
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert evaluate.load_coco_captions(str(tmp_path / "c.json")) == [(1, "A cat."), (2, "A dog")]


def write_pngs(folder, x):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(vae.to_pil(x)):
        im.save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


def test_score_folder_and_folder_statistics(tmp_path):
    x = images(5, 12, 10)
    folder = write_pngs(tmp_path / "imgs", x)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert [os.path.basename(p) for p in evaluate.list_images(folder)] == [f"{i:03d}.png" for i in range(5)]
    calls = []

    def scorer(pil, prompts):  # a stub metric: mean red value, records its batches
        calls.append((len(pil), list(prompts)))
        return torch.tensor([np.asarray(im, dtype=np.float64)[..., 0].mean() for im in pil])

    prompts = [f"p{i}" for i in range(5)]
    names, scores = evaluate.score_folder(scorer, folder, prompts, batch=2)
    red = vae.to_uint8(x)[..., 0].double().mean((1, 2))  # (B,), from the tensor the PNGs were saved from
    assert names == [f"{i:03d}.png" for i in range(5)] and calls == [(2, ["p0", "p1"]), (2, ["p2", "p3"]), (1, ["p4"])]
    torch.testing.assert_close(scores.double(), red, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="5 images.*4 prompts"):
        evaluate.score_folder(scorer, folder, prompts[:4])
    feats = lambda pil: torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float64).mean((0, 1))) for im in pil])
    mu, sigma = evaluate.folder_statistics(feats, folder, batch=3)
    ref = vae.to_uint8(x).double().mean((1, 2)).numpy()  # (B, 3)
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-10)
    os.makedirs(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no .png.* files in"):
        evaluate.list_images(str(tmp_path / "none"))


def test_cli_score_and_fid(clip_parts, clip_folder, tmp_path, capsys):
    model, tok = clip_parts
    x = images(2, 32, 32)
    folder = write_pngs(tmp_path / "imgs", x)
    (tmp_path / "p.txt").write_text("a red cat\na dog\n")
    args = argparse.Namespace(command="score", metric="pickscore", clip=clip_folder, aesthetic=None, imagereward=None,
                              images=folder, prompts=str(tmp_path / "p.txt"), batch=1, device="cpu",
                              out=str(tmp_path / "s.json"))
    evaluate.main(args)
    got = json.loads(capsys.readouterr().out)["score"]
    ref = metrics.clip_type_score(metrics.CLIP(model, tok), vae.to_pil(x), ["a red cat", "a dog"], "pickscore")
    assert got == pytest.approx(ref[1], abs=1e-4)
    per_image = json.loads((tmp_path / "s.json").read_text())["per_image"]
    assert list(per_image) == ["000.png", "001.png"]
    assert list(per_image.values()) == pytest.approx(ref[0].tolist(), abs=1e-4)
    (tmp_path / "p.txt").write_text("a red cat\n")
    with pytest.raises(ValueError, match="2 images.*1 prompts"):
        evaluate.main(args)
    fid.save_statistics(str(tmp_path / "a.npz"), np.zeros(3), np.eye(3))
    fid.save_statistics(str(tmp_path / "b.npz"), np.ones(3), 4 * np.eye(3))
    evaluate.main(argparse.Namespace(command="fid", stats=[str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]))
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(3 + 3 * (2 - 1) ** 2)


def run_cli(*argv):
    return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Two images, prompt files (right, empty, too short) and a CLIP folder whose config.json is not
    JSON: a command that got as far as loading the model would fail with another message."""
    root = tmp_path_factory.mktemp("cli")
    imgs = write_pngs(root / "imgs", images(2, 16, 16))
    (root / "two.txt").write_text("a red cat\na dog\n")
    (root / "empty.txt").write_text("\n\n")
    (root / "one.txt").write_text("a red cat\n")
    (root / "junk_clip").mkdir()
    (root / "junk_clip" / "config.json").write_text("not json")
    (root / "no_images").mkdir()
    return root, imgs


@pytest.mark.parametrize("argv, named", [
    (["score", "--metric", "hps", "--clip", "{root}/nowhere", "--images", "{imgs}", "--prompts", "{root}/two.txt"],
     "nowhere"),
    (["score", "--metric", "clip", "--clip", "{root}/junk_clip", "--images", "{imgs}", "--prompts",
      "{root}/empty.txt"], "empty.txt"),
    (["score", "--metric", "fidelity", "--clip", "{root}/junk_clip", "--images", "{imgs}"], "--metric"),
    (["score", "--metric", "pickscore", "--clip", "{root}/junk_clip", "--images", "{imgs}", "--prompts",
      "{root}/one.txt"], "2 images in"),
    (["score", "--metric", "aesthetic", "--clip", "{root}/junk_clip", "--images", "{root}/no_images"], "no_images"),
    (["score", "--metric", "aesthetic", "--clip", "{root}/junk_clip", "--images", "{imgs}"], "--aesthetic"),
    (["fid-stats", "--inception", "{root}/pt_inception.safetensors", "--images", "{imgs}", "--out", "{root}/o.npz"],
     "pt_inception.safetensors"),
    (["fid", "{root}/ours.npz", "{root}/ref.npz"], "ours.npz"),
    (["speed", "--strong", "{root}/two.txt"], "--weak"),
])
def test_cli_bad_input_is_one_error_line_and_status_2(bad_inputs, argv, named):
    root, imgs = bad_inputs
    r = run_cli(*[a.format(root=root, imgs=imgs) for a in argv])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], r.stderr
    assert r.stdout == ""


def test_w_sweep_and_grid(tmp_path):
    def generate(method, w, prompts):  # a stub: brightness = w for the teacher, w / 2 for the student
        level = w / 10 if method == "cfg" else w / 20
        return torch.full((len(prompts), 3, 8, 8), 2 * level - 1)  # (B, 3, H, W) in [-1, 1]

    scorers = {"clip": lambda x, p: 100 * ((x + 1) / 2).mean((1, 2, 3)) - 30}  # mean clamped at 0
    results, imgs = evaluate.w_sweep(generate, scorers, ["a", "b"], ["cfg", "student"], [2.0, 5.0])
    assert results["cfg"][5.0]["clip"] == pytest.approx(20.0) and results["student"][2.0]["clip"] == 0.0
    evaluate.sweep_plot(results, "clip", str(tmp_path / "sweep.png"))
    rows = [[vae.to_pil(imgs[m][w][:1])[0] for w in (2.0, 5.0)] for m in ("cfg", "student")]
    grid = plots.image_grid(rows, str(tmp_path / "grid.png"), ["cfg", "student"], ["w=2", "w=5"], cell=16)
    assert grid.getpixel((110 + 18 + 8, 20 + 8)) == (128, 128, 128)  # cfg at w = 5: level 0.5
