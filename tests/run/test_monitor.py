"""
run/monitor.py: the sample grids and the TensorBoard log of a distillation run.

  - a 3-step run on a tiny random SD3 pipeline (conftest.sd3_pipeline, its VAE decoding the grids) with a
    grid at every step gives, checkpoint for checkpoint, the same weights, optimizer state and losses as the
    same run without grids (bitwise), and drawing a grid leaves the global torch RNG as it was;
  - the grid's size and layout (prompts x [teacher | student at three w]); its teacher cell equals
    generate.py --method cfg and its student cell generate.py --method student on that step's checkpoint
    (same seed, w and steps: within 1 uint8 level, the grid samples its prompts in one batch);
  - under torchrun (2 gloo ranks) rank 0 alone draws the grids;
  - the toy world's grid (its DEV prompts, scaled up) and the TensorBoard scalars and images, through a fake
    SummaryWriter; without the tensorboard package, --report-to tensorboard is one `error:` line, exit 2,
    before anything heavy loads; so is a grid asked for with no VAE to decode it.

    python -m pytest -q tests/run/test_monitor.py
"""

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from run import cli
import distill
import generate
import mmdit
from run import monitor
from run import options
from run import training
import prepare
import toy
from sd3 import vae
from test_distill import torchrun_distill  # distill.py under torchrun, 2 gloo ranks
from sd3 import student_file, text_encoders

RES, STEPS = 64, 4  # the shards' 64 x 64 px images; the grid's (and the student's) sampler steps
LABEL, GAP, TITLE = 110, 2, 20  # plots.image_grid: the row-label margin, the gutter, the column-title band


def run_args(teacher, data, out, *extra):
    return options.parse_args(["--teacher", teacher, "--data", data, "--out", str(out), "--teacher-sampler", "cfg",
                               "--global-batch", "2", "--lr", "1e-3", "--teacher-steps", str(STEPS), "--no-progress",
                               "--device", "cpu", *extra])


def cell(grid, row, column, size=RES):
    """The (row, column) image of a grid drawn with cells of `size` pixels, (size, size, 3) int16."""
    left, top = LABEL + column * (size + GAP), TITLE + row * (size + GAP)
    return np.asarray(grid.convert("RGB"), dtype=np.int16)[top:top + size, left:left + size]


def test_grids_leave_training_bitwise_unchanged_and_show_the_samplers(sd3_pipeline, sd3_data, tmp_path,
                                                                       monkeypatch):
    _, folder = sd3_pipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat on the left\nthe big blue dog\n")
    common = ["--steps", "3", "--ckpt-every", "1", "--keep", "3"]
    draws = []
    grid = monitor.Monitor.grid

    def grid_keeping_count(self, step):  # the global RNG before and after every grid
        before = torch.get_rng_state()
        seconds = grid(self, step)
        draws.append(torch.equal(before, torch.get_rng_state()))
        return seconds

    monkeypatch.setattr(monitor.Monitor, "grid", grid_keeping_count)
    distill.main(run_args(folder, sd3_data, tmp_path / "plain", *common, "--sample-every", "0"))
    distill.main(run_args(folder, sd3_data, tmp_path / "grids", *common, "--sample-every", "1",
                          "--sample-prompts", str(prompts)))
    assert draws == [True] * 3 and not os.path.exists(tmp_path / "plain" / "samples")

    for step in (1, 2, 3):  # every checkpoint: the same weights and AdamW moments, bit for bit
        for name in ("student.safetensors", "optimizer.safetensors"):
            a, b = (load_file(tmp_path / run / "checkpoints" / f"step-{step:07d}" / name) for run in ("plain", "grids"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, name)
    logs = {run: [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("plain", "grids")}
    assert [r["loss"] for r in logs["plain"]] == [r["loss"] for r in logs["grids"]]
    assert [r["grad_norm"] for r in logs["plain"]] == [r["grad_norm"] for r in logs["grids"]]
    assert all(r["sample_s"] > 0 for r in logs["grids"]) and not any("sample_s" in r for r in logs["plain"])

    samples = tmp_path / "grids" / "samples"
    assert sorted(os.listdir(samples)) == [f"step-{s:07d}.png" for s in (1, 2, 3)]  # no temporary file left
    image = Image.open(samples / "step-0000002.png")
    assert image.size == (LABEL + 4 * (RES + GAP), TITLE + 2 * (RES + GAP))  # 2 prompts x 4 columns, labelled
    # the teacher's cell: generate.py's cfg at w = 5; the student's: generate.py on the step-2 checkpoint
    teacher = generate.generate(["the big blue dog"], str(tmp_path / "cfg"), model=folder, method="cfg", w=5.0,
                                steps=STEPS, res=RES, progress=False)
    student = tmp_path / "grids" / "checkpoints" / "step-0000002" / "student.safetensors"
    ws = {}
    for w in (5.0, 2.0, 14.0):
        ws[w] = generate.generate(["the big blue dog"], str(tmp_path / f"student{w:g}"), model=folder,
                                  method="student", student=str(student), w=w, steps=STEPS, res=RES, progress=False)
    png = lambda out, records: np.asarray(Image.open(out / records[0]["file"]), dtype=np.int16)  # noqa: E731
    levels = [np.abs(cell(image, 1, 0) - png(tmp_path / "cfg", teacher)).max()]
    levels += [np.abs(cell(image, 1, c) - png(tmp_path / f"student{w:g}", ws[w])).max()
               for c, w in enumerate(ws, start=1)]
    print(f"\ngrid cells vs generate.py: {levels} uint8 levels")
    assert max(levels) <= 1
    assert np.abs(cell(image, 1, 0) - cell(image, 1, 1)).max() > 10  # the columns are different samplers
    # the teacher's column is the same in every grid of the run
    first = Image.open(samples / "step-0000001.png")
    assert np.array_equal(cell(first, 0, 0), cell(image, 0, 0))


def test_grids_are_drawn_by_rank_0_only(sd3_pipeline, sd3_data, tmp_path):
    _, folder = sd3_pipeline
    out = tmp_path / "two"
    stdout = torchrun_distill(["--teacher", folder, "--data", sd3_data, "--out", str(out), "--teacher-sampler", "cfg",
                               "--global-batch", "2", "--micro-batch", "1", "--steps", "2", "--teacher-steps", "2",
                               "--sample-every", "1", "--no-progress", "--device", "cpu"])
    assert stdout.count("sample grid: ") == 2  # one line per grid: rank 1 drew none
    assert sorted(os.listdir(out / "samples")) == ["step-0000001.png", "step-0000002.png"]
    # the default prompts with a real teacher: the first 4 captions of --data
    assert Image.open(out / "samples" / "step-0000002.png").size == (LABEL + 4 * (RES + GAP), TITLE + 4 * (RES + GAP))


class FakeWriter:
    """torch.utils.tensorboard.SummaryWriter's interface, recording what it is given."""

    def __init__(self, folder, purge_step=None):
        self.folder, self.purge_step, self.scalars, self.images, self.closed = folder, purge_step, {}, {}, False

    def add_scalar(self, tag, value, step):
        self.scalars[tag, step] = value

    def add_image(self, tag, image, step, dataformats):
        assert dataformats == "HWC"
        self.images[tag, step] = image

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_toy_grid_and_tensorboard_through_a_fake_writer(tmp_path, monkeypatch):
    world = toy.build_world(cache_dir=str(tmp_path / "cache"), progress=False,
                            settings=toy.TrainSettings(steps=20, batch_size=8, weak_step=10))
    monkeypatch.setattr(toy, "build_world", lambda **kw: world)
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))  # "installed"
    writers = []
    monkeypatch.setattr(monitor, "tensorboard_writer", lambda *a: writers.append(FakeWriter(*a)) or writers[-1])
    out = tmp_path / "toy"
    distill.main(options.parse_args(["--steps", "3", "--global-batch", "4", "--ckpt-every", "2", "--out", str(out),
                                     "--no-report", "--no-progress", "--report-to", "tensorboard"]))
    # at each checkpoint (2) and the last step (3); the toy world's 4 DEV prompts, 8 x 16 images drawn 8x larger
    assert sorted(os.listdir(out / "samples")) == ["step-0000002.png", "step-0000003.png"]
    grid = Image.open(out / "samples" / "step-0000003.png")
    h, w = toy.H * 8, toy.W * 8
    assert grid.size == (LABEL + 4 * (w + GAP), TITLE + 4 * (h + GAP))
    rows = [toy.caption(*p) for p in toy.DEV_PROMPTS[::25]]  # 4 of the 100 held-out DEV prompts, spread out
    assert len(set(rows)) == 4 and not set(rows) & {toy.caption(*q) for q in toy.TRAIN_PROMPTS}
    # the student cell at w = 5 against samplers.sample("student") on the final student
    context, y = world.encoders.encode([rows[1]])  # the second row
    context_null, y_null = world.encoders.encode_null()
    noise = torch.randn(1, 3, toy.H, toy.W, generator=torch.Generator("cpu").manual_seed(0))
    model, fusion = student_file.load_student(str(out / "student.safetensors"))
    x0, _ = monitor.samplers.sample("student", model, noise, context, y, context_null, y_null, w=5.0, steps=20,
                                    fusion=fusion)
    ref = vae.to_uint8(x0)[0].numpy().repeat(8, 0).repeat(8, 1).astype(np.int16)  # nearest x8
    left, top = LABEL + (w + GAP), TITLE + (h + GAP)
    assert np.abs(np.asarray(grid, dtype=np.int16)[top:top + h, left:left + w] - ref).max() <= 1

    (writer,) = writers
    assert writer.folder == str(out / "tensorboard") and writer.purge_step is None and writer.closed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for r in log:
        assert writer.scalars["train/loss", r["step"]] == r["loss"]
        assert writer.scalars["train/grad_norm", r["step"]] == r["grad_norm"] > 0
        assert writer.scalars["speed/teacher_ms", r["step"]] == 1000 * r["teacher_s"]
        assert writer.scalars["speed/student_ms", r["step"]] == 1000 * r["student_s"]
        assert writer.scalars["train/lr", r["step"]] == 1e-3
    assert [r.get("sample_s") is not None for r in log] == [False, True, True]
    assert sorted(writer.images) == [("samples", 2), ("samples", 3)]
    assert np.array_equal(writer.images["samples", 3], np.asarray(grid.convert("RGB")))


@pytest.mark.parametrize("case", ["no-tensorboard", "no-vae", "negative", "prompts-without-grids"])
def test_refusals_before_anything_heavy(sd3_data, tmp_path, monkeypatch, capsys, case):
    """One `error:` line naming the flag, exit status 2, with every loader replaced by one that fails."""
    teacher = str(tmp_path / "teacher.safetensors")
    torch.manual_seed(0)
    mmdit.save_mmdit(mmdit.MMDiT(mmdit.CONFIGS["tiny-sd3"]), teacher)  # a single file: no VAE in it
    argv = ["--teacher", teacher, "--data", sd3_data, "--out", str(tmp_path / "out"), "--teacher-sampler", "cfg"]
    argv += {"no-tensorboard": ["--report-to", "tensorboard", "--sample-every", "0"],
             "no-vae": ["--sample-every", "5"], "negative": ["--sample-every", "-1"],
             "prompts-without-grids": ["--sample-every", "0", "--sample-prompts", str(tmp_path)]}[case]
    named = {"no-tensorboard": "--report-to tensorboard needs the `tensorboard` package", "no-vae": "--vae PATH",
             "negative": "--sample-every -1", "prompts-without-grids": "--sample-prompts"}[case]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed: `import tensorboard` fails

    def heavy(*a, **k):
        raise AssertionError("something heavy loaded before the input was checked")

    for owner, name in ((training, "load_network"), (prepare, "ShardDataset"), (vae, "load_vae"),
                        (text_encoders.TextEncoders, "from_pretrained")):
        monkeypatch.setattr(owner, name, heavy)
    with pytest.raises(SystemExit) as e:
        cli.run(distill.main, options.build_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_without_a_vae_the_default_run_has_no_grids_and_says_so(sd3_data, tmp_path, capsys):
    teacher = str(tmp_path / "teacher.safetensors")
    torch.manual_seed(0)
    model = mmdit.MMDiT(mmdit.MMDiTConfig(depth=1, hidden_size=32, num_heads=2, in_channels=16, out_channels=16,
                                          context_dim=48, pooled_dim=40, pos_embed_max_size=8))
    mmdit.save_mmdit(model, teacher)
    distill.main(run_args(teacher, sd3_data, tmp_path / "out", "--steps", "1"))
    assert "sample grids: none, the teacher holds no VAE" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "out" / "samples")
