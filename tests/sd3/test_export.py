"""
sd3/export.py: the model card beside a run's final files and in the diffusers export, and the export as a
complete pipeline folder when the teacher is one.

The authors' released TeEFusion pipeline (github.com/AIDC-AI/TeEFusion, inference only, CC-BY-NC 4.0) is
not a dependency and is not copied here: its two classes are re-expressed below on diffusers' own classes,
the way tests/test_embed.py re-expresses its transformer's forward. Its transformer is diffusers'
SD3Transformer2DModel plus two config flags and, with txt_align_guidance, the term
timestep_embedder(time_proj(1000 w)) * text_embedder(pooled - pooled_null) / 256 added to the conditioning;
its pipeline encodes the prompt with the three encoders (CLIP penultimate states, projected pooled outputs,
T5), the null prompt "" (its pooled vector only), draws the noise of the call from one generator seeded with
`seed` in the transformer's dtype, runs the scheduler's Euler steps with guidance_scale = w fed to psi, and
decodes with the VAE. The export must load into it (through the custom-component entry of model_index.json,
as the card tells a user to do) and give generate.py's image.

    python -m pytest -q tests/sd3/test_export.py
"""

import os
import shutil
import shlex
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from run import cli
import distill
import embed
from sd3 import export
import generate
from sd3 import lora
import mmdit
from run import options
import toy

import diffusers  # test oracle (requirements-test.txt)

RES, STEPS = 64, 4

# The released transformer class, re-expressed on diffusers' SD3Transformer2DModel: written by the test into
# the export's transformer/sd3_model.py, the file the export's model_index.json names (the card's `cp` step).
RELEASED_TRANSFORMER = textwrap.dedent('''
    import diffusers
    from diffusers.configuration_utils import register_to_config


    class SD3Transformer2DModel(diffusers.SD3Transformer2DModel):
        @register_to_config
        def __init__(self, sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64,
                     num_attention_heads=18, joint_attention_dim=4096, caption_projection_dim=1152,
                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, dual_attention_layers=(),
                     qk_norm=None, guidance=False, txt_align_guidance=False):
            super().__init__(sample_size, patch_size, in_channels, num_layers, attention_head_dim, num_attention_heads,
                             joint_attention_dim, caption_projection_dim, pooled_projection_dim, out_channels,
                             pos_embed_max_size, dual_attention_layers, qk_norm)
            self.txt_align_guidance = txt_align_guidance

        def forward(self, *args, txt_align_guidance=None, txt_align_vec=None, **kwargs):
            tte = self.time_text_embed
            plain = tte.forward
            if self.txt_align_guidance:  # the released term, added to temb = time_text_embed(t, pooled)
                assert txt_align_guidance is not None and txt_align_vec is not None
                fused = tte.timestep_embedder(tte.time_proj(txt_align_guidance).to(txt_align_vec.dtype)) \\
                    * tte.text_embedder(txt_align_vec) / 256.0
                tte.forward = lambda timestep, pooled: plain(timestep, pooled) + fused
            try:
                return super().forward(*args, **kwargs)
            finally:
                tte.forward = plain
''')


class TeEFusionSD3Pipeline(diffusers.DiffusionPipeline):
    """The released pipeline's loading (its nine modules) and sampling, re-expressed."""

    def __init__(self, transformer, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3,
                 vae, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                              tokenizer_3=tokenizer_3, vae=vae, scheduler=scheduler)

    def encode(self, prompts):
        tokens, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            tokens.append(out.hidden_states[-2])  # (B, 77, D_k)
            pooled.append(out[0])  # (B, D_k)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=256, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        t5 = self.text_encoder_3(ids)[0]  # (B, 256, D_t5)
        clip = torch.nn.functional.pad(torch.cat(tokens, -1), (0, t5.shape[-1] - sum(t.shape[-1] for t in tokens)))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, -1)  # (B, 333, D_t5), (B, Dy)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=50, guidance_scale=7.5, height=1024, width=1024, seed=0):
        context, pooled = self.encode(prompt)
        _, pooled_null = self.encode([""])
        self.scheduler.set_timesteps(num_inference_steps)
        dtype = self.transformer.dtype
        latents = torch.randn(len(prompt), self.transformer.config.in_channels, height // 8, width // 8, dtype=dtype,
                              generator=torch.Generator("cpu").manual_seed(seed))
        for t in self.scheduler.timesteps:
            v = self.transformer(hidden_states=latents, timestep=t.reshape(1), encoder_hidden_states=context,
                                 pooled_projections=pooled, return_dict=False,
                                 txt_align_guidance=torch.tensor((guidance_scale,), dtype=dtype) * 1000.0,
                                 txt_align_vec=pooled - pooled_null)[0]
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        x = latents.float() / self.vae.config.scaling_factor + self.vae.config.shift_factor
        x = (self.vae.decode(x, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        return [Image.fromarray(a) for a in (x.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")]


def run_args(teacher, data, out, *extra):
    return options.parse_args(["--teacher", teacher, "--data", data, "--out", str(out), "--teacher-sampler", "cfg",
                               "--global-batch", "2", "--lr", "1e-3", "--teacher-steps", str(STEPS), "--no-progress",
                               "--device", "cpu", "--sample-every", "0", *extra])


def card_commands(text, program):
    """The `python PROGRAM ...` (or `python -m PROGRAM ...`) command lines of a card, as argument lists."""
    start = f"python {program} " if program.endswith(".py") else f"python -m {program} "
    return [shlex.split(line.strip())[len(start.split()):] for line in text.splitlines()
            if line.strip().startswith(start)]


def uint8(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def states_w_convention_and_loaders(card):
    for fact in ("(1 + w) v(x, t, c) - w v(x, t, null)", "`guidance_scale` is g = 1 + w", "`guidance_scale` IS w",
                 "generate.py", "## Loaders that do NOT compute Eq. 7", "SD3Transformer2DModel", "ComfyUI",
                 "silently lose w"):
        assert fact in card, fact


def test_run_card_and_the_pipeline_folder_in_the_released_pipeline(sd3_pipeline, sd3_data, tmp_path, monkeypatch):
    _, teacher = sd3_pipeline
    out = tmp_path / "run"
    distill.main(run_args(teacher, sd3_data, out, "--steps", "2", "--export-diffusers"))

    card = (out / "README.md").read_text()
    states_w_convention_and_loaders(card)
    for fact in (f"| teacher | pipeline ({teacher}) |", "Euler + CFG (Eq. 2), its step on the 4-step schedule",
                 "| steps | 2 of 2 optimizer steps (AdamW, lr 0.001, global batch 2", "drawn uniformly in [2.0, 14.0]",
                 f"| data | {sd3_data} |", "TeEFusionSD3Pipeline.from_pretrained", "guidance_scale=5",
                 "psi as 4992", "`diffusers/`"):
        assert fact in card, fact
    # the card's generate.py command runs (here at 64 px, into a folder of the test's)
    (argv,) = card_commands(card, "generate.py")
    records = generate.main(generate.build_parser().parse_args(argv + ["--res", str(RES), "--out", str(tmp_path / "g")]))
    assert records[0]["nfe"] == 50 and records[0]["student"] == "student.safetensors"

    folder = out / "diffusers"
    assert sorted(os.listdir(folder)) == sorted(["README.md", "model_index.json", "transformer", *export.COMPONENTS])
    teacher_vae = os.path.join(teacher, "vae", "diffusion_pytorch_model.safetensors")
    assert os.stat(folder / "vae" / "diffusion_pytorch_model.safetensors").st_ino == os.stat(teacher_vae).st_ino
    export_card = (folder / "README.md").read_text()
    states_w_convention_and_loaders(export_card)
    assert "hard-linked from" in export_card and "library_name: diffusers" in export_card
    assert f"cp pipelines/sd3_model.py {folder}/transformer/sd3_model.py" in export_card
    # stock diffusers cannot load the folder as a pipeline (that would silently drop w) ...
    with pytest.raises((ValueError, ImportError, OSError)):
        diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    # ... the released pipeline does, once its transformer class is where model_index.json names it
    (folder / "transformer" / "sd3_model.py").write_text(RELEASED_TRANSFORMER)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    pipe = TeEFusionSD3Pipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.transformer.config.txt_align_guidance
    prompt, levels = "a big dog on the grass", []
    for w in (5.0, 2.0):
        released = np.asarray(pipe([prompt], STEPS, guidance_scale=w, height=RES, width=RES)[0], dtype=np.int16)
        ours = generate.generate([prompt], str(tmp_path / f"ours{w:g}"), model=str(folder), method="student",
                                 student=str(folder / "transformer"), w=w, steps=STEPS, res=RES, progress=False)
        levels.append(int(np.abs(uint8(tmp_path / f"ours{w:g}" / ours[0]["file"]) - released).max()))
    # one velocity: the loaded released transformer is Eq. 7 on the student; stock diffusers' drops the fused term
    student = mmdit.load_mmdit(str(folder / "transformer"))
    stock = diffusers.SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    (context, pooled), (_, pooled_null) = pipe.encode([prompt]), pipe.encode([""])
    with torch.no_grad():
        ours = {w: student(x, t, context, pooled, vec=embed.teefusion_conditioning(student, t, pooled, pooled_null, w))
                for w in (5.0, 2.0)}  # (1, 16, 8, 8)
        released = {w: pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=context,
                                        pooled_projections=pooled, txt_align_guidance=torch.tensor([1000 * w]),
                                        txt_align_vec=pooled - pooled_null)[0] for w in (5.0, 2.0)}
        plain = stock(hidden_states=x, timestep=1000 * t, encoder_hidden_states=context, pooled_projections=pooled)[0]
    error = max((released[w] - ours[w]).abs().max().item() for w in ours)
    by_w = (released[5.0] - released[2.0]).abs().max().item()
    dropped = (plain - released[5.0]).abs().max().item()
    print(f"\nthe released pipeline on the export vs generate.py: {levels} uint8 levels at w = 5, 2; one velocity: "
          f"{error:.1e} from Eq. 7, w = 5 vs 2 {by_w:.1e} apart, stock diffusers {dropped:.1e} off")
    assert max(levels) <= 1 and error <= 1e-6 * released[5.0].abs().max().item()
    assert by_w > 50 * error and dropped > 50 * error  # w reaches the velocity; stock diffusers loses it


def test_export_command_and_a_lora_run_card(sd3_pipeline, sd3_data, tmp_path, capsys):
    _, teacher = sd3_pipeline
    out = tmp_path / "lora"
    distill.main(run_args(teacher, sd3_data, out, "--steps", "1", "--lora", "2"))
    card = (out / "README.md").read_text()
    states_w_convention_and_loaders(card)
    assert "# LoRA TeEFusion student" in card and "rank 2" in card and "sd3.lora merge" in card
    (argv,) = card_commands(card, "generate.py")  # the adapter over the teacher, runnable
    records = generate.main(generate.build_parser().parse_args(argv + ["--res", str(RES), "--out", str(tmp_path / "g"),
                                                                       "--steps", "2"]))
    assert records[0]["lora"] == "lora.safetensors"
    # the card's merge then sd3/export.py, as it says (its --components: this test's pipeline)
    (merge,) = card_commands(card, "sd3.lora")
    assert merge[0] == "merge"
    flags = dict(zip(merge[1::2], merge[2::2]))
    lora.merge_files(flags["--base"], flags["--lora"], flags["--out"])
    (export_argv,) = card_commands(card, "sd3.export")
    export_argv = [teacher if a == export.PIPELINE_FOLDER else a for a in export_argv]
    export_argv = [str(tmp_path / "pipe") if a == "PIPELINE_OUT" else a for a in export_argv]
    cli.run(export.main, export.build_parser(), export_argv)
    assert "components hard-linked" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "pipe" / "model_index.json")
    assert "rank 2" in (tmp_path / "pipe" / "README.md").read_text()
    before = {n: (tmp_path / "pipe" / n).stat().st_mtime_ns for n in ("README.md", "model_index.json")}
    cli.run(export.main, export.build_parser(), export_argv)  # over its own earlier export: written again
    assert all((tmp_path / "pipe" / n).stat().st_mtime_ns >= t for n, t in before.items())
    capsys.readouterr()
    run_files = sorted(os.listdir(out))
    # refusals: the teacher's own folder as --out; a missing student; the run's folder (its card and student
    # would be replaced); a folder holding the student; --card with an export's flags; one line, exit 2
    pipe = str(tmp_path / "pipe")
    for bad, named in (([*export_argv[:-2], "--out", teacher], "--out"),
                       (["--student", str(tmp_path / "none"), "--out", str(tmp_path / "x")], "--student"),
                       (["--student", str(shutil.copy(flags["--out"], tmp_path / "s.safetensors")), "--out", str(out)],
                        "no export of this command"),
                       (["--student", os.path.join(pipe, "transformer"), "--out", pipe], "holds --student"),
                       (["--card", flags["--out"], "--student", flags["--out"], "--out", str(tmp_path / "y")],
                        "--card PATH prints")):
        with pytest.raises(SystemExit) as e:
            cli.run(export.main, export.build_parser(), bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert sorted(os.listdir(out)) == run_files and not os.path.exists(tmp_path / "y")


def test_toy_run_card(tmp_path, monkeypatch):
    world = toy.build_world(cache_dir=str(tmp_path / "cache"), progress=False,
                            settings=toy.TrainSettings(steps=20, batch_size=8, weak_step=10))
    monkeypatch.setattr(toy, "build_world", lambda **kw: world)
    out = tmp_path / "toy"
    distill.main(options.parse_args(["--steps", "1", "--global-batch", "4", "--out", str(out), "--no-report",
                                     "--no-progress", "--sample-every", "0"]))
    card = (out / "README.md").read_text()
    assert "W2SD + CFG (Eq. 3-4)" in card and "cannot run it" in card and "`guidance_scale` IS w" in card
    (argv,) = card_commands(card, "generate.py")
    assert argv[:3] == ["--toy", "--method", "student"]
    generate.main(generate.build_parser().parse_args(argv + ["--out", str(tmp_path / "g")]))
