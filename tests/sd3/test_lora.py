"""
Tests for sd3/lora.py and distill.py --lora (LoRA students), on tiny MMDiTs on the CPU:
  - at init the LoRA student equals its teacher exactly (plain forward, Eq. 7, and the sampler that
    precomputes every step's adaLN outputs), sharing the teacher's tensors;
  - the fused qkv holds three independent adapters (q, k, v); merged equals unmerged to 1e-5;
  - the adapter file in diffusers' SD3 LoRA format: diffusers' own loader (SD3Transformer2DModel built
    from our export, load_lora_adapter) gives our output to 1e-5, also with adaLN (halves swapped),
    SD3.5-medium's attn2 and G / F trained fully; a file diffusers writes loads here;
  - Algorithm 1's first step by hand (loss, AdamW on the adapters); torchrun with 2 gloo ranks equals
    1 process; stop and resume is bitwise; refused arguments with one-line errors;
  - `python -m sd3.lora merge` and generate.py --lora give the merged student's images; parameter counts.

    python -m pytest -q tests/sd3/test_lora.py -s     # -s prints the parity numbers
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import distill
import embed
import generate
from sd3 import lora
from run import options
import oracles  # tests/oracles.py
import samplers
import toy
from mmdit import CONFIGS, MMDiT, load_mmdit, save_mmdit_diffusers
from test_distill import (REPO, assert_adam_close, distill_cli, first_batch, make_shards, make_teacher, one_error,
                          read_log, torchrun_distill)
from sd3 import student_file

CFG = CONFIGS["tiny-sd3"]
EVERY = ["qkv", "proj", "fc1", "fc2", "adaln", "context_embedder", "final"]  # every target but G and F


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"teacher": make_teacher(root / "teacher.safetensors"), "data": make_shards(root / "data")}


def perturbed(config=CFG, seed=0):
    """An MMDiT with every weight perturbed (a fresh one outputs zeros: adaLN-zero)."""
    torch.manual_seed(seed)
    model = MMDiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.requires_grad_(False)


def trained(student, seed=1, scale=0.05):
    """Move every trainable tensor of a LoRA student (B = 0 at init would hide the adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return student


def inputs(config=CFG, B=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_channels, 8, 8, generator=g)  # (B, C, H, W)
    context = torch.randn(B, 5, config.context_dim, generator=g)  # (B, L, Dc)
    y, y_null = torch.randn(B, config.pooled_dim, generator=g), torch.randn(1, config.pooled_dim, generator=g)
    return x, torch.tensor([0.3, 0.8][:B]), context, y, y_null


def student_sample(model, x, context, y, y_null, w=3.0, steps=4):
    """samplers.sample("student"): z of Eq. 7 and every adaLN output for all steps at once (student_steps)."""
    return samplers.sample("student", model, x, context, y, context[:1], y_null, w=w, steps=steps)[0]


# -----------------------------------------------------------------------------
# The adapters


def test_at_init_the_student_is_the_teacher_exactly():
    teacher = perturbed()
    spec = lora.settings(4, 8.0, targets=EVERY + ["embedders"], full=())
    student = lora.attach(teacher, spec)
    x, t, context, y, y_null = inputs()
    with torch.no_grad():
        assert torch.equal(student(x, t, context, y), teacher(x, t, context, y))
        z = embed.teefusion_conditioning(teacher, t, y, y_null, torch.tensor([2.0, 7.0]))
        assert torch.equal(student(x, t, context, y, vec=z), teacher(x, t, context, y, vec=z))
        assert torch.equal(student_sample(student, x, context, y, y_null), student_sample(teacher, x, context, y, y_null))
    # the frozen weights are the teacher's own tensors; only the adapters train
    shared = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        if name in shared:
            assert p is shared[name] and not p.requires_grad
        else:
            assert name.endswith((".lora_A", ".lora_B")) and p.requires_grad
    qkv = student.joint_blocks[0].x_block.attn.qkv
    assert qkv.lora_A.shape == (3 * 4, 64) and qkv.lora_B.shape == (3 * 64, 4) and not qkv.lora_B.any()
    assert qkv.lora_A.abs().max() <= 1 / 64 ** 0.5  # nn.Linear's draw: U(-1/sqrt(in), 1/sqrt(in))
    # trained fully: float32 copies of G and F, the teacher's left alone
    full = lora.attach(teacher, lora.settings(4))
    G = full.t_embedder.mlp[0].weight
    assert G.requires_grad and G is not teacher.t_embedder.mlp[0].weight and torch.equal(G, teacher.t_embedder.mlp[0].weight)


def test_fused_qkv_holds_three_independent_adapters():
    """lora_A stacks A_q, A_k, A_v and lora_B stacks B_q, B_k, B_v: the layer adds (alpha / r) B_p A_p x to
    the rows of each projection, not (alpha / r) B A x with one shared A."""
    teacher = perturbed()
    student = trained(lora.attach(teacher, lora.settings(3, 6.0, targets=["qkv"], full=())))
    layer = student.joint_blocks[1].context_block.attn.qkv
    h = torch.randn(2, 5, 64)
    A, B = layer.lora_A.view(3, 3, 64), layer.lora_B.view(3, 64, 3)
    by_hand = torch.cat([h @ layer.weight[64 * p:64 * (p + 1)].T + layer.bias[64 * p:64 * (p + 1)]
                         + 2.0 * h @ A[p].T @ B[p].T for p in range(3)], dim=-1)  # scale 6 / 3
    with torch.no_grad():
        torch.testing.assert_close(layer(h), by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(A[0], A[1])  # independent A per projection


def test_merged_equals_unmerged_and_the_base_is_untouched():
    teacher = perturbed()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = trained(lora.attach(teacher, lora.settings(4, 2.0, targets=EVERY, full=["embedders"])))
    merged = lora.merge(student)
    x, t, context, y, y_null = inputs()
    with torch.no_grad():
        a, b = student(x, t, context, y), merged(x, t, context, y)
        # the sampler that computes every adaLN output before the first step honours the adaLN adapters
        sa, sb = student_sample(student, x, context, y, y_null), student_sample(merged, x, context, y, y_null)
        moved = (a - teacher(x, t, context, y)).abs().max().item()
    print(f"\nmerged vs unmerged: forward {(a - b).abs().max():.1e}, 4-step student sampler {(sa - sb).abs().max():.1e}; "
          f"the adapters move the output by {moved:.2f}")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(sa, sb, rtol=0, atol=1e-5)
    assert moved > 0.1
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert set(merged.state_dict()) == set(teacher.state_dict())  # a plain MMDiT: Stability names only


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5-medium"])
def test_the_adapter_file_loads_in_diffusers_with_the_same_output(name, tmp_path):
    """diffusers (test oracle) builds its SD3Transformer2DModel from our export of the base, then reads our
    lora.safetensors with its own loader (peft): same output as our student to 1e-5. Every target (adaLN
    of the last text stream and of the final layer: diffusers' swapped halves), G and F trained fully
    (full-rank pairs with lora_B.bias), SD3.5-medium's attn2 and qk norm. Then a file that diffusers
    itself writes (save_lora_adapter) loads here with the same output."""
    import peft  # noqa: F401  (diffusers' LoRA loader needs it: a missing oracle fails, not skips)
    from diffusers import SD3Transformer2DModel

    config = CONFIGS[name]
    base = perturbed(config)
    student = trained(lora.attach(base, lora.settings(3, 6.0, targets=EVERY, full=["embedders"])))
    path = lora.save_adapter(student, base, str(tmp_path / "lora.safetensors"), {"teefusion_method": "teefusion"})
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight" in keys
    assert "transformer.time_text_embed.timestep_embedder.linear_1.lora_B.bias" in keys
    save_mmdit_diffusers(base, str(tmp_path / "transformer"))
    ref = SD3Transformer2DModel.from_pretrained(str(tmp_path / "transformer")).eval()
    ref.load_lora_adapter(path, prefix="transformer", adapter_name="ours")
    x, t, context, y, _ = inputs(config)
    with torch.no_grad():
        ours = student(x, t, context, y)
        theirs = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=1000 * t).sample
        again = lora.load_adapter(base, path)[0](x, t, context, y)  # our own reader
    assert sum(v.numel() for v in load_file(path).values()) == lora.count(config, lora.settings(
        3, targets=EVERY, full=["embedders"]))[2]
    print(f"\n{name}: |ours - diffusers with our adapter| {(ours - theirs).abs().max():.1e}, read back "
          f"{(ours - again).abs().max():.1e}")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-5)

    ref.save_lora_adapter(str(tmp_path / "theirs"), adapter_name="ours")  # diffusers' writer -> our reader
    file = os.path.join(tmp_path / "theirs", os.listdir(tmp_path / "theirs")[0])
    with torch.no_grad():
        read = lora.load_adapter(base, file)[0](x, t, context, y)
    torch.testing.assert_close(read, ours, rtol=0, atol=1e-5)


def test_bad_adapter_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 64)},
              str(tmp_path / "kohya.safetensors"))
    with pytest.raises(lora.CheckpointError, match="kohya-style"):
        lora.check_adapter(str(tmp_path / "kohya.safetensors"), CFG)
    save_file({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(2, 64),
               "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(64, 2)},
              str(tmp_path / "deep.safetensors"))
    with pytest.raises(lora.CheckpointError, match="transformer_blocks.7.attn.to_q is no Linear layer"):
        lora.check_adapter(str(tmp_path / "deep.safetensors"), CFG)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2)},
              str(tmp_path / "shape.safetensors"))
    with pytest.raises(lora.CheckpointError, match="do not fit a layer of 64 inputs"):
        lora.check_adapter(str(tmp_path / "shape.safetensors"), CFG)


def test_trainable_parameters_at_sd3_medium_size():
    """The count on the meta device against the layer sizes: per joint block and stream, q, k, v and
    proj (D -> D) and fc1 / fc2 (D <-> 4D) each r (in + out); the last text stream has its qkv only;
    G = Linear(256, D), Linear(D, D) and F = Linear(2048, D), Linear(D, D) with biases, trained fully."""
    D, r, depth = 1536, 16, 24
    stream = 4 * r * 2 * D + 2 * r * 5 * D
    adapters = (2 * depth - 1) * stream + 3 * r * 2 * D
    embedders = (256 * D + D + D * D + D) + (2048 * D + D + D * D + D)
    trained_count, total, _ = lora.count(CONFIGS["sd3-medium"], lora.settings(r, targets=["qkv", "proj", "fc1", "fc2"]))
    assert trained_count == adapters + embedders and 2.0e9 < total < 2.1e9
    adaln = (2 * depth - 1) * r * (D + 6 * D) + r * (D + 2 * D) + r * (D + 2 * D)  # the last text stream, final layer
    assert lora.count(CONFIGS["sd3-medium"], lora.settings(r, full=()))[0] == adapters + adaln


# -----------------------------------------------------------------------------
# distill.py --lora


def lora_args(world, out, *extra):
    return options.parse_args(["--teacher", world["teacher"], "--data", world["data"], "--out", str(out), "--no-progress",
                               "--device", "cpu", "--teacher-sampler", "cfg", "--lora", "2", *extra])


class HandLoRA(torch.nn.Module):
    """A LoRA layer written from the LoRA paper, for the test only: y = W x + b + (alpha / r) B_p A_p x on each
    of `parts` row blocks of the output (the fused qkv: q, k, v), W and b frozen, B = 0 at the start."""

    def __init__(self, linear, A, parts, alpha, rank):
        super().__init__()
        self.weight, self.bias, self.parts, self.s, self.r = linear.weight, linear.bias, parts, alpha / rank, rank
        self.A = torch.nn.Parameter(A.clone())  # (parts r, in)
        self.B = torch.nn.Parameter(torch.zeros(linear.weight.shape[0], rank))  # (out, r)

    def forward(self, x):
        out = x @ self.weight.T + self.bias
        rows = self.weight.shape[0] // self.parts
        pieces = [x @ self.A[p * self.r:(p + 1) * self.r].T @ self.B[p * rows:(p + 1) * rows].T for p in range(self.parts)]
        return out + self.s * torch.cat(pieces, -1)


def hand_student(teacher, saved, rank):
    """The teacher with a HandLoRA on every default target (attention qkv and proj, MLP fc1 and fc2, every
    adaLN Linear) and G and F trainable; A taken from the run's first checkpoint (B = 0 gives A no gradient,
    so it has not moved). Returns (model, {checkpoint name: parameter})."""
    import copy

    model = copy.deepcopy(teacher).requires_grad_(False)
    params = {}
    targets = re.compile(r"(joint_blocks\.\d+\.(x_block|context_block)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|"
                         r"adaLN_modulation\.1)|final_layer\.adaLN_modulation\.1)$")
    for name, module in list(model.named_modules()):
        if targets.match(name):
            parent, leaf = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            hand = HandLoRA(module, saved[name + ".lora_A"], 3 if name.endswith("qkv") else 1, rank, rank)
            setattr(parent, leaf, hand)
            params[name + ".lora_A"], params[name + ".lora_B"] = hand.A, hand.B
    for name, p in model.named_parameters():
        if name.startswith(("t_embedder.", "y_embedder.")):
            p.requires_grad_(True)
            params[name] = p
    return model, params


def test_first_step_by_hand(world, tmp_path):
    """Algorithm 1 on a LoRA student: the first loss is the full student's (at init the student is the
    teacher), and its update is AdamW on LoRA layers written here from the LoRA paper (HandLoRA) and on G
    and F, with Eq. 7 by hand (tests/oracles.py); A does not move on the first step (B = 0 gives it no
    gradient)."""
    common = ["--steps", "1", "--global-batch", "4", "--lr", "1e-3", "--w-min", "2", "--w-max", "6"]
    distill.main(lora_args(world, tmp_path / "lora", *common))
    full = options.parse_args(["--teacher", world["teacher"], "--data", world["data"], "--out", str(tmp_path / "full"),
                               "--no-progress", "--device", "cpu", "--teacher-sampler", "cfg", *common])
    distill.main(full)
    assert read_log(tmp_path / "lora")[0]["loss"] == read_log(tmp_path / "full")[0]["loss"]

    x_t, t, w, context, y, (context_null, y_null) = first_batch(world, 4, 2.0, 6.0)
    teacher = load_mmdit(world["teacher"]).requires_grad_(False)
    with torch.no_grad():  # Eq. 2
        target = (1 + w.view(-1, 1, 1, 1)) * teacher(x_t, t, context, y) - w.view(-1, 1, 1, 1) * teacher(
            x_t, t, context_null.expand_as(context), y_null.expand_as(y))
    saved = load_file(tmp_path / "lora" / "checkpoints" / "step-0000001" / "adapter.safetensors")
    student, mine = hand_student(teacher, saved, rank=2)
    assert saved.keys() == mine.keys()  # the adapted layers and the fully trained G and F, nothing else
    z = oracles.conditioning(student, "teefusion", t, y, y_null, w)  # Eq. 7 from the raw weights
    loss = ((student(x_t, t, context, y, vec=z) - target) ** 2).mean()
    loss.backward()
    torch.optim.AdamW(list(mine.values()), lr=1e-3, weight_decay=0.0).step()
    assert abs(read_log(tmp_path / "lora")[0]["loss"] - loss.item()) <= 1e-6 * loss.item()
    assert_adam_close(saved, {k: v.detach() for k, v in mine.items()}, lr=1e-3, steps=1)
    moved = [k for k in saved if k.endswith("lora_B")]
    assert moved and all(saved[k].abs().max() > 0 for k in moved)  # every B left 0


def test_torchrun_two_ranks_equal_one_process(world, tmp_path):
    """2 gloo ranks x micro-batch 1 x 2 rounds, 2 steps with EMA, against one process; then the 2-rank run
    resumed on one process to step 3 against one process to step 3."""
    common = ["--teacher", world["teacher"], "--data", world["data"], "--global-batch", "4", "--lora", "2", "--ema",
              "0.9", "--lr", "1e-3", "--no-progress", "--device", "cpu", "--ckpt-every", "1", "--keep", "3",
              "--teacher-sampler", "cfg", "--lora-targets", "qkv,proj,fc1,fc2,adaln"]
    two = tmp_path / "two"
    torchrun_distill([*common, "--steps", "2", "--micro-batch", "1", "--out", str(two)])
    one = tmp_path / "one"
    distill.main(options.parse_args([*common, "--steps", "3", "--micro-batch", "4", "--out", str(one)]))
    for step in (1, 2):
        with open(two / "checkpoints" / f"step-{step:07d}" / "state.json") as f:
            replicas = json.load(f)["replica_checksums"]
        assert len(replicas) == 2 and replicas[0] == replicas[1]
    for name in ("adapter.safetensors", "ema-adapter.safetensors"):
        assert_adam_close(load_file(two / "checkpoints" / "step-0000002" / name),
                          load_file(one / "checkpoints" / "step-0000002" / name), lr=1e-3, steps=2)
    distill.main(options.parse_args([*common, "--steps", "3", "--micro-batch", "2", "--out", str(two), "--resume"]))
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        assert_adam_close(load_file(two / name), load_file(one / name), lr=1e-3, steps=3)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in read_log(two)]),
                               torch.tensor([r["loss"] for r in read_log(one)]), rtol=1e-5, atol=0)


def test_resume_is_bitwise(world, tmp_path):
    common = ["--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3", "--ckpt-every", "2", "--ema", "0.9"]
    distill.main(lora_args(world, tmp_path / "whole", *common, "--steps", "4"))
    distill.main(lora_args(world, tmp_path / "part", *common, "--steps", "2"))
    distill.main(lora_args(world, tmp_path / "part", *common, "--steps", "4", "--resume", "--lora-dtype", "bf16"))
    assert [r["loss"] for r in read_log(tmp_path / "part")] == [r["loss"] for r in read_log(tmp_path / "whole")]
    for name in ("adapter.safetensors", "ema-adapter.safetensors"):  # the trained tensors, float32
        a, b = (load_file(tmp_path / run / "checkpoints" / "step-0000004" / name) for run in ("part", "whole"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("lora.safetensors", "lora-ema.safetensors"):  # the files to share; --lora-dtype bf16: rounded
        a, b = load_file(tmp_path / "part" / name), load_file(tmp_path / "whole" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].bfloat16()) for k in a), name
        # lora_A, lora_B, lora_B.bias of: 3 streams x (q, k, v, proj, fc1, fc2, adaLN), the last (pre-only)
        # text stream's q, k, v and adaLN, the final layer's adaLN, and G's and F's two Linear layers each
        assert len(a) == 3 * (3 * 7 + 4 + 1 + 4)
    with pytest.raises(ValueError, match="was trained with --lora 2, not 3"):
        args = lora_args(world, tmp_path / "part", *common, "--steps", "6", "--resume")
        args.lora = 3
        distill.main(args)


@pytest.mark.parametrize("extra, message", [
    (["--lora", "0"], "--lora 0: the rank must be an integer >= 1"),
    (["--lora", "-2"], "the rank must be an integer >= 1"),
    (["--lora", "2", "--lora-targets", "qkv,attention"], "--lora-targets: unknown name 'attention'"),
    (["--lora", "2", "--lora-alpha", "0"], "--lora-alpha 0: alpha must be > 0"),
    (["--lora", "2", "--lora-alpha", "-1"], "alpha must be > 0"),
    (["--lora", "2", "--method", "dice", "--w-min", "4", "--w-max", "4"], "--lora does not combine with --method dice"),
    (["--lora", "2", "--method", "distillcfg"], "--lora does not combine with --method distillcfg"),
    (["--lora", "2", "--lora-targets", "none", "--lora-full", "none"], "nothing would be trained"),
    (["--lora", "2", "--lora-targets", "qkv,embedders"], "--lora-targets embedders is also in --lora-full"),
    (["--lora", "2", "--export-diffusers"], "a LoRA run writes lora.safetensors"),
    (["--lora", "2", "--teacher-sampler", "w2sd", "--w2sd-finetuned", "F"], "--w2sd-finetuned the student would start"),
    (["--lora-alpha", "4"], "--lora-alpha sets up a LoRA student: it needs --lora RANK"),
])
def test_refused_arguments(world, tmp_path, extra, message):
    sampler = [] if "--teacher-sampler" in extra else ["--teacher-sampler", "cfg"]
    args = options.parse_args(["--teacher", world["teacher"], "--data", world["data"], "--out", str(tmp_path),
                               *sampler, *extra])
    with pytest.raises(ValueError, match=re.escape(message)):
        options.check_args(args)


def test_the_command_line_refuses_with_one_line(world, tmp_path):
    r = distill_cli("--teacher", world["teacher"], "--data", world["data"], "--out", str(tmp_path / "out"),
                    "--teacher-sampler", "cfg", "--lora", "4", "--lora-targets", "qkv,mlp")
    one_error(r, 2, "--lora-targets: unknown name 'mlp'")
    assert r.stdout == "" and not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# The merge command and generate.py --lora


def test_merge_command_and_generate_with_the_adapter(tmp_path, monkeypatch):
    """`python -m sd3.lora merge` writes the merged student in Stability layout with its metadata; generate.py
    --lora (the toy world, its teacher as the base) makes the images of that student file, which
    equal samplers.sample with the unmerged LoRA student to 1e-5."""
    world = toy.build_world(cache_dir=str(tmp_path / "cache"), progress=False,
                            settings=toy.TrainSettings(steps=30, weak_step=10))
    base = load_mmdit(world.teacher_path)
    student = trained(lora.attach(base, lora.settings(2, targets=EVERY)), scale=0.2)
    adapter = lora.save_adapter(student, base, str(tmp_path / "lora.safetensors"),
                                {"teefusion_method": "teefusion", "teefusion_teacher": "w2sd", "step": "7"})
    merged = str(tmp_path / "student.safetensors")
    r = subprocess.run([sys.executable, "-m", "sd3.lora", "merge", "--base", world.teacher_path, "--lora", adapter, "--out",
                        merged], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    model, fusion = student_file.load_student(merged)  # the method from the metadata
    with safe_open(merged, "pt") as f:
        meta = f.metadata()
    assert meta["teefusion_teacher"] == "w2sd" and json.loads(meta[lora.METADATA])["rank"] == 2
    r = subprocess.run([sys.executable, "-m", "sd3.lora", "merge", "--base", world.teacher_path, "--lora", merged, "--out",
                        str(tmp_path / "x.safetensors")], cwd=REPO, capture_output=True, text=True)
    one_error(r, 2, "not a LoRA adapter")

    monkeypatch.setattr(toy, "build_world", lambda **kw: world)
    prompt = "a red plus left of a blue square"
    images = {}
    for flag, path in (("--lora", adapter), ("--student", merged)):
        args = generate.build_parser().parse_args(["--toy", "--prompt", prompt, "--method", "student", flag, path,
                                                   "--steps", "6", "--w", "4", "--out", str(tmp_path / flag[2:])])
        generate.run(generate.check(args), progress=False)
        images[flag] = np.asarray(Image.open(tmp_path / flag[2:] / "images" / "00000-00.png"))
        record = generate.read_record(tmp_path / flag[2:] / "images" / "00000-00.png")
        assert record["student_method"] == "teefusion" and record["lora"] == ("lora.safetensors" if flag == "--lora" else None)
    assert np.array_equal(images["--lora"], images["--student"])
    context, y = world.encoders.encode([prompt])
    context_null, y_null = world.encoders.encode_null()
    noise = torch.randn(1, 3, toy.H, toy.W, generator=torch.Generator("cpu").manual_seed(0))
    with torch.no_grad():
        ref = samplers.sample("student", student, noise, context, y, context_null, y_null, w=4.0, steps=6)[0]
        got = samplers.sample("student", model, noise, context, y, context_null, y_null, w=4.0, steps=6, fusion=fusion)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
