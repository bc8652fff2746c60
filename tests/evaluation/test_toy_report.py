"""Tests for evaluation/toy_report.py: the bootstrap confidence intervals against closed forms, paired
comparisons, and the whole report on a tiny toy world with students saved as distill.py saves
them (tables, comparisons, figures, every row sampled with its own fusion and compared with its
own teacher)."""

import json
import math
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import embed
import oracles  # tests/oracles.py: z written from the paper on the raw weights
import samplers
import toy
from evaluation import toy_report
from mmdit import load_mmdit, save_mmdit
from sd3 import student_file


@pytest.fixture(autouse=True)
def one_thread():
    with toy.one_thread():
        yield


def test_bootstrap_matches_the_normal_interval_and_resamples_prompts_not_images():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(400, generator=g, dtype=torch.float64) * 2 + 5
    mean, lo, hi = toy_report.bootstrap(values, torch.arange(400))
    half = 1.96 * values.std().item() / math.sqrt(400)  # the normal approximation, for independent values
    assert mean == pytest.approx(values.mean().item())
    assert lo == pytest.approx(mean - half, abs=0.15 * half) and hi == pytest.approx(mean + half, abs=0.15 * half)
    # 4 images per prompt with the same value: the prompts are the independent units, so the interval is
    # that of the 400 prompt values, not 2x narrower as 1,600 independent images would give
    same = toy_report.bootstrap(values.repeat(4), torch.arange(400).repeat(4))
    assert same[1] == pytest.approx(lo, abs=0.05 * half) and same[2] == pytest.approx(hi, abs=0.05 * half)
    assert toy_report.bootstrap(torch.full((50,), 3.0), torch.arange(50)) == (3.0, 3.0, 3.0)


def test_paired_comparisons():
    g = torch.Generator().manual_seed(1)
    groups = torch.arange(200).repeat(2)
    base = torch.rand(400, generator=g)
    better = base + 0.05 + 0.01 * torch.randn(400, generator=g)  # a small shift, the same images
    c = toy_report.paired(better, base, groups)
    assert c["significant"] and c["lo"] > 0 and c["diff"] == pytest.approx(0.05, abs=0.01)
    noise = base + 0.01 * torch.randn(400, generator=g)
    assert not toy_report.paired(noise, base, groups)["significant"]
    assert toy_report.paired(base, better, groups)["hi"] < 0
    x, y = torch.zeros(3, 3, 2, 2), torch.ones(3, 3, 2, 2)
    assert torch.equal(toy_report.rmse(x, y), torch.ones(3))


TINY = toy.TrainSettings(steps=20, batch_size=8, weak_step=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_world(str(tmp_path_factory.mktemp("toy")), progress=False, settings=TINY)


def save_student(world, folder, method, teacher, seed):
    """A "student" as distill.py writes one: the teacher's weights perturbed, its method and teacher in
    the metadata, a fusion.safetensors for the methods with weights, and a short log.jsonl."""
    os.makedirs(folder, exist_ok=True)
    model = load_mmdit(world.teacher_path)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_mmdit(model, str(folder / "student.safetensors"),
                      {"teefusion_method": method, "teefusion_teacher": teacher, "step": "60"})
    fusion = embed.make_fusion(method, world.config)
    if len(fusion.state_dict()):
        save_file({k: v.contiguous() for k, v in fusion.state_dict().items()}, str(folder / "fusion.safetensors"))
    with open(folder / "log.jsonl", "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 1 / s, "step_s": 0.1 + s / 1000, "teacher_s": 0.06, "student_s": 0.03})
                     + "\n" for s in range(1, 61))
    return path


def test_report_on_a_tiny_world(world, tmp_path, capsys):
    students = [dict(path=save_student(world, tmp_path / m, m, "w2sd", i)) for i, m in
                enumerate(("teefusion", "gonly", "distillcfg"))]
    students.append(dict(path=save_student(world, tmp_path / "cfg", "teefusion", "cfg", 9), label="from CFG"))
    out = toy_report.report(world, students, out_dir=str(tmp_path / "report"), w=2.0, steps=2, n_seeds=1,
                            split="dev", sweep_ws=(1.0, 4.0), progress=False)
    rows = {r["label"]: r for r in out["rows"]}
    labels = ["TeEFusion <- W2SD + CFG", "G only <- W2SD + CFG", "DistillCFG <- W2SD + CFG", "from CFG"]
    assert list(rows) == [name for name, _ in toy_report.TEACHER_ROWS] + labels
    assert [rows[n]["nfe"] for n, _ in toy_report.TEACHER_ROWS] == [2, 4, 8, 8]  # 6 (N - 1) + 2 for reflection
    assert all(rows[n]["nfe"] == 2 and rows[n]["nfe_ratio"] == 1 for n in labels)
    assert out["n_images"] == len(toy.DEV_PROMPTS)
    for r in rows.values():
        for key in toy_report.SCORES:
            mean, lo, hi = r[key]
            assert lo <= mean <= hi and 0 <= lo and hi <= (100 if key != "fidelity" else 1)
        assert r["closest_cfg_w"] in toy_report.CFG_WS and r["ms_per_image"] > 0
    assert rows["Euler + CFG"]["rmse_to_cfg"] == (0.0, 0.0, 0.0) and rows["Euler + CFG"]["closest_cfg_w"] == 2.0

    # each student row: its images and its RMSE to ITS teacher, against samplers written here from the
    # paper (Euler on Eq. 2, W2SD's Eq. 3-4, the student on Eq. 7 by hand) on the documented noise
    ds = world.dataset("dev")
    context, y = ds.context, ds.y
    context_null, y_null = world.encoders.encode_null()
    noise = torch.randn(len(y), 3, toy.H, toy.W, generator=torch.Generator().manual_seed(toy.ToyDataset.SEED_BASE["dev"] + 7))
    sigmas = samplers.flow_sigmas(2)  # pinned to diffusers' scheduler in test_samplers
    teacher, weak = load_mmdit(world.teacher_path), load_mmdit(world.weak_path)
    w = 2.0

    def cfg(net, x, s):  # Eq. 2, two separate forwards
        tt = torch.full((len(x),), float(s))
        return (1 + w) * net(x, tt, context, y) - w * net(x, tt, context_null.expand_as(context), y_null.expand_as(y))

    def by_hand(kind, student_path=None):
        x = noise.clone()
        with torch.no_grad():
            if student_path:
                model, _ = student_file.load_student(student_path)
                mlp = load_file_fusion(student_path)
            for i in range(2):
                s, s_next = sigmas[i].item(), sigmas[i + 1].item()
                h = s_next - s
                if student_path:  # one forward on z (Eq. 7 or the ablation's), from the raw weights
                    z = oracles.conditioning(model, student_file.student_files(student_path)[0], s, y, y_null, w,
                                             guidance_mlp=mlp)
                    x = x + h * model(x, torch.full((len(x),), s), context, y, vec=z)
                elif kind == "w2sd" and i == 0:  # Eq. 3 (the weak model inverts at t), Eq. 4 (the strong one moves)
                    x1 = x + h * cfg(teacher, x, s)
                    x2 = x1 - h * (lambda xx: weak(xx, torch.full((len(xx),), s), context, y))(x1)  # w_weak = 0
                    x = x2 + h * cfg(teacher, x2, s)
                else:
                    x = x + h * cfg(teacher, x, s)
        return x

    def load_file_fusion(path):
        folder = os.path.dirname(path)
        if not os.path.isfile(os.path.join(folder, "fusion.safetensors")):
            return None
        module = embed.make_fusion("distillcfg", world.config)
        module.load_state_dict(load_file(os.path.join(folder, "fusion.safetensors")))
        return module.guidance_in.mlp

    def rmse(a, b):
        return ((a - b) ** 2).flatten(1).mean(1).sqrt().mean().item()

    x_s, x_t = by_hand("student", students[3]["path"]), by_hand("cfg")
    assert rows["from CFG"]["rmse_to_teacher"][0] == pytest.approx(rmse(x_s, x_t), rel=1e-4)
    x_w, x_d = by_hand("w2sd"), by_hand("student", students[2]["path"])
    assert rows[labels[2]]["rmse_to_teacher"][0] == pytest.approx(rmse(x_d, x_w), rel=1e-4)
    assert rows[labels[2]]["adherence"][0] == pytest.approx(100 * toy.scores(x_d, ds.prompts)["adherence"].mean().item())

    # comparisons: the claims, paired; Table 3 against the TeEFusion student of the same teacher
    claims = {c["claim"] for c in out["comparisons"]}
    assert "Z-Sampling + CFG vs Euler + CFG" in claims and f"{labels[0]} vs its teacher" in claims
    assert f"RMSE to W2SD + CFG: {labels[0]} minus Euler + CFG" in claims
    assert not any(c["claim"].startswith("RMSE to Euler + CFG") for c in out["comparisons"])  # CFG's own student
    assert {c["a"] for c in out["table3"]} == {labels[1], labels[2]} and {c["b"] for c in out["table3"]} == {labels[0]}
    for name in ("samples.png", "sweep-adherence.png", "sweep-fidelity.png", "follows-w.png", "loss.png",
                 "report.md", "report.json"):
        assert os.path.isfile(tmp_path / "report" / name), name
    grid = Image.open(tmp_path / "report" / "samples.png")
    assert grid.height >= 20 + len(rows) * 8 * toy.H  # labelled; a toy pixel drawn 8 x 8
    assert set(out["follows_w"]) == {"W2SD + CFG", labels[0]}
    cost = {r["label"]: r for r in out["training_cost"]}
    assert cost[labels[0]]["steps"] == 60 and cost[labels[0]]["teacher_s"] == 0.06
    assert cost[labels[0]]["step_s"] == pytest.approx(0.1 + 30 / 1000)  # the median of 0.101 ... 0.160
    printed = capsys.readouterr().out
    assert all(n in printed for n in labels) and "significant" in printed and "Table 3" in printed


def test_a_student_without_its_teacher_is_refused(world, tmp_path):
    path = save_mmdit(load_mmdit(world.teacher_path), str(tmp_path / "s.safetensors"), {"teefusion_method": "teefusion"})
    with pytest.raises(ValueError, match="which teacher"):
        toy_report.load_students([dict(path=path)])
    assert toy_report.load_students([dict(path=path, teacher="zigzag")])[0]["teacher"] == "zsampling"
    assert samplers.canonical("zigzag", samplers.TEACHERS) == "zsampling"


@pytest.mark.parametrize("argv, named", [(["--student", "nope.safetensors"], "--student nope.safetensors"),
                                         (["--seeds", "0"], "--seeds 0"), (["--w", "-1"], "--w must be >= 0")])
def test_command_line_refuses_bad_input_in_one_line(argv, named):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "evaluation.toy_report", *argv], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and named in r.stderr
