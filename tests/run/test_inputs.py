"""
Careless input at every command line: one `error:` line naming the flag or file, exit status 2 (a
failure during the work: 1), and nothing written or overwritten; where the refusal can come before
the heavy work, it does (every model loader, the toy world's training and the benchmark's worker
processes are replaced by ones that fail, so a refusal that came after them would say so).

Each command runs in this process as `python SCRIPT ARGS` would run it (runpy, its own __main__
block and cli.run), so a case costs milliseconds, not a Python start and a torch import.

    python -m pytest -q tests/run/test_inputs.py
"""

import argparse
import dataclasses
import hashlib
import json
import os
import runpy
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sd3 import checkpoint
from run import cli
from evaluation import fid
from sd3 import lora
from evaluation import metrics
import mmdit
import toy
from run import training  # noqa: F401 - imported here, before any case replaces a loader it imports by name
from sd3 import vae
from sd3 import student_file, text_encoders

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_PROMPT = "a red plus left of a blue square"
# the work a refusal must come before: replaced, in the "before" cases, by a function that fails
HEAVY = [(mmdit, "load_mmdit"), (mmdit, "load_mmdit_blend"), (vae, "load_vae"), (vae, "load_image"),
         (text_encoders.TextEncoders, "from_pretrained"), (student_file, "load_student"), (toy, "build_world"),
         (toy, "train_teacher"), (metrics, "load_scorer"), (fid, "load_inception"), (lora, "load_student"),
         (lora, "load_mmdit"), (toy, "load_mmdit"), (subprocess, "run")]


def heavy(*args, **kwargs):
    raise AssertionError("heavy work began before the input was checked")


# -----------------------------------------------------------------------------
# The files the cases read


def tiny_mmdit(seed=0, fill=None):
    torch.manual_seed(seed)
    model = mmdit.MMDiT(mmdit.CONFIGS["tiny-sd3"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if fill is None else p.fill_(fill)
    return model


def png(path, size=(16, 16), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_vae_config):
    r = tmp_path_factory.mktemp("inputs")
    base = tiny_mmdit()
    mmdit.save_mmdit(base, str(r / "base.safetensors"))
    os.symlink(r / "base.safetensors", r / "base-link.safetensors")
    student = lora.attach(base, lora.settings(2))
    with torch.no_grad():
        for _, m in lora.adapters(student):
            m.lora_B.normal_(0, 0.01)
    lora.save_adapter(student, base, str(r / "lora.safetensors"), {"teefusion_method": "teefusion"})
    mmdit.save_mmdit(tiny_mmdit(fill=float("nan")), str(r / "nan.safetensors"))
    mmdit.save_mmdit(tiny_mmdit(seed=1), str(r / "other.safetensors"))  # another network of the same shapes
    checkpoint.save_stability({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()},  # the base in bf16
                              str(r / "base-bf16.safetensors"), checkpoint.metadata_with(dataclasses.asdict(base.config), None))
    # integer (quantized) files: loaded, they would be cast to float silently
    checkpoint.save_stability({k: v.to(torch.int8) for k, v in base.state_dict().items()}, str(r / "int8.safetensors"),
                              checkpoint.metadata_with(dataclasses.asdict(base.config), None))
    with safe_open(str(r / "lora.safetensors"), framework="pt") as f:
        save_file({k: f.get_tensor(k).to(torch.int8) for k in f.keys()}, str(r / "lora-int8.safetensors"), f.metadata())
    # a checkpoint whose config reads well off its first tensors but one of whose shapes is wrong
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state["joint_blocks.1.x_block.mlp.fc2.weight"] = torch.zeros(64, 7)
    checkpoint.save_stability(state, str(r / "wrong.safetensors"),
                              checkpoint.metadata_with(dataclasses.asdict(base.config), None))
    # SD3's folders as generate.py checks them before loading (their contents are read only when loading)
    for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
        (r / "encoders" / part).mkdir(parents=True)
    torch.manual_seed(0)
    tiny_vae = vae.VAE(tiny_vae_config)
    save_file({k: v.contiguous() for k, v in tiny_vae.state_dict().items()}, str(r / "vae.safetensors"))
    save_file({k: v.to(torch.uint8).contiguous() for k, v in tiny_vae.state_dict().items()}, str(r / "vae-u8.safetensors"))
    # prompts: strings only, JSON, UTF-8
    (r / "prompts.json").write_text(json.dumps(["a cat", None, {"x": 1}]))
    (r / "broken.json").write_text('["a cat", ]')
    (r / "latin1.txt").write_bytes("a caf\xe9 on a roof\n".encode("latin-1"))
    (r / "two.txt").write_text("a red cat\na dog\n")
    (r / "gen").mkdir()
    (r / "gen" / "index.jsonl").write_text(json.dumps({"prompt": "a red cat"}) + "\n")
    # images, captions, a CLIP folder that check_weights accepts
    (r / "imgs").mkdir()
    for k in range(2):
        png(r / "imgs" / f"{k:03d}.png", seed=k)
    (r / "folder.safetensors").mkdir()
    (r / "clip").mkdir()
    (r / "clip" / "config.json").write_text("{}")
    (r / "missing.jsonl").write_text("".join(json.dumps({"path": f"gone{k}.png", "caption": "x"}) + "\n"
                                             for k in range(3)))
    (r / "unreadable").mkdir()
    for k in range(2):
        (r / "unreadable" / f"u{k}.png").write_bytes(b"not a png at all")
        (r / "unreadable" / f"u{k}.txt").write_text("a caption")
    (r / "captioned").mkdir()
    for k in range(2):
        png(r / "captioned" / f"c{k}.png", seed=k)
        (r / "captioned" / f"c{k}.txt").write_text(f"caption {k}")
    (r / "fifo").mkdir()  # FIFOs where files belong: reading one waits forever for a writer
    os.mkfifo(r / "fifo" / "image.png")
    os.mkfifo(r / "fifo" / "prompts.txt")
    (r / "fifo" / "image.txt").write_text("a caption")
    (r / "zero").mkdir()  # one image, one empty file named .png
    png(r / "zero" / "a.png")
    (r / "zero" / "b.png").write_bytes(b"")
    (r / "png.safetensors").write_bytes((r / "imgs" / "000.png").read_bytes())  # a PNG renamed
    (r / "gendir" / "index.jsonl").mkdir(parents=True)  # a folder where generate.py writes its index
    nan_toy = mmdit.MMDiT(toy.TEACHER_CONFIG)
    with torch.no_grad():
        nan_toy.final_layer.linear.bias.fill_(float("nan"))
    mmdit.save_mmdit(nan_toy, str(r / "nan-toy.safetensors"), {"teefusion_method": "teefusion"})
    mmdit.save_mmdit(mmdit.MMDiT(toy.TEACHER_CONFIG), str(r / "nan-scale.safetensors"),
                     {"teefusion_method": "teefusion", "teefusion_scale": "nan"})
    (r / "logged").mkdir()  # a toy student whose training log has a line without its loss
    mmdit.save_mmdit(mmdit.MMDiT(toy.TEACHER_CONFIG), str(r / "logged" / "student.safetensors"),
                     {"teefusion_method": "teefusion", "teefusion_teacher": "cfg"})
    line = {"step": 1, "loss": 0.5, "step_s": 0.1, "teacher_s": 0.05, "student_s": 0.05}
    (r / "logged" / "log.jsonl").write_text(json.dumps(line) + "\n\n" + json.dumps(dict(line, loss=None)) + "\n")
    (r / "number-caption.jsonl").write_text(json.dumps({"path": "c0.png", "caption": 5}) + "\n")
    (r / "empty-caption.jsonl").write_text(json.dumps({"path": "c0.png", "caption": " "}) + "\n")
    (r / "many.jsonl").write_text((json.dumps({"path": "c0.png", "caption": "x"}) + "\n") * 10000)
    (r / "latin1-captions").mkdir()
    png(r / "latin1-captions" / "a.png")
    (r / "latin1-captions" / "a.txt").write_bytes("une caf\xe9".encode("latin-1"))
    # FID statistics: NaN, a truncated .npz, a torch.save file (a zip of pickles)
    fid.save_statistics(str(r / "ok.npz"), np.zeros(3), np.eye(3))
    fid.save_statistics(str(r / "nan.npz"), np.full(3, np.nan), np.eye(3))
    fid.save_statistics(str(r / "negative.npz"), np.zeros(3), -np.eye(3))  # no covariance
    whole = (r / "ok.npz").read_bytes()
    (r / "truncated.npz").write_bytes(whole[:len(whole) // 2])
    torch.save({f"layer{k}.weight": torch.zeros(2) for k in range(60)}, str(r / "pickle.npz"))
    torch.save(base.state_dict(), str(r / "x.ckpt"))
    (r / "sweep.json").write_text(json.dumps({"cfg": {"2": {"hps": 28.0}}}))
    (r / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    # prepare.py's index for distill.py: latents (4, 8, 8) and a text width (12) the tiny MMDiT (32) does not take
    (r / "data").mkdir()
    for name in ("shard-00000.safetensors", "null.safetensors"):
        (r / "data" / name).write_bytes(b"")
    (r / "data" / "index.json").write_text(json.dumps({
        "format": "teefusion-shards/1", "num_samples": 4, "settings": {"text": True},
        "latent_shape": [4, 8, 8], "context_shape": [6, 12], "y_shape": [24],
        "shards": [{"file": "shard-00000.safetensors", "num_samples": 4}]}))
    (r / "data-outside").mkdir()  # an index naming a shard outside its folder
    (r / "data-outside" / "index.json").write_text(json.dumps({
        "format": "teefusion-shards/1", "num_samples": 4, "settings": {"text": True},
        "shards": [{"file": "../data/shard-00000.safetensors", "num_samples": 4}]}))
    (r / "run").mkdir()
    (r / "run" / "student.safetensors").write_bytes((r / "base.safetensors").read_bytes())
    # toy-world caches whose key matches the world's: one with a garbage teacher, one with a broken world.json
    key = toy.TrainSettings().key()
    good = {"key": key, "train_seconds": 1.0, "final_loss": 0.1, "losses": [0.1]}
    for name, teacher, info in (("garbage-cache", b"\x00" * 4096, json.dumps(good)),
                                ("broken-cache", None, '{"key": '),
                                ("keyless-cache", None, json.dumps(dict(good, key=None))),  # would be trained over
                                ("nan-cache", None, json.dumps(dict(good, final_loss=float("nan")))),
                                ("folder-cache", "folder", json.dumps(good))):
        cache = r / name
        cache.mkdir()
        save_file(toy.encoder_state(toy.make_encoders()), str(cache / "text_encoders.safetensors"))
        mmdit.save_mmdit(mmdit.MMDiT(toy.TEACHER_CONFIG), str(cache / "weak.safetensors"))
        if teacher is None:
            mmdit.save_mmdit(mmdit.MMDiT(toy.TEACHER_CONFIG), str(cache / "teacher.safetensors"))
        elif teacher == "folder":
            (cache / "teacher.safetensors").mkdir()
        else:
            (cache / "teacher.safetensors").write_bytes(teacher)
        (cache / "world.json").write_text(info)
    return r


def snapshot(folder):
    """{file: sha256, folder: None} of everything under folder."""
    out = {}
    for d, dirs, names in os.walk(folder):
        out.update({os.path.relpath(os.path.join(d, n), folder): None for n in dirs})
        for n in names:
            path = os.path.join(d, n)
            if not os.path.islink(path) and not os.path.isfile(path):  # a FIFO: never opened (it would block)
                out[os.path.relpath(path, folder)] = "special"
            elif not os.path.islink(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_script(script, argv, monkeypatch, capsys):
    """`python SCRIPT ARGV` in this process: (exit status, stderr lines, stdout). A command that
    finishes (no SystemExit) fails the test: every case here must be refused."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        if script.endswith(".py"):  # a top-level script
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
        else:  # a command one folder down: python -m sd3.lora
            runpy.run_module(script, run_name="__main__", alter_sys=True)
    captured = capsys.readouterr()
    return e.value.code, captured.err.strip().splitlines(), captured.out


# -----------------------------------------------------------------------------
# The cases: (issue item, script, arguments, exit status, words of the message, refused before heavy work?)

CASES = [
    # 1. outputs never replace inputs
    ("1", "sd3.lora", ["merge", "--base", "{r}/base.safetensors", "--lora", "{r}/lora.safetensors", "--out",
                      "{r}/base.safetensors"], 2, ["--out", "is --base", "base.safetensors"], True),
    ("1", "sd3.lora", ["merge", "--base", "{r}/base.safetensors", "--lora", "{r}/lora.safetensors", "--out",
                      "{r}/base-link.safetensors"], 2, ["--out", "is --base"], True),
    ("1", "sd3.vae", ["--vae", "{r}/vae.safetensors", "--image", "{r}/imgs/000.png", "--out", "{r}/imgs/000.png",
                     "--size", "16"], 2, ["--out", "is --image"], True),
    ("1", "generate.py", ["--toy", "--prompts", "{r}/gen/index.jsonl", "--out", "{r}/gen"], 2,
     ["--out", "index.jsonl", "is --prompts"], True),
    ("1", "evaluate.py", ["score", "--metric", "clip", "--clip", "{r}/clip", "--images", "{r}/imgs", "--prompts",
                          "{r}/two.txt", "--out", "{r}/two.txt"], 2, ["--out", ".json"], True),
    ("1", "distill.py", ["--teacher", "{r}/run/student.safetensors", "--data", "{r}/data", "--teacher-sampler", "cfg",
                         "--out", "{r}/run"], 2, ["--out", "student.safetensors", "is --teacher"], True),
    ("1", "evaluate.py", ["score", "--metric", "clip", "--clip", "{r}/clip", "--images", "{r}/imgs", "--prompts",
                          "{r}/two.txt", "--out", "{r}/clip/config.json"], 2, ["--out", "inside --clip"], True),
    ("1", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--toy-cache", "{r}/clip", "--out", "{r}/clip/g"], 2,
     ["--out", "inside --toy-cache"], True),
    # 2. no silent wrong result
    ("2", "evaluate.py", ["fid", "{r}/nan.npz", "{r}/ok.npz"], 2, ["nan.npz", "non-finite"], True),
    ("2", "evaluate.py", ["fid", "{r}/ok.npz", "{r}/negative.npz"], 2, ["negative.npz", "negative eigenvalue -1"],
     True),
    ("2", "sd3.lora", ["merge", "--base", "{r}/nan.safetensors", "--lora", "{r}/lora.safetensors", "--out",
                      "{r}/out/merged.safetensors"], 2, ["nan.safetensors", "non-finite"], False),
    ("2", "generate.py", ["--toy", "--prompts", "{r}/prompts.json", "--out", "{r}/out/g"], 2,
     ["prompts.json", "entry 1 is null, not a string"], True),
    ("2", "prepare.py", ["--captions", "{r}/missing.jsonl", "--vae", "{r}/vae.safetensors", "--out", "{r}/out/p",
                         "--resolution", "16"], 2, ["--captions", "none of its 3 images"], True),
    ("2", "evaluate.py", ["speed", "--out", "{r}/out/"], 2, ["--out", "not a folder"], True),
    ("2", "evaluate.py", ["plot-sweep", "{r}/sweep.json", "--metric", "hps", "--out", "{r}/out/x.txt"], 2,
     ["--out", ".png"], True),
    ("2", "sd3.lora", ["count", "--rank", "100000000"], 2, ["--rank 100000000", "at most 1536"], True),
    ("2", "toy.py", ["--cache-dir", "{r}/garbage-cache"], 2, ["garbage-cache/teacher.safetensors", "delete"], True),
    ("2", "toy.py", ["--cache-dir", "{r}/keyless-cache"], 2, ["keyless-cache/world.json", "\"key\"", "delete"], True),
    ("2", "toy.py", ["--cache-dir", "{r}/nan-cache"], 2, ["nan-cache/world.json", "not all finite", "delete"], True),
    ("2", "toy.py", ["--cache-dir", "{r}/folder-cache"], 2, ["folder-cache/teacher.safetensors is not a file"], True),
    ("2", "mmdit.py", ["{r}/wrong.safetensors"], 2, ["wrong.safetensors", "shapes", "fc2.weight"], True),
    ("2", "mmdit.py", ["{r}/nan.safetensors"], 2, ["nan.safetensors", "non-finite"], True),
    ("2", "sd3.lora", ["merge", "--base", "{r}/other.safetensors", "--lora", "{r}/lora.safetensors", "--out",
                      "{r}/out/merged.safetensors"], 2, ["lora.safetensors was trained over another base than --base",
                                                         "other.safetensors"], True),
    ("2", "mmdit.py", ["{r}/int8.safetensors"], 2, ["int8.safetensors", "is I8, not floating point"], True),
    ("2", "sd3.lora", ["merge", "--base", "{r}/base.safetensors", "--lora", "{r}/lora-int8.safetensors", "--out",
                      "{r}/out/merged.safetensors"], 2, ["lora-int8.safetensors", "I8, not floating point"], True),
    ("2", "sd3.lora", ["merge", "--base", "{r}/int8.safetensors", "--lora", "{r}/lora.safetensors", "--out",
                      "{r}/out/merged.safetensors"], 2, ["int8.safetensors", "I8, not floating point"], True),
    ("2", "sd3.vae", ["--vae", "{r}/vae-u8.safetensors", "--image", "{r}/imgs/000.png", "--out", "{r}/out/rt.png",
                     "--size", "16"], 2, ["vae-u8.safetensors", "U8, not floating point"], True),
    ("2", "prepare.py", ["--captions", "{r}/number-caption.jsonl", "--images", "{r}/captioned", "--vae",
                         "{r}/vae.safetensors", "--out", "{r}/out/p", "--resolution", "16"], 2,
     ["number-caption.jsonl line 1", "caption is 5, not a string"], True),
    ("2", "prepare.py", ["--captions", "{r}/empty-caption.jsonl", "--images", "{r}/captioned", "--vae",
                         "{r}/vae.safetensors", "--out", "{r}/out/p", "--resolution", "16"], 2,
     ["empty-caption.jsonl line 1", "caption of c0.png is empty"], True),
    ("2", "sd3.vae", ["--vae", "{r}/vae.safetensors", "--image", "{r}/fifo/image.png", "--out", "{r}/out/rt.png",
                     "--size", "16"], 2, ["--image", "fifo/image.png", "not a regular file"], True),
    ("2", "prepare.py", ["--images", "{r}/fifo", "--vae", "{r}/vae.safetensors", "--out", "{r}/out/p",
                         "--resolution", "16"], 2, ["fifo/image.png", "not a regular file"], True),
    ("2", "generate.py", ["--toy", "--prompts", "{r}/fifo/prompts.txt", "--out", "{r}/out/g"], 2,
     ["fifo/prompts.txt", "not a regular file"], True),
    ("2", "evaluate.py", ["score", "--metric", "clip", "--clip", "{r}/clip", "--images", "{r}/zero", "--prompts",
                          "{r}/two.txt"], 2, ["zero/b.png is not a readable image"], True),
    ("2", "evaluate.py", ["score", "--metric", "aesthetic", "--clip", "{r}/clip", "--aesthetic",
                          "{r}/png.safetensors", "--images", "{r}/imgs"], 2,
     ["--aesthetic", "png.safetensors", "not a readable safetensors file"], True),
    ("2", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--out", "{r}/gendir"], 2,
     ["gendir/index.jsonl is a folder"], True),
    ("2", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--method", "student", "--student",
                          "{r}/nan-toy.safetensors", "--out", "{r}/out/g"], 2,
     ["nan-toy.safetensors", "final_layer.linear.bias holds non-finite values"], True),
    ("2", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--method", "student", "--student",
                          "{r}/nan-scale.safetensors", "--out", "{r}/out/g"], 2,
     ["nan-scale.safetensors", "teefusion_scale metadata is 'nan'"], True),
    ("4", "distill.py", ["--teacher", "{r}/base.safetensors", "--data", "{r}/data-outside", "--teacher-sampler",
                         "cfg", "--out", "{r}/out/d"], 2, ["index.json names the shard file", "../data/"], True),
    ("4", "toy.py", ["--cache-dir", ""], 2, ["--cache-dir '': give a folder"], True),
    ("4", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--out", ""], 2, ["--out '': give a folder"], True),
    ("4", "evaluate.py", ["convert-hps", "{r}/imgs/000.png", "--tokenizer", "{r}/clip", "--out", "{r}/out/hps"], 2,
     ["000.png: not a torch checkpoint"], False),
    ("4", "evaluate.py", ["convert-hps", "{r}/x.ckpt", "--tokenizer", "{r}/nowhere", "--out", "{r}/out/hps"], 2,
     ["--tokenizer", "nowhere", "not a folder"], True),
    ("4", "sd3.export", ["--card", "{r}/imgs/000.png"], 2, ["--card", "000.png: not a student file"], True),
    ("4", "distill.py", ["--out", "{r}/out/d", "--global-batch", "0"], 2, ["--global-batch 0: must be >= 1"], True),
    ("4", "distill.py", ["--out", "{r}/out/d", "--tau", "abc"], 2, ["--tau abc", "an offset >= 0"], True),
    ("4", "distill.py", ["--out", "{r}/out/d", "--steps", "100000000000000000000"], 2,
     ["--seed 0", "use a smaller --seed, --steps or --global-batch"], True),
    ("4", "distill.py", ["--teacher", "/dev/null", "--data", "{r}/imgs", "--teacher-sampler", "cfg", "--out",
                         "{r}/out/d"], 2, ["/dev/null", "not a regular file"], True),
    # 3. upper bounds from the model and from memory, before allocating
    ("3", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--n-per-prompt", "1000000", "--batch", "1000000",
                          "--out", "{r}/out/g"], 2, ["--batch (or --n-per-prompt)", "MMDiT hidden state", "GB"], True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--shift", "1e300"], 2, ["--shift 1e+300", "<= 100"], True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--shift", "1e-300"], 2, ["--shift 1e-300", ">= 0.01"], True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--lr", "1e300"], 2, ["--lr 1e+300", "<= 1"], True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--weight-decay", "1e300"], 2, ["--weight-decay", "1 / --lr"], True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--teacher-steps", "100000000"], 2, ["--teacher-steps", "<= 1000"],
     True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--w-max", "1e300"], 2, ["--w-max 1e+300", "<= 1000"], True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--workers", "100000"], 2, ["--workers 100000", "per CPU"], True),
    ("3", "distill.py", ["--out", "{r}/out/d", "--global-batch", "100000000"], 2,
     ["--micro-batch (or --global-batch)", "needs at least"], True),
    ("3", "prepare.py", ["--images", "{r}/captioned", "--vae", "{r}/vae.safetensors", "--out", "{r}/out/p",
                         "--resolution", "100000"], 2, ["--resolution or --batch-size", "needs at least", "TB"], True),
    ("3", "prepare.py", ["--captions", "{r}/many.jsonl", "--images", "{r}/captioned", "--vae", "{r}/vae.safetensors",
                         "--out", "{r}/out/p", "--text-encoders", "{r}/encoders", "--shard-size", "1000000000",
                         "--resolution", "16"], 2, ["--shard-size", "a shard of 10000 samples", "27.3 GB"], True),
    ("3", "sd3.vae", ["--vae", "{r}/vae.safetensors", "--image", "{r}/imgs/000.png", "--out", "{r}/out/rt.png",
                     "--size", "100000"], 2, ["--size", "needs at least", "GB"], True),
    ("3", "benchmarks/bench_mmdit.py", ["--res", "100000"], 2, ["--res 100000", "at most 3072"], True),
    ("3", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--n-per-prompt", "10000000000000", "--out", "{r}/out/g"],
     2, ["--n-per-prompt", "needs at least"], True),
    ("3", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--steps", "100000000000", "--out", "{r}/out/g"], 2,
     ["--steps", "schedule of 100000000000 steps"], True),
    # 4. refused before the heavy work
    ("4", "evaluation.toy_report", ["--student", "{r}/logged/student.safetensors", "--out", "{r}/out/rep",
                                    "--cache-dir", "{r}/out/no-cache"], 2,
     ["logged/log.jsonl line 3", "loss is null, not a finite number"], True),
    ("4", "evaluation.toy_report", ["--student", "{r}/x.ckpt", "--cache-dir", "{r}/out/no-cache"], 2,
     ["x.ckpt", "refusing a pickle"], True),
    ("4", "evaluation.toy_report", ["--student", "{r}/base.safetensors", "--cache-dir", "{r}/out/no-cache"], 2,
     ["--student", "base.safetensors", "not a toy-world network"], True),
    ("4", "generate.py", ["--model", "{r}/wrong.safetensors", "--text-encoders", "{r}/encoders", "--vae",
                          "{r}/vae.safetensors", "--prompt", "a cat", "--res", "64", "--out", "{r}/out/g"], 2,
     ["wrong.safetensors", "shapes"], True),
    ("4", "distill.py", ["--w-min", "nan", "--out", "{r}/out/d"], 2, ["--w-min nan", "finite"], True),
    ("4", "distill.py", ["--w-max", "inf", "--out", "{r}/out/d"], 2, ["--w-max inf", "finite"], True),
    ("4", "distill.py", ["--lr", "-1", "--out", "{r}/out/d"], 2, ["--lr -1", "> 0"], True),
    ("4", "distill.py", ["--lr", "nan", "--out", "{r}/out/d"], 2, ["--lr nan"], True),
    ("4", "distill.py", ["--teacher", "{r}/base.safetensors", "--data", "{r}/data", "--teacher-sampler", "cfg",
                         "--out", "{r}/out/d"], 2, ["--data", "does not fit --teacher", "context 12"], True),
    ("4", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--method", "w2sd", "--strong-scale", "nan", "--out",
                          "{r}/out/g"], 2, ["--strong-scale nan"], True),
    ("4", "evaluate.py", ["score", "--metric", "clip", "--clip", "{r}/clip", "--images", "{r}/imgs", "--prompts",
                          "{r}/two.txt", "--batch", "0"], 2, ["--batch 0"], True),
    ("4", "evaluate.py", ["score", "--metric", "clip", "--clip", "{r}/clip", "--images", "{r}/imgs", "--prompts",
                          "{r}/two.txt", "--batch", "-1"], 2, ["--batch -1"], True),
    ("4", "evaluate.py", ["table4", "--toy", "--methods", "cfg", "--prompt", TOY_PROMPT, "--grid-prompts", "0",
                          "--out", "{r}/out/t4"], 2, ["--grid-prompts 0"], True),
    ("4", "generate.py", ["--model", "{r}/base.safetensors", "--text-encoders", "{r}/encoders", "--vae",
                          "{r}/vae.safetensors", "--prompt", "a cat", "--res", "0", "--out", "{r}/out/g"], 2,
     ["--res 0", "positive multiple of 16"], True),
    ("4", "generate.py", ["--model", "{r}/base.safetensors", "--text-encoders", "{r}/encoders", "--vae",
                          "{r}/vae.safetensors", "--prompt", "a cat", "--res", "-64", "--out", "{r}/out/g"], 2,
     ["--res -64"], True),
    ("4", "generate.py", ["--model", "{r}/base.safetensors", "--text-encoders", "{r}/encoders", "--vae",
                          "{r}/vae.safetensors", "--prompt", "a cat", "--res", "32", "--out", "{r}/out/g"], 2,
     ["--vae", "vae.safetensors", "16 channels", "takes 4"], True),
    ("4", "generate.py", ["--model", "{r}/base.safetensors", "--text-encoders", "{r}/encoders", "--vae",
                          "{r}/base.safetensors", "--prompt", "a cat", "--res", "32", "--out", "{r}/out/g"], 2,
     ["base.safetensors"], True),
    ("4", "evaluation.toy_study", ["rounding", "--student", "{r}/nan-scale.safetensors", "--ws", "nan"], 2,
     ["--ws must be finite"], True),
    ("4", "evaluation.toy_study", ["runs", "--config", "teefusion::::1e400", "--out", "{r}/out/study"], 2,
     ["--config 'teefusion::::1e400'", "the lr inf"], True),
    ("4", "evaluate.py", ["speed", "--res", "0", "--out", "{r}/out/speed"], 2, ["--res 0"], True),
    ("4", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--seed", str(2**64 - 1), "--n-per-prompt", "2", "--out",
                          "{r}/out/g"], 2, ["--seed 18446744073709551615", "2**64 - 1"], True),
    ("4", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--device", "cuda", "--out", "{r}/out/g"], 2,
     ["--device cuda"], True),
    ("4", "generate.py", ["--toy", "--prompt", TOY_PROMPT, "--device", "tpu9", "--out", "{r}/out/g"], 2,
     ["--device 'tpu9'"], True),
    ("4", "distill.py", ["--device", "cuda", "--out", "{r}/out/d"], 2, ["--device cuda"], True),
    ("4", "distill.py", ["--device", "tpu9", "--out", "{r}/out/d"], 2, ["--device 'tpu9'"], True),
    ("4", "evaluate.py", ["speed", "--device", "tpu9", "--out", "{r}/out/speed"], 2, ["--device 'tpu9'"], True),
    ("4", "prepare.py", ["--images", "{r}/captioned", "--vae", "{r}/vae.safetensors", "--out", "{r}/out/p",
                         "--device", "cuda:3"], 2, ["--device cuda:3"], True),
    ("4", "sd3.vae", ["--vae", "{r}/vae.safetensors", "--image", "{r}/imgs/000.png", "--out", "{r}/out/rt.png",
                     "--device", "tpu9"], 2, ["--device 'tpu9'"], True),
    # 7. messages that name the file or flag
    ("7", "evaluate.py", ["plot-sweep", "{r}/sweep.json", "--metric", "clip", "--out", "{r}/out/s.png"], 2,
     ["no 'clip' values"], True),
    ("7", "evaluate.py", ["plot-loss", "{r}/log.jsonl", "--key", "score", "--out", "{r}/out/l.png"], 2,
     ["log.jsonl", "'score'"], True),
    ("7", "generate.py", ["--toy", "--prompts", "{r}/latin1.txt", "--out", "{r}/out/g"], 2,
     ["latin1.txt", "not UTF-8"], True),
    ("7", "generate.py", ["--toy", "--prompts", "{r}/broken.json", "--out", "{r}/out/g"], 2,
     ["broken.json", "not valid JSON", "line 1"], True),
    ("7", "prepare.py", ["--images", "{r}/latin1-captions", "--vae", "{r}/vae.safetensors", "--out", "{r}/out/p"], 2,
     ["a.txt", "not UTF-8"], True),
    ("7", "toy.py", ["--cache-dir", "{r}/broken-cache"], 2, ["world.json", "not valid JSON"], True),
    ("7", "evaluate.py", ["fid", "{r}/truncated.npz", "{r}/ok.npz"], 2, ["truncated.npz", "not a readable zip"], True),
    ("7", "evaluate.py", ["fid", "{r}/pickle.npz", "{r}/ok.npz"], 2, ["pickle.npz", "'mu' and 'sigma'"], True),
    ("7", "toy.py", ["--cache-dir", "{r}/two.txt"], 2, ["--cache-dir", "two.txt is a file, not a folder"], True),
    ("7", "sd3.lora", ["merge", "--base", "{r}/base.safetensors", "--lora", "{r}/lora.safetensors", "--out",
                      "{r}/folder.safetensors"], 2, ["--out", "folder.safetensors is a folder"], True),
    ("7", "sd3.lora", ["merge", "--base", "{r}/base.safetensors", "--lora", "{r}/lora.safetensors", "--out",
                      "{r}/two.txt/merged.safetensors"], 2, ["--out", "two.txt is a file, not a folder"], True),
    ("7", "sd3.lora", ["count", "--rank", "0"], 2, ["--rank 0"], True),
    # 8. the benchmarks keep the convention
    ("8", "benchmarks/bench_mmdit.py", ["--depth", "0"], 2, ["--depth 0"], True),
    ("8", "benchmarks/bench_samplers.py", ["--tokens", "0", "--steps", "2", "--repeats", "1"], 2, ["--tokens 0"],
     True),
    ("8", "benchmarks/bench_samplers.py", ["--device", "cuda"], 2, ["--device cuda"], True),
    ("8", "benchmarks/memory_generate.py", ["--res", "-1024"], 2, ["--res -1024"], True),
    ("8", "benchmarks/bench_memory.py", ["--lora", "0", "--quick"], 2, ["--lora 0"], True),
    ("8", "benchmarks/bench_memory.py", ["--quick", "--json", "{r}/imgs"], 2, ["--json", "imgs is a folder"], True),
]


@pytest.mark.parametrize("item, script, argv, status, words, before", CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_careless_input(root, item, script, argv, status, words, before, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # a command's default outputs would land here
    # the same memory on every machine: 8 GB free (the bounds of the cases are far beyond it, or just so)
    monkeypatch.setattr(cli, "available_memory", lambda device="cpu": (8 * 10**9, "available RAM"))
    if before:
        for owner, name in HEAVY:
            monkeypatch.setattr(owner, name, heavy)
    argv = [a.format(r=root) for a in argv]
    files = snapshot(root)
    code, err, out = run_script(script, argv, monkeypatch, capsys)
    assert code == status and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert "Traceback" not in err[0] and 'missing key "' not in err[0]
    assert out == "" or not out.lstrip().startswith("{"), out  # no result printed
    assert snapshot(root) == files  # nothing written, nothing overwritten
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# Failures during the work that would have ended with a wrong result: exit status 1, nothing written


def test_prepare_writes_no_index_of_nothing(root, tmp_path, monkeypatch, capsys):
    """Every image unreadable, or every read failing for want of memory: exit status 1 and no
    index.json (a data set of 0 samples is no data set); a MemoryError is no fault of an image."""
    out = tmp_path / "shards"
    argv = ["--images", f"{root}/unreadable", "--vae", f"{root}/vae.safetensors", "--out", str(out), "--resolution",
            "16", "--workers", "0"]
    code, err, _ = run_script("prepare.py", argv, monkeypatch, capsys)
    assert code == 1 and "error: none of the 2 images could be read" in err[-1] and "u0.png" in err[-1]
    assert not (out / "index.json").exists()

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(vae, "load_image", no_memory)
    argv = ["--images", f"{root}/imgs", "--vae", f"{root}/vae.safetensors", "--out", str(tmp_path / "mem"),
            "--resolution", "16", "--workers", "0"]
    for k in range(2):
        (root / "imgs" / f"{k:03d}.txt").write_text("a caption")
    try:
        code, err, _ = run_script("prepare.py", argv, monkeypatch, capsys)
    finally:
        for k in range(2):
            (root / "imgs" / f"{k:03d}.txt").unlink()
    assert code == 1 and err[-1].endswith("error: MemoryError")  # after the progress bar's line
    assert not (tmp_path / "mem" / "index.json").exists()


def test_non_finite_images_name_the_guidance(root, tmp_path, monkeypatch, capsys):
    """--w 1e30 in float32: the guided velocity overflows; the message says so, not "try --dtype fp32"."""
    world = toy.build_world(cache_dir=str(tmp_path / "world"), progress=False,
                            settings=toy.TrainSettings(steps=20, weak_step=10))
    monkeypatch.setattr(toy, "build_world", lambda **kw: world)
    argv = ["--toy", "--prompt", TOY_PROMPT, "--w", "1e30", "--steps", "4", "--out", str(tmp_path / "g")]
    code, err, _ = run_script("generate.py", argv, monkeypatch, capsys)
    assert code == 1 and "w = 1e+30, float32" in err[-1] and "smaller --w" in err[-1] and "--dtype fp32" not in err[-1]
    assert not any(n.endswith(".png") for _, _, names in os.walk(tmp_path / "g") for n in names)


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}])
def test_a_stray_rank_setting_is_refused(tmp_path, env):
    """RANK or WORLD_SIZE alone in the environment (a leftover of another job), or a rank beyond the world:
    one line naming the variables, exit 2, nothing written; it used to wait for ranks or fail in torch."""
    for script in ("distill.py", "generate.py"):
        extra = ["--fsdp", "--steps", "1"] if script == "distill.py" else ["--toy", "--prompt", TOY_PROMPT]
        out = tmp_path / script
        r = subprocess.run([sys.executable, script, "--out", str(out), *extra], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
        assert all(f"{k}=" in lines[0] for k in env) and not out.exists(), lines[0]


def test_lora_merge_over_its_base_in_another_precision(root, tmp_path):
    """The adapter's record of its base (lora.base_probe) is compared within bf16's rounding: the same
    base saved in bf16 merges (another network is refused: CASES)."""
    out = tmp_path / "merged.safetensors"
    args = argparse.Namespace(command="merge", base=str(root / "base-bf16.safetensors"), lora=str(root / "lora.safetensors"),
                              out=str(out), dtype="fp32")
    assert lora.main(args) == str(out)
    assert out.is_file()


def test_lora_merge_leaves_its_base_whole(root, tmp_path):
    """The data-loss case end to end, as a user runs it: `python -m sd3.lora merge --out BASE` is refused with one
    line and exit status 2, and the base is byte for byte what it was."""
    base = tmp_path / "base.safetensors"
    base.write_bytes((root / "base.safetensors").read_bytes())
    before = base.read_bytes()
    r = subprocess.run([sys.executable, "-m", "sd3.lora", "merge", "--base", str(base), "--lora", str(root / "lora.safetensors"),
                        "--out", str(base)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"error: --out {base} is --base {base}") and r.stdout == ""
    assert base.read_bytes() == before and os.listdir(tmp_path) == ["base.safetensors"]


# -----------------------------------------------------------------------------
# The shared checks themselves (run/cli.py), against what they stand for


def test_json_text_refuses_non_finite_results():
    assert json.loads(cli.json_text({"fid": 1.5, "rows": [1, 2.0]})) == {"fid": 1.5, "rows": [1, 2.0]}
    for bad, where in (({"fid": float("nan")}, "fid = nan"), ({"rows": [{"hps": float("inf")}]}, "rows[0].hps = inf")):
        with pytest.raises(cli.Failure, match=rf"non-finite numbers \({where.replace('[', '.').replace(']', '.')}"):
            cli.json_text(bad)
    assert cli.exit_status(cli.Failure("x")) == 1


def test_memory_check_against_what_there_is(monkeypatch):
    free, source = cli.available_memory("cpu")
    assert free is None or free > 0
    monkeypatch.setattr(cli, "available_memory", lambda device="cpu": (10**9, "available RAM"))
    assert cli.check_memory(10**9, "x", "--res") == 10**9
    with pytest.raises(cli.InputError, match=r"--res: images of 2048 px needs at least 2 GB, more than the 1 GB "
                                             r"there is \(available RAM\); lower --res"):
        cli.check_memory(2 * 10**9, "images of 2048 px", "--res")


def test_reading_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, }')
    with pytest.raises(cli.InputError, match=r"a.json: not valid JSON \(line 1, column 11"):
        cli.read_json(str(tmp_path / "a.json"))
    (tmp_path / "b.txt").write_bytes(b"ok \xff")
    with pytest.raises(cli.InputError, match=r"b.txt: not UTF-8 text \(byte 0xff at offset 3\)"):
        cli.read_text(str(tmp_path / "b.txt"))
    with pytest.raises(cli.InputError, match=r"c.npz: not a readable zip"), cli.reading("c.npz"):
        zipfile.ZipFile(str(tmp_path / "b.txt"))
    with pytest.raises(cli.InputError, match=r"d.json: missing key 'shards'"), cli.reading("d.json"):
        {}["shards"]
    err = cli.MissingKey("log: x.jsonl has no rows with 'step'")  # a KeyError, printed as written, exit status 2
    assert isinstance(err, KeyError) and cli.one_line(err) == str(err) and cli.exit_status(err) == 2


def test_seed_and_number_bounds():
    assert cli.check_seed(2**64 - 2, largest=2**64 - 1) == 2**64 - 2
    torch.Generator().manual_seed(cli.SEED_MAX)  # the bound is torch's own
    with pytest.raises(ValueError):
        torch.Generator().manual_seed(cli.SEED_MAX + 1)
    with pytest.raises(cli.InputError, match="--seed 5: seed \\+ k = 18446744073709551616 is beyond"):
        cli.check_seed(5, largest=2**64, how="seed + k")
    with pytest.raises(cli.InputError, match="--seed -1: must be >= 0"):
        cli.check_seed(-1)
    assert cli.finite(0.5, "--lr", low=0, low_open=True) == 0.5
    for value in (0.0, float("nan"), float("inf"), -1e-3):
        with pytest.raises(cli.InputError, match=r"--lr .*: must be > 0, a finite number"):
            cli.finite(value, "--lr", low=0, low_open=True)
    assert cli.check_device("cpu") == torch.device("cpu") and cli.check_device(None) is None
    for bad in ("meta", "gpu", ""):
        with pytest.raises(cli.InputError, match="--device"):
            cli.check_device(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    """checkpoint.all_finite (one aminmax pass), the loaders' check, against torch.isfinite(t).all()."""
    g = torch.Generator().manual_seed(0)
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        for n in (1, 7, 1000):
            t = torch.randn(n, generator=g).to(dtype)
            if bad is not None:
                t[int(torch.randint(n, (1,), generator=g))] = bad
            assert checkpoint.all_finite(t) == bool(torch.isfinite(t).all()) == (bad is None)
    assert checkpoint.all_finite(torch.zeros(0)) and checkpoint.all_finite(torch.arange(3))
