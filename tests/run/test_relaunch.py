"""
The relaunch rule (run/relaunch.py, run/final_files.py, run/image_folder.py; the test hook of sd3/checkpoint.py): every
command that writes files, killed with SIGKILL AT A CHOSEN WRITE (TEEFUSION_KILL_AT_WRITE, after the
temporary file is filled and before it is renamed) and launched again with the same argv until it exits
0, leaves what an uninterrupted run leaves: the same bytes, or for a safetensors file the same tensors
bit for bit and the same metadata (`same_file`), the measured seconds of PNGs and reports aside; relaunched once finished, it says so, exits 0 and changes nothing; the
temporary files a kill left are removed. Also: truncated and empty PNGs are made again; generate.py and
evaluate.py table4 under torchrun (2 gloo ranks) make the same images, index and scores as one process.

    python -m pytest -q tests/run/test_relaunch.py
"""

import argparse
import functools
import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import save_file

from sd3 import checkpoint
from run import cli
import distill
import evaluate
import generate
from run import image_folder
from sd3 import lora
from run import options
from run import relaunch
import toy
from evaluation import toy_report
from mmdit import CONFIGS, MMDiT, save_mmdit
from test_distill import REPO, listing, make_shards, make_teacher, processes_writing
from test_generate import pipeline  # noqa: F401  (the tiny SD3 pipeline fixture: text encoders, MMDiT, VAE)
from test_toy_report import TINY, save_student

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(argv, kill=None, timeout=240):
    """Run argv (in the repository, one thread, in a session of its own: a timeout kills it whole) with
    TEEFUSION_KILL_AT_WRITE set to `kill`; it must die by SIGKILL when kill is given (the chosen write
    happened), else exit 0. Returns (stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != checkpoint.KILL_AT_WRITE}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, **({checkpoint.KILL_AT_WRITE: kill} if kill else {}))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == (-signal.SIGKILL if kill else 0), (kill, proc.returncode, out[-3000:], err[-3000:])
    return out, err


def lives(argv, kills, timeout=240):
    """The same argv launched once per entry of kills, killed at that write, then once more to the end:
    [(stdout, stderr)] of every launch."""
    return [launch(argv, kill, timeout) for kill in [*kills, None]]


def in_process(script, argv, monkeypatch):
    """A command line run in this process (the script's `if __name__ == "__main__":` block, through runpy):
    the uninterrupted and the finished runs, which need no kill, without the cost of a new process."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    if script.endswith(".py"):  # a top-level script
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    else:  # a command one folder down: python -m sd3.lora
        runpy.run_module(script, run_name="__main__", alter_sys=True)


def temporaries(out):
    return checkpoint.temporaries(str(out), recursive=True)


def same_file(a, b):
    """The same file, byte for byte; a safetensors file: the same tensors bit for bit and the same metadata
    (safetensors' writer orders the metadata in its header differently in each process, so two processes
    never write the same bytes)."""
    if not str(a).endswith(".safetensors"):
        return open(a, "rb").read() == open(b, "rb").read()
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return fa.metadata() == fb.metadata() and list(fa.keys()) == list(fb.keys()) and all(
            torch.equal(fa.get_tensor(k), fb.get_tensor(k)) and fa.get_tensor(k).dtype == fb.get_tensor(k).dtype
            for k in fa.keys())


def sizes(record):
    """final.json's parts, each file with its size (the SHA-256 differs where the metadata order does), but
    for the model cards (README.md), whose loading commands name the run's own folder: see same_cards."""
    return {part: {f: r["size"] for f, r in files.items() if not f.endswith("README.md")}
            for part, files in record["parts"].items()}


def same_cards(a, b):
    """The model cards of runs a and b (README.md, and diffusers/README.md where exported) say the same
    once each run's folder is written as OUT."""
    names = [n for n in ("README.md", "diffusers/README.md") if (a / n).exists() or (b / n).exists()]
    return bool(names) and all((a / n).read_text().replace(str(a), "OUT") == (b / n).read_text().replace(str(b), "OUT")
                               for n in names)


# -----------------------------------------------------------------------------
# The test hook, and the record


def test_the_hook_kills_at_the_chosen_write_and_the_old_file_survives(tmp_path):
    """TEEFUSION_KILL_AT_WRITE="2:a.json": killed at the second write of a.json (the writes of b.json do not
    count), before the rename: a.json holds the first write, its temporary is left, and removing the
    temporaries of a.json (owned) leaves b.json's alone."""
    code = ("import sys\nfrom sd3 import checkpoint\n"
            "for i in range(3):\n"
            "    checkpoint.atomic_json({'i': i}, sys.argv[1] + '/b.json')\n"
            "    checkpoint.atomic_json({'i': i}, sys.argv[1] + '/a.json')\n")
    launch([sys.executable, "-c", code, str(tmp_path)], "2:a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"i": 0}
    assert json.loads((tmp_path / "b.json").read_text()) == {"i": 1}
    left = checkpoint.temporaries(str(tmp_path))
    assert len(left) == 1 and os.path.basename(left[0]).startswith("a.json.tmp-")
    (tmp_path / "b.json.tmp-zz1").write_text("{")
    assert checkpoint.remove_temporaries(str(tmp_path), owned=lambda n: n == "a.json") == left
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json", "b.json.tmp-zz1"]


def test_a_record_trusts_only_intact_files_of_the_same_inputs(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"

    def put(path, data):
        path.write_bytes(data)
        return [str(path)]

    record = relaunch.Record(str(tmp_path), "done.json", {"of": 1})
    assert record.write("one", lambda: put(a, b"x" * 10)) is True
    assert record.write("one", lambda: pytest.fail("written twice")) is False
    record.write("two", lambda: put(b, b"y" * 10))
    on_disk = json.loads((tmp_path / "done.json").read_text())
    assert on_disk == {"of": {"of": 1}, "parts": {"one": {"a.bin": {"size": 10, "sha256": hashlib.sha256(b"x" * 10).hexdigest()}},
                                                  "two": {"b.bin": {"size": 10, "sha256": hashlib.sha256(b"y" * 10).hexdigest()}}}}
    assert relaunch.Record(str(tmp_path), "done.json", {"of": 1}).finished(["one", "two"])
    assert not relaunch.Record(str(tmp_path), "done.json", {"of": 2}).finished(["one"])  # other inputs: nothing
    b.write_bytes(b"z" * 10)  # the same size, other bytes
    again = relaunch.Record(str(tmp_path), "done.json", {"of": 1})
    assert again.done("one") and not again.done("two") and not again.finished(["one", "two"])
    a.unlink()
    assert not relaunch.Record(str(tmp_path), "done.json", {"of": 1}).done("one")


# -----------------------------------------------------------------------------
# distill.py: the final files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("relaunch")
    return {"teacher": make_teacher(root / "teacher.safetensors"), "data": make_shards(root / "data")}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """test_toy_report's tiny toy world (20 teacher steps)."""
    return toy.build_world(str(tmp_path_factory.mktemp("toy")), progress=False, settings=TINY)


def distill_argv(tiny, out, *extra):
    return ["--teacher", tiny["teacher"], "--data", tiny["data"], "--out", str(out), "--no-progress", "--device", "cpu",
            "--teacher-sampler", "cfg", "--global-batch", "2", "--steps", "3", "--ckpt-every", "3", *extra]


FINAL = ["student.safetensors", "student-ema.safetensors", os.path.join("diffusers", "transformer", "config.json"),
         os.path.join("diffusers", "transformer", "diffusion_pytorch_model.safetensors")]


def test_distill_killed_at_its_final_writes_finishes_bitwise(tiny, tmp_path, capsys):
    """Killed while writing student-ema.safetensors (the student is there), then killed again after the
    diffusers export was written but before final.json recorded it; the third launch removes the
    temporaries, writes what is missing and exits 0: every final file equals an uninterrupted run's, byte
    for byte (final.json lists the same sizes and SHA-256). Relaunched again: one line, nothing written.
    The issue's case: a final file deleted, relaunched: written again, the others untouched."""
    extra = ("--ema", "0.9", "--export-diffusers", "--lr", "1e-3")
    whole = tmp_path / "whole"
    distill.main(options.parse_args(distill_argv(tiny, whole, *extra)))
    out = tmp_path / "killed"
    argv = [sys.executable, "distill.py", *distill_argv(tiny, out, *extra, "--resume")]
    runs = lives(argv, [f"1:{out}/student-ema.safetensors", "2:final.json"])
    assert "removed 1 temporary file(s) left by a killed run" in runs[1][0] and "student-ema" in runs[1][0]
    assert "removed 1 temporary file(s)" in runs[2][0] and "final.json.tmp-" in runs[2][0]
    assert "resuming at step 3" in runs[2][0]  # no step trained again: the checkpoint at --steps is loaded
    for name in FINAL:
        assert same_file(out / name, whole / name), name
    record, ref = (json.loads((d / "final.json").read_text()) for d in (out, whole))
    assert sizes(record) == sizes(ref) and set(record["parts"]) == {"student", "student-ema", "diffusers", "card"}
    assert same_cards(out, whole)
    assert record["of"]["step"] == 3 and record["of"]["checkpoint"] == "step-0000003"
    assert not temporaries(out) and [r["step"] for r in map(json.loads, open(out / "log.jsonl"))] == [1, 2, 3]

    before = listing(out)
    capsys.readouterr()
    assert cli.run(distill.main, options.build_parser(), distill_argv(tiny, out, *extra, "--resume")) == \
        str(out / "student-ema.safetensors")
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"{out} is already finished at step 3") \
        and "nothing was written" in printed[0]
    assert listing(out) == before

    os.remove(out / "student.safetensors")
    cli.run(distill.main, options.build_parser(), distill_argv(tiny, out, *extra, "--resume"))
    assert same_file(out / "student.safetensors", whole / "student.safetensors")
    after = listing(out)
    assert {k: v for k, v in after.items() if k not in ("student.safetensors", "final.json", "log.jsonl")} == \
        {k: v for k, v in before.items() if k not in ("student.safetensors", "final.json", "log.jsonl")}


def test_distill_two_ranks_killed_as_a_group_at_the_final_write(tiny, tmp_path):
    """torchrun, 2 gloo workers: the whole job killed with SIGKILL at rank 0's first final write (the
    launcher first, the other worker with it), relaunched with the same command: exit 0, no worker left,
    and the same final files as an uninterrupted 2-rank run, byte for byte."""
    whole, out = tmp_path / "whole", tmp_path / "killed"
    lives([*TORCHRUN, "distill.py", *distill_argv(tiny, whole, "--ema", "0.9")], [])
    lives([*TORCHRUN, "distill.py", *distill_argv(tiny, out, "--ema", "0.9", "--resume")],
          [f"1:{out}/student.safetensors"])
    assert not processes_writing(out)
    for name in ("student.safetensors", "student-ema.safetensors"):
        assert same_file(out / name, whole / name), name
    assert sizes(json.loads((out / "final.json").read_text())) == sizes(json.loads((whole / "final.json").read_text()))
    assert same_cards(out, whole)
    assert not temporaries(out)


def test_distill_in_the_toy_world_killed_in_its_report(tiny_world, tmp_path, monkeypatch):
    """The toy world's report is a final part too: killed while writing report.md, relaunched, the report
    is written (the student kept), the same as an uninterrupted run's but for its timings. distill.py runs
    as its command line, with the toy world pointed at the tiny world of test_toy_report and the report
    at 2 sampling steps, 1 seed, the DEV prompts (its defaults take minutes here)."""
    world = tiny_world
    build, report = toy.build_world, toy_report.report
    monkeypatch.setattr(toy, "build_world", lambda cache_dir=None, **kw: build(world.cache_dir, progress=False,
                                                                             settings=TINY))
    monkeypatch.setattr(toy_report, "report", functools.partial(report, steps=2, n_seeds=1, split="dev"))
    argv = ["--steps", "3", "--ckpt-every", "3", "--global-batch", "8", "--no-progress", "--resume"]
    distill.main(options.parse_args([*argv, "--out", str(tmp_path / "whole")]))
    stub = ("import functools, runpy, sys, toy\nfrom evaluation import toy_report\n"
            f"settings = toy.TrainSettings(steps={TINY.steps}, batch_size={TINY.batch_size}, weak_step={TINY.weak_step})\n"
            "build = toy.build_world\n"
            f"toy.build_world = lambda cache_dir=None, **kw: build({world.cache_dir!r}, progress=False, settings=settings)\n"
            "toy_report.report = functools.partial(toy_report.report, steps=2, n_seeds=1, split='dev')\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path('distill.py', run_name='__main__')\n")
    out = tmp_path / "killed"
    runs = lives([sys.executable, "-c", stub, "distill.py", *argv, "--out", str(out)], ["1:report.md"])
    assert "removed 1 temporary file(s)" in runs[1][0] and "report.md.tmp-" in runs[1][0]
    assert same_file(out / "student.safetensors", tmp_path / "whole" / "student.safetensors")
    assert (out / "samples.png").read_bytes() == (tmp_path / "whole" / "samples.png").read_bytes()
    timing = ("ms_per_image", "wall_ratio")
    a, b = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "whole"))
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["rows"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b["rows"]]
    record = json.loads((out / "final.json").read_text())
    assert sizes(record).keys() == {"student", "card", "report"} and sorted(record["parts"]["report"]) == \
        ["follows-w.png", "report.json", "report.md", "samples.png"]


# -----------------------------------------------------------------------------
# generate.py


PROMPTS = ["a red cat", "the blue dog on the grass"]


def generate_argv(folder, out, *extra):
    argv = ["--model", folder, "--method", "cfg", "--w", "2", "--steps", "2", "--res", "32", "--n-per-prompt", "2",
            "--out", str(out), *extra]
    return argv + sum((["--prompt", p] for p in PROMPTS), [])


def run_main(argv):
    return generate.run(generate.check(generate.build_parser().parse_args([str(a) for a in argv])), progress=False)


def same_images(a, b, names=None):
    """Two generate.py folders hold the same images: pixels equal, PNG records equal but for the measured
    seconds; index.jsonl equal but for seconds and the PNGs' sizes (whose text holds the seconds)."""
    names = names or sorted(os.listdir(b / "images"))
    assert sorted(os.listdir(a / "images")) == names
    for name in names:
        with Image.open(a / "images" / name) as x, Image.open(b / "images" / name) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y)), name
            rx, ry = json.loads(x.info["teefusion"]), json.loads(y.info["teefusion"])
        assert rx.pop("seconds") > 0 and ry.pop("seconds") > 0 and rx == ry, name

    def index(folder):
        return [{k: v for k, v in r.items() if k not in ("seconds", "bytes")}
                for r in map(json.loads, (folder / "index.jsonl").read_text().splitlines())]

    assert index(a) == index(b) and len(index(a)) == len(names)
    assert not temporaries(a) and not image_folder.rank_files(str(a))


def test_generate_killed_mid_png_and_mid_sheet_finishes(pipeline, tmp_path):  # noqa: F811
    """Killed while writing its second PNG; then while writing the contact sheet; the third launch exits 0.
    Every image is there once, whole, the same as in an uninterrupted run, and index.jsonl lists each once
    in job order. (A PNG renamed but not yet recorded: the two-rank test below.)"""
    _, folder = pipeline
    whole = tmp_path / "whole"
    run_main(generate_argv(folder, whole))
    out = tmp_path / "killed"
    runs = lives([sys.executable, "generate.py", *generate_argv(folder, out)], ["2:.png", "1:contact.png"])
    assert "removed 1 temporary file(s)" in runs[1][0] and "00000-01.png.tmp-" in runs[1][0]
    assert "removed 1 temporary file(s)" in runs[2][0] and "contact.png.tmp-" in runs[2][0]
    assert "0 images made, 4 already there" in runs[2][0]
    same_images(out, whole)
    assert (out / "contact.png").read_bytes() == (whole / "contact.png").read_bytes()


def test_generate_remakes_truncated_and_empty_pngs_and_a_finished_run_writes_nothing(pipeline, tmp_path, capsys):  # noqa: F811
    """A PNG cut in half, a 0-byte PNG and a PNG resized with its metadata kept in OUT/images (each recorded
    in index.jsonl with its whole size) are made again, never `image file is truncated`; the same without index.jsonl (each file then decoded
    to its last pixel); a finished run relaunched changes nothing."""
    _, folder = pipeline
    out = tmp_path / "out"
    argv = generate_argv(folder, out)
    first = run_main(argv)
    ref = tmp_path / "ref"
    shutil.copytree(out, ref)
    before = listing(out)
    capsys.readouterr()
    assert cli.run(generate.main, generate.build_parser(), [str(a) for a in argv]) == first
    assert capsys.readouterr().out.strip() == f"{out} is already finished: its 4 images, index.jsonl and contact.png " \
                                              "are there; nothing was written"
    assert listing(out) == before

    for index in (True, False):
        cut = (out / "images" / "00000-01.png").read_bytes()
        (out / "images" / "00000-01.png").write_bytes(cut[:len(cut) // 2])
        (out / "images" / "00001-00.png").write_bytes(b"")
        with Image.open(out / "images" / "00001-01.png") as im:  # resized by a viewer, its metadata kept
            info = PngImagePlugin.PngInfo()
            for k, v in im.info.items():
                if isinstance(v, str):
                    info.add_text(k, v)
            im.resize((im.width // 2, im.height // 2)).save(out / "images" / "00001-01.png", pnginfo=info)
        if not index:
            os.remove(out / "index.jsonl")
        cli.run(generate.main, generate.build_parser(), [str(a) for a in argv])
        printed = capsys.readouterr().out
        assert "3 image(s)" in printed and "truncated, unreadable or resized" in printed and "00001-00.png" in printed
        assert "00001-01.png" in printed and "3 images made, 1 already there" in printed
        same_images(out, ref)
        with Image.open(out / "images" / "00000-01.png") as im:
            im.load()


def test_generate_and_table4_on_two_ranks_equal_one_process(pipeline, clip_folder, tmp_path):  # noqa: F811
    """torchrun, 2 gloo ranks: generate.py killed as a group as a rank first records its images (its first
    PNG renamed, not yet recorded: the relaunch decodes it to the last pixel and keeps it), relaunched, makes
    the images and index of one uninterrupted process; evaluate.py table4 (batches of 2 shared out, a student
    row, a CLIP score), killed as a group while rank 0 writes table4.json and relaunched, gives the same
    images, index, scores and grid as one process (the seconds aside), which relaunched writes nothing."""
    _, folder = pipeline
    one, two = tmp_path / "one", tmp_path / "two"
    run_main(generate_argv(folder, one))
    lives([*TORCHRUN, "generate.py", *generate_argv(folder, two)], ["1:index.rank"])
    same_images(two, one)

    student = tmp_path / "student.safetensors"
    import mmdit
    mmdit.save_mmdit(mmdit.load_mmdit(folder), str(student), {"teefusion_method": "teefusion"})
    table = ["table4", "--model", folder, "--methods", "cfg", "--student", f"st={student}", "--steps", "2",
             "--res", "32", "--w", "3", "--n-per-prompt", "2", "--batch", "2", "--score", f"clip={clip_folder}",
             *sum((["--prompt", p] for p in PROMPTS), [])]
    cli.run(evaluate.main, evaluate.build_parser(), [*table, "--out", str(tmp_path / "t1")])
    before = listing(tmp_path / "t1")
    cli.run(evaluate.main, evaluate.build_parser(), [*table, "--out", str(tmp_path / "t1")])
    assert listing(tmp_path / "t1") == before  # finished: scored again, nothing rewritten
    runs = lives([*TORCHRUN, "evaluate.py", *table, "--out", str(tmp_path / "t2")], ["1:table4.json"])
    assert "removed 1 temporary file(s)" in runs[1][0] and "table4.json.tmp-" in runs[1][0]
    rows = [[{k: v for k, v in r.items() if k != "s_per_image"} for r in json.loads((tmp_path / t / "table4.json")
                                                                                  .read_text())["rows"]] for t in ("t1", "t2")]
    assert rows[0] == rows[1] and [r["method"] for r in rows[0]] == ["cfg", "st"]
    for row in ("cfg", "st"):
        same_images(tmp_path / "t2" / row, tmp_path / "t1" / row)
    assert (tmp_path / "t2" / "grid.png").read_bytes() == (tmp_path / "t1" / "grid.png").read_bytes()


# -----------------------------------------------------------------------------
# prepare.py, evaluation/toy_report.py, sd3.lora merge, sd3/vae.py, bench_memory.py


def test_prepare_killed_mid_shard_finishes_bitwise(tmp_path, tiny_vae_config, monkeypatch):
    from test_prepare import R, make_images
    from sd3.vae import VAE

    images = make_images(tmp_path / "images")
    torch.manual_seed(0)
    vae_file = tmp_path / "vae.safetensors"
    save_file({"first_stage_model." + k: v.contiguous() for k, v in VAE(tiny_vae_config).state_dict().items()},
              str(vae_file))

    def argv(out):
        return ["--images", str(images), "--out", str(out), "--vae", str(vae_file), "--resolution", str(R),
                "--shard-size", "4", "--workers", "0", "--dtype", "fp32", "--device", "cpu"]

    in_process("prepare.py", argv(tmp_path / "whole"), monkeypatch)
    runs = lives([sys.executable, "prepare.py", *argv(tmp_path / "killed")], ["2:shard-"])
    assert "removed 1 temporary file(s)" in runs[1][0] and "shard-00001.safetensors.tmp-" in runs[1][0]
    assert "built 2 shards, reused 1" in runs[1][0]
    names = sorted(os.listdir(tmp_path / "whole"))
    assert sorted(os.listdir(tmp_path / "killed")) == names == ["index.json", "shard-00000.safetensors",
                                                                "shard-00001.safetensors", "shard-00002.safetensors"]
    for name in names:
        assert same_file(tmp_path / "killed" / name, tmp_path / "whole" / name), name
    before = listing(tmp_path / "killed")
    in_process("prepare.py", argv(tmp_path / "killed"), monkeypatch)
    assert listing(tmp_path / "killed") == before  # finished: nothing rewritten


def test_toy_report_killed_at_report_md_finishes(tiny_world, tmp_path, monkeypatch, capsys):
    """evaluation/toy_report.py's command line (on the tiny world of test_toy_report: its argv as given, build_world
    pointed at that world's settings) killed while writing report.md, relaunched: the same report as an
    uninterrupted run but for the measured timings; relaunched again: nothing written."""
    world = tiny_world
    student = save_student(world, tmp_path / "student", "teefusion", "w2sd", 0)
    stub = ("import runpy, sys, toy\n"
                  f"settings = toy.TrainSettings(steps={TINY.steps}, batch_size={TINY.batch_size}, "
                  f"weak_step={TINY.weak_step})\n"
                  "build = toy.build_world\n"
                  "toy.build_world = lambda cache_dir, **kw: build(cache_dir, progress=False, settings=settings)\n"
                  "sys.argv = sys.argv[1:]\n"
                  "runpy.run_module('evaluation.toy_report', run_name='__main__', alter_sys=True)\n")

    def argv(out):
        return ["--cache-dir", world.cache_dir, "--student", student, "--out", str(out), "--steps", "2", "--seeds", "1",
                "--split", "dev"]

    build = toy.build_world
    monkeypatch.setattr(toy, "build_world", lambda cache_dir, **kw: build(cache_dir, progress=False, settings=TINY))
    in_process("evaluation.toy_report", argv(tmp_path / "whole"), monkeypatch)
    runs = lives([sys.executable, "-c", stub, "evaluation/toy_report.py", *argv(tmp_path / "killed")], ["1:report.md"])
    assert "removed 1 temporary file(s)" in runs[1][0] and "report.md.tmp-" in runs[1][0]
    timing = ("ms_per_image", "wall_ratio")
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("killed", "whole"))
    assert [{k: v for k, v in r.items() if k not in timing} for r in a.pop("rows")] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b.pop("rows")]
    assert {k: v for k, v in a.items() if k != "figures"} == {k: v for k, v in b.items() if k != "figures"}
    for name in ("samples.png", "follows-w.png", "loss.png"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    before = listing(tmp_path / "killed")
    capsys.readouterr()
    in_process("evaluation.toy_report", argv(tmp_path / "killed"), monkeypatch)
    assert "already holds this report" in capsys.readouterr().out and listing(tmp_path / "killed") == before
    assert not temporaries(tmp_path / "killed")


def test_lora_merge_killed_mid_write_finishes_bitwise(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    base_model = MMDiT(CONFIGS["tiny-sd3"])
    with torch.no_grad():
        for p in base_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base = save_mmdit(base_model, str(tmp_path / "base.safetensors"))
    student = lora.attach(base_model, lora.settings(2))
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapter = lora.save_adapter(student, base_model, str(tmp_path / "lora.safetensors"), {"teefusion_method": "teefusion"})
    whole = lora.merge_files(base, adapter, str(tmp_path / "whole.safetensors"),
                             of=lora.merge_inputs(base, adapter, "fp32"))
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--base", base, "--lora", adapter, "--out", str(out)]
    runs = lives([sys.executable, "-m", "sd3.lora", *argv], ["1:merged.safetensors"])
    assert "removed 1 temporary file(s)" in runs[1][0] and "merged.safetensors.tmp-" in runs[1][0]
    assert same_file(out, whole)
    before = listing(tmp_path)
    capsys.readouterr()
    in_process("sd3.lora", argv, monkeypatch)
    assert "is already the merge of" in capsys.readouterr().out and listing(tmp_path) == before
    assert not temporaries(tmp_path)


def test_vae_png_and_bench_memory_json_are_written_atomically(tmp_path, tiny_vae_config, monkeypatch):
    """sd3/vae.py's PNG and bench_memory.py --json: a kill at their write leaves no file (only a temporary,
    which sd3/vae.py's relaunch removes); relaunched, the whole file."""
    from test_vae import make_reference

    make_reference(tiny_vae_config).save_pretrained(tmp_path / "vae")
    Image.new("RGB", (16, 16), (200, 40, 90)).save(tmp_path / "photo.png")
    out = tmp_path / "roundtrip.png"
    runs = lives([sys.executable, "-m", "sd3.vae", "--vae", str(tmp_path / "vae"), "--image", str(tmp_path / "photo.png"),
                  "--out", str(out), "--size", "16", "--device", "cpu"], ["1:roundtrip.png"])
    assert "removed 1 temporary file(s)" in runs[1][0]
    with Image.open(out) as im:
        assert im.size == (32, 16) and im.format == "PNG"
        im.load()
    assert not temporaries(tmp_path)

    stub = ("import sys, argparse\nsys.path.insert(0, 'benchmarks')\nimport bench_memory as b\n"
            "b.run_point = lambda point, threads, optimizer: dict(point=point, peaks={'step': 1.0}, seconds=0.0)\n"
            "b.report = b.extrapolate = lambda *a: None\n"
            "b.main(argparse.Namespace(point=None, load=None, quick=True, lora=None, config=['sd3-medium'], threads=1, "
            "optimizer='foreach', gpus=8, fsdp=False, fsdp_only=False, json=sys.argv[1]))\n")
    path = tmp_path / "points.json"
    launch([sys.executable, "-c", stub, str(path)], "1:points.json")
    assert not path.exists() and len(checkpoint.temporaries(str(tmp_path), owned=lambda n: n == "points.json")) == 1
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import bench_memory  # the same stubs, in this process: the whole file
    monkeypatch.setattr(bench_memory, "run_point", lambda point, threads, optimizer: dict(point=point, peaks={"step": 1.0},
                                                                                          seconds=0.0))
    monkeypatch.setattr(bench_memory, "report", lambda *a: None)
    monkeypatch.setattr(bench_memory, "extrapolate", lambda *a: None)
    bench_memory.main(argparse.Namespace(point=None, load=None, quick=True, lora=None, config=["sd3-medium"], threads=1,
                                         optimizer="foreach", gpus=8, fsdp=False, fsdp_only=False, json=str(path)))
    points = json.loads(path.read_text())
    assert points and all(p["peaks"] == {"step": 1.0} for p in points)


def test_evaluate_removes_the_temporaries_of_its_file_and_shares_only_table4(tmp_path, monkeypatch, capsys):
    """evaluate.py plot-loss removes what a killed run left of its --out (and nothing else); under torchrun
    the commands other than table4 are refused (one line, exit 2): they run in one process."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 5)))
    (tmp_path / "loss.png.tmp-ab12cd34").write_bytes(b"\x89PNG half")
    (tmp_path / "other.png.tmp-ab12cd34").write_bytes(b"not ours")
    cli.run(evaluate.main, evaluate.build_parser(), ["plot-loss", str(log), "--out", str(tmp_path / "loss.png")])
    assert "removed 1 temporary file(s)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "loss.png", "other.png.tmp-ab12cd34"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them, rank 0 of 2
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, evaluate.build_parser(), ["plot-loss", str(log), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "plot-loss runs in one process" in err[0]
    assert not (tmp_path / "x.png").exists()
