"""
generate.py against diffusers' StableDiffusion3Pipeline (test-only oracle) on a tiny random SD3 pipeline
built here (tiny SD3Transformer2DModel, a tiny AutoencoderKL with SD3's 16 latent channels and scale /
shift, tiny CLIP-L, CLIP-G and T5 with word tokenizers), the same seeds giving the same images; the
same model as a Stability single file; a student through generate against samplers.sample("student")
decoded (TeEFusion, and DistillCFG with its fusion file); the toy world through the same
command; resuming; the PNG metadata; bad input (one `error:` line, exit 2, nothing heavy loaded);
evaluate.py's table4 protocol end to end with a tiny random CLIP scorer.

    python -m pytest -q tests/test_generate.py -s     # -s prints the parity numbers
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import save_file

from run import cli
import embed
import evaluate
import oracles  # tests/oracles.py
import generate
import mmdit
import samplers
import toy
from sd3 import vae

import diffusers  # test oracle (requirements-test.txt)
from sd3 import student_file, text_encoders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cat on the left", "the big blue square right of a small green circle"]
STEPS, RES, N = 4, 64, 2


@pytest.fixture(scope="module")
def pipeline(sd3_pipeline):
    """(diffusers StableDiffusion3Pipeline, the folder it was saved to with save_pretrained): conftest's tiny one."""
    return sd3_pipeline


@pytest.fixture(scope="module")
def single_file(pipeline):
    """The pipeline's MMDiT and VAE as one Stability single file (model.diffusion_model.*, first_stage_model.*)."""
    _, folder = pipeline
    model = mmdit.load_mmdit(folder)
    tensors = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    tensors.update({"first_stage_model." + k: v for k, v in vae.load_vae(folder).state_dict().items()})
    path = os.path.join(os.path.dirname(folder), "sd3_tiny.safetensors")
    # the head count (2 heads of 8) cannot be read off the shapes, whose rule is SD3's 64 per head: say it
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              {"mmdit_config": json.dumps(dataclasses.asdict(model.config))})
    return path


def run_main(argv, world=None):
    """generate.py's command line in this process (cli.run: errors become SystemExit)."""
    args = generate.build_parser().parse_args([str(a) for a in argv])
    return generate.run(generate.check(args, world), progress=False)


def png_floats(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255  # (H, W, 3) in [0, 1]


@pytest.mark.parametrize("method, w, negative", [("euler", None, None), ("cfg", 2.0, None), ("cfg", 4.0, "dog")])
def test_same_seeds_same_images_as_diffusers(pipeline, tmp_path, method, w, negative):
    pipe, folder = pipeline
    out = tmp_path / "out"
    argv = ["--model", folder, "--method", method, "--steps", STEPS, "--res", RES, "--n-per-prompt", N,
            "--seed", 3, "--out", out, "--batch", 3] + sum((["--prompt", p] for p in PROMPTS), [])
    argv += ["--w", w] if w is not None else []
    argv += ["--negative-prompt", negative] if negative else []
    args = generate.build_parser().parse_args([str(a) for a in argv])
    plan = generate.check(args)
    ours = {job: x for batch, images, _, _ in generate.iter_images(plan, plan.jobs) for job, x in zip(batch, images)}
    records = generate.run(plan, progress=False)
    worst, levels = 0.0, 0
    for i, prompt in enumerate(PROMPTS):
        # diffusers' guidance_scale is 1 + w; at 1 it skips the null branch (the unguided teacher)
        ref = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=STEPS, height=RES, width=RES,
                   guidance_scale=1.0 if w is None else samplers.w_to_guidance_scale(w), num_images_per_prompt=N,
                   generator=[torch.Generator("cpu").manual_seed(3 + k) for k in range(N)], output_type="np").images
        for k in range(N):
            x = ((ours[i, k] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3) in [0, 1]
            worst = max(worst, float(np.abs(x - ref[k]).max()))
            png = np.asarray(Image.open(out / "images" / f"{i:05d}-{k:02d}.png"), dtype=np.int16)
            levels = max(levels, int(np.abs(png - (ref[k] * 255).round().astype(np.int16)).max()))
    print(f"\n{method} w={w}: max |ours - diffusers| {worst:.2e} (float), {levels} uint8 levels")
    assert worst <= 1e-4 and levels <= 1
    seeds = [png_floats(out / "images" / f"00000-0{k}.png") for k in range(2)]
    assert np.abs(seeds[0] - seeds[1]).max() > 0.05  # the images are not all alike
    assert [r["nfe"] for r in records] == [STEPS * (1 if method == "euler" else 2)] * len(records)


@pytest.mark.parametrize("height, width", [(64, 96), (96, 64)])
def test_non_square_images_equal_diffusers(pipeline, tmp_path, height, width):
    """--height/--width: the same noise (1, 16, H/8, W/8) from seed + k as diffusers' StableDiffusion3Pipeline
    at height x width, the same images (uint8 within 1)."""
    pipe, folder = pipeline
    out = tmp_path / "out"
    records = run_main(["--model", folder, "--method", "cfg", "--w", 2, "--steps", STEPS, "--height", height, "--width",
                        width, "--n-per-prompt", N, "--seed", 3, "--out", out, "--prompt", PROMPTS[1]])
    ref = pipe(prompt=PROMPTS[1], num_inference_steps=STEPS, height=height, width=width, guidance_scale=3.0,
               num_images_per_prompt=N, generator=[torch.Generator("cpu").manual_seed(3 + k) for k in range(N)],
               output_type="np").images  # (N, H, W, 3) in [0, 1]
    levels = 0
    for k, record in enumerate(records):
        png = np.asarray(Image.open(out / record["file"]), dtype=np.int16)
        assert png.shape == (height, width, 3) and (record["height"], record["width"]) == (height, width)
        levels = max(levels, int(np.abs(png - (ref[k] * 255).round().astype(np.int16)).max()))
    print(f"\n{height} x {width}: {levels} uint8 levels from diffusers")
    assert levels <= 1
    assert np.abs(png_floats(out / records[0]["file"]) - png_floats(out / records[1]["file"])).max() > 0.05


def test_stability_single_file_with_text_encoders_from_a_folder(pipeline, single_file, tmp_path):
    """--model a Stability single file: its VAE (first_stage_model.*) is the default, the text encoders
    come from --text-encoders; the same images as from the pipeline folder."""
    _, folder = pipeline
    common = ["--method", "cfg", "--w", 2, "--steps", 2, "--res", RES, "--prompt", PROMPTS[0]]
    a = run_main(["--model", folder, "--out", tmp_path / "a"] + common)
    b = run_main(["--model", single_file, "--text-encoders", folder, "--out", tmp_path / "b"] + common)
    assert np.array_equal(png_floats(tmp_path / "a" / a[0]["file"]), png_floats(tmp_path / "b" / b[0]["file"]))
    assert b[0]["model"] == "sd3_tiny.safetensors"


def released_student_images(pipe, transformer, prompt, negative, w, steps, noise, guidance_mlp=None):
    """The oracle for a student: diffusers' own SD3 parts (its prompt encoding, its transformer with the
    authors' released TeEFusion term added to the conditioning as their transformer adds it, its
    FlowMatchEulerDiscreteScheduler loop, its VAE and image postprocessing), one call per step of the
    diffusers `transformer` on the conditional tokens. guidance_mlp: DistillCFG's MLP instead of Eq. 7's
    term."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with torch.no_grad():
        prompt_embeds, _, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative, do_classifier_free_guidance=True)
        tte = transformer.time_text_embed
        plain = tte.forward
        w_t = torch.tensor([float(w)])

        def released(timestep, pooled_projections):  # Eq. 7 as released: G(psi(1000 w)) * F(y - y_null) / 256
            if guidance_mlp is not None:
                return plain(timestep, pooled_projections) + oracles.mlp(guidance_mlp, tte.time_proj(1000 * w_t))
            fused = tte.timestep_embedder(tte.time_proj(1000 * w_t)) * tte.text_embedder(pooled_projections
                                                                                         - negative_pooled)
            return plain(timestep, pooled_projections) + fused / 256.0

        tte.forward = released
        try:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
            scheduler.set_timesteps(steps)
            latents = noise.clone()
            for t in scheduler.timesteps:
                v = transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=prompt_embeds,
                                     pooled_projections=pooled, return_dict=False)[0]
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
        finally:
            tte.forward = plain
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")[0]  # (H, W, 3) in [0, 1]


def test_student_equals_the_released_student_on_diffusers(pipeline, tmp_path):
    """A student exported as distill.py writes it (its method in the metadata), through generate, against the
    released TeEFusion student written on diffusers' own modules (released_student_images), with the same
    seed and a negative prompt as y_null; also DistillCFG with its fusion.safetensors beside the student."""
    pipe, folder = pipeline
    model = mmdit.load_mmdit(folder)
    with torch.no_grad():  # G and F 128x larger: a w term this tiny random model shows in its images
        for embedder in (model.t_embedder, model.y_embedder):
            embedder.mlp[2].weight.mul_(128)
            embedder.mlp[2].bias.mul_(128)
    mmdit.save_mmdit_diffusers(model, str(tmp_path / "reference"))
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "reference").eval()
    for method in ("teefusion", "distillcfg"):
        run_dir = tmp_path / method
        run_dir.mkdir()
        mmdit.save_mmdit(model, str(run_dir / "student.safetensors"), {"teefusion_method": method})
        torch.manual_seed(1)
        fusion = embed.make_fusion(method, model.config)
        if method == "distillcfg":
            save_file({k: v.contiguous() for k, v in fusion.state_dict().items()},
                      str(run_dir / "fusion.safetensors"), {"teefusion_method": method})
        run_main(["--model", folder, "--method", "student", "--student", run_dir / "student.safetensors",
                  "--w", 3, "--steps", STEPS, "--res", RES, "--prompt", PROMPTS[1], "--negative-prompt", "photo",
                  "--seed", 5, "--out", run_dir / "out"])
        noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator("cpu").manual_seed(5))
        mlp = fusion.guidance_in.mlp if method == "distillcfg" else None
        ref, other_w = (np.round(released_student_images(pipe, transformer, PROMPTS[1], "photo", w, STEPS, noise, mlp)
                                 * 255).astype(np.int16) for w in (3.0, 9.0))
        png = np.asarray(Image.open(run_dir / "out" / "images" / "00000-00.png"), dtype=np.int16)
        print(f"\nstudent ({method}) vs the released student on diffusers: {np.abs(png - ref).max()} uint8 levels "
              f"(w = 9 instead of 3 moves it by {np.abs(other_w - ref).max()})")
        assert np.abs(png - ref).max() <= 1 and np.abs(other_w - ref).max() > 10  # w is seen
    model2, fusion2 = student_file.load_student(str(run_dir / "student.safetensors"))  # the method from the metadata
    assert isinstance(fusion2, embed.DistillCFG) and torch.equal(fusion2.guidance_in.mlp[0].weight,
                                                                 fusion.guidance_in.mlp[0].weight)
    with pytest.raises(ValueError, match="trained as 'distillcfg'"):
        student_file.student_files(str(run_dir / "student.safetensors"), "teefusion")
    os.remove(run_dir / "fusion.safetensors")
    with pytest.raises(FileNotFoundError, match="fusion.safetensors"):
        student_file.load_student(str(run_dir / "student.safetensors"))


def test_resume_metadata_index_and_sheet(pipeline, tmp_path):
    _, folder = pipeline
    out = tmp_path / "out"
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    argv = ["--model", folder, "--method", "zsampling", "--w", 2, "--steps", 3, "--res", RES, "--n-per-prompt", 2,
            "--prompts", tmp_path / "p.jsonl", "--out", out]
    first = run_main(argv)
    files = sorted(os.listdir(out / "images"))
    assert files == ["00000-00.png", "00000-01.png", "00001-00.png", "00001-01.png"]
    info = Image.open(out / "images" / "00001-01.png").info  # the PNG's own text metadata
    assert info["prompt"] == PROMPTS[1] and info["negative_prompt"] == "" and info["method"] == "zsampling"
    assert (info["w"], info["steps"], info["seed"], info["nfe"]) == ("2.0", "3", "1", str(6 * 2 + 2))
    assert info["model"] == "pipeline" and float(info["seconds"]) > 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert index == first and index[3]["file"] == os.path.join("images", "00001-01.png")
    sheet = Image.open(out / "contact.png")
    assert sheet.size == (110 + 2 * (RES + 2), 20 + 2 * (RES + 2))  # 2 prompts x 2 seeds, labelled, 2 px gutters
    stamps = {f: os.stat(out / "images" / f).st_mtime_ns for f in files}
    time.sleep(0.01)
    assert run_main(argv) == first  # nothing new: every image was there
    assert {f: os.stat(out / "images" / f).st_mtime_ns for f in files} == stamps
    before = png_floats(out / "images" / "00001-00.png")
    os.remove(out / "images" / "00001-00.png")
    again = run_main(argv)
    assert {f: os.stat(out / "images" / f).st_mtime_ns for f in files if f != "00001-00.png"} == \
        {f: s for f, s in stamps.items() if f != "00001-00.png"}  # only the deleted one was made again
    assert np.array_equal(png_floats(out / "images" / "00001-00.png"), before) and again[2]["seed"] == 0
    assert not [f for f in os.listdir(out / "images") if ".tmp-" in f]  # no temporary files left
    with pytest.raises(FileExistsError, match="00000-00.png was made with w=2.0, not 3.0"):
        run_main(argv[:4] + ["--w", 3] + argv[6:])


def test_toy_world_through_the_same_command(tmp_path, monkeypatch):
    world = toy.build_world(cache_dir=str(tmp_path / "cache"), progress=False,
                            settings=toy.TrainSettings(steps=30, weak_step=10))
    student = str(tmp_path / "student.safetensors")
    mmdit.save_mmdit(mmdit.load_mmdit(world.teacher_path), student, {"teefusion_method": "teefusion"})
    monkeypatch.setattr(toy, "build_world", lambda **kw: world)  # the command line's --toy, on this small world
    prompt = "a red plus left of a blue square"
    args = generate.build_parser().parse_args(["--toy", "--prompt", prompt, "--method", "student", "--student",
                                               student, "--steps", "6", "--w", "4", "--out", str(tmp_path / "out")])
    records = generate.main(args)
    png = np.asarray(Image.open(tmp_path / "out" / "images" / "00000-00.png"))
    assert png.shape == (toy.H * generate.TOY_VIEW, toy.W * generate.TOY_VIEW, 3) and records[0]["nfe"] == 6
    context, y = world.encoders.encode([prompt])
    context_null, y_null = world.encoders.encode_null()
    noise = torch.randn(1, 3, toy.H, toy.W, generator=torch.Generator("cpu").manual_seed(0))
    x0, _ = samplers.sample("student", mmdit.load_mmdit(student), noise, context, y, context_null, y_null, w=4.0,
                            steps=6)
    ref = vae.to_uint8(x0)[0].numpy().repeat(generate.TOY_VIEW, 0).repeat(generate.TOY_VIEW, 1)  # nearest x8
    assert np.abs(png.astype(int) - ref.astype(int)).max() <= 1
    other = mmdit.load_mmdit(student)  # a later student under the same name, relaunched into the same --out
    with torch.no_grad():
        other.final_layer.linear.bias.add_(0.01)
    mmdit.save_mmdit(other, student, {"teefusion_method": "teefusion"})
    with pytest.raises(FileExistsError, match="00000-00.png was made by other weights of the same name .--student "
                                              "differs"):
        generate.main(args)
    w2sd = generate.generate([prompt], str(tmp_path / "w2sd"), world=world, method="w2sd", steps=3, progress=False)
    assert w2sd[0]["nfe"] == 6 * 2 + 2 and "toy world" in w2sd[0]["w2sd"]


# ---- bad input: one `error:` line naming the thing, exit status 2, before anything heavy loads ----

BAD = [
    (["--model", "{broken}", "--prompt", "a cat"], "{broken}/tokenizer_2"),  # the pipeline without tokenizer_2
    (["--model", "{folder}/transformer", "--text-encoders", "{folder}", "--prompt", "a cat"], "--vae"),
    (["--model", "{folder}", "--vae", "{root}/nowhere", "--prompt", "a cat"], "nowhere"),
    (["--model", "{root}/no_model", "--prompt", "a cat"], "no_model"),
    (["--model", "{folder}", "--prompts", "{root}/empty.txt"], "empty.txt"),
    (["--model", "{folder}", "--prompt", "a cat", "--res", "72"], "--res 72"),
    (["--model", "{folder}", "--prompt", "a cat", "--res", "256"], "position table"),
    (["--model", "{folder}", "--prompt", "a cat", "--height", "72", "--width", "64"], "--height 72 is not a multiple"),
    (["--model", "{folder}", "--prompt", "a cat", "--height", "64", "--width", "256"], "--width 256 is beyond"),
    (["--model", "{folder}", "--prompt", "a cat", "--res", "64", "--height", "64"], "--res is the shorthand"),
    (["--model", "{folder}", "--prompt", "a cat", "--method", "dpm"], "--method"),
    (["--model", "{folder}", "--prompt", "a cat", "--method", "student"], "--student"),
    (["--model", "{folder}", "--prompt", "a cat", "--method", "w2sd"], "--weak"),
    (["--model", "{folder}", "--prompt", "a cat", "--w", "-1"], "--w -1"),
    (["--model", "{folder}", "--prompt", "a cat", "--out", "{root}/empty.txt/out"], "empty.txt/out"),
    (["--toy", "--model", "{folder}", "--prompt", "a cat"], "--model"),
    (["--model", "{single}", "--prompt", "a cat"], "--text-encoders"),
]


@pytest.fixture(scope="module")
def bad_runs(pipeline, single_file, tmp_path_factory):
    """Every BAD command line run as `python generate.py ...`, all at once (they are independent)."""
    _, folder = pipeline
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("\n \n")
    broken = root / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("tokenizer_2"))
    argvs = [[a.format(folder=folder, root=root, broken=broken, single=single_file) for a in argv]
             + ([] if {"--res", "--height"} & set(argv) else ["--res", "64"])
             + ([] if "--out" in argv else ["--out", str(root / "o")])
             for argv, _ in BAD]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "generate.py"), *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) for argv in argvs]
    outputs = [p.communicate(timeout=300) for p in procs]
    return root, broken, argvs, [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_one_error_line_exit_2(bad_runs, case, monkeypatch, capsys):
    root, broken, argvs, results = bad_runs
    named = BAD[case][1].format(root=root, broken=broken)
    status, stdout, stderr = results[case]
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], stderr
    assert stdout == ""

    def heavy(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    # in this process, with every loader replaced by one that fails: the same error, nothing loaded
    for owner, name in ((mmdit, "load_mmdit"), (mmdit, "load_mmdit_blend"), (vae, "load_vae"),
                        (text_encoders.TextEncoders, "from_pretrained"), (student_file, "load_student"), (toy, "build_world")):
        monkeypatch.setattr(owner, name, heavy)
    with pytest.raises(SystemExit) as e:
        cli.run(generate.main, generate.build_parser(), argvs[case])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0]


# ---- evaluate.py table4: every method and student on the same prompts and seeds, scored ----


def test_table4_end_to_end(pipeline, clip_folder, tmp_path, capsys):
    _, folder = pipeline
    student = tmp_path / "student.safetensors"
    mmdit.save_mmdit(mmdit.load_mmdit(folder), str(student), {"teefusion_method": "teefusion"})
    out = tmp_path / "t4"
    argv = ["table4", "--model", folder, "--methods", "euler,cfg", "--student", f"teefusion={student}",
            "--prompt", "a red cat", "--prompt", "the blue dog", "--steps", "2", "--res", "32", "--w", "3",
            "--score", f"clip={clip_folder}", "--out", str(out)]
    cli.run(evaluate.main, evaluate.build_parser(), argv)
    table = json.loads((out / "table4.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == ["euler", "cfg", "teefusion"] and table["title"].startswith("Table 4: 2 prompts x 1 images")
    assert (rows["euler"]["NFE"], rows["cfg"]["NFE"], rows["teefusion"]["NFE"]) == (2, 4, 2)
    assert rows["euler"]["w"] == "-" and rows["cfg"]["w"] == 3.0 and all(r["s_per_image"] > 0 for r in rows.values())
    # the score column is the mean CLIP score of the row's images, scored independently here
    scorer = evaluate.metrics.load_scorer("clip", clip=clip_folder)
    pics = evaluate.open_images([str(out / "cfg" / "images" / f"0000{i}-00.png") for i in range(2)])
    assert rows["cfg"]["clip"] == pytest.approx(max(0.0, float(scorer(pics, ["a red cat", "the blue dog"]).mean())))
    assert "| teefusion |" in (out / "table4.md").read_text()
    assert Image.open(out / "grid.png").size == (110 + 2 * 258, 20 + 3 * 258)  # methods x prompts, labelled
    # the sweep (Fig. 5a): every guided row at each w, in its own folder; w = 3 gives the same images
    cli.run(evaluate.main, evaluate.build_parser(), argv[:-2] + ["--w-sweep", "1,3", "--out", str(out / "sweep")])
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert set(sweep) == {"cfg", "teefusion"} and set(sweep["cfg"]) == {"1.0", "3.0"}
    assert sweep["cfg"]["3.0"]["clip"] == pytest.approx(rows["cfg"]["clip"])
    assert os.path.isfile(out / "sweep" / "sweep-clip.png") and os.path.isfile(out / "sweep" / "sweep-grid.png")
    bad = argv[:-2] + ["--methods", "cfg,w2sd", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as e:  # a bad row is refused before anything runs
        cli.run(evaluate.main, evaluate.build_parser(), bad)
    assert e.value.code == 2 and "w2sd needs a model pair" in capsys.readouterr().err
