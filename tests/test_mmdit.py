"""mmdit.py against diffusers' SD3Transformer2DModel (a test-only oracle), the checkpoint
layouts, the round trip, reduced precision, and every bad input with its message."""

import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from sd3 import checkpoint
import mmdit
from mmdit import CONFIGS, MMDiT, CheckpointError, load_mmdit, save_mmdit

from diffusers import SD3Transformer2DModel  # noqa: E402

VARIANTS = ["tiny-sd3", "tiny-sd3.5-medium", "tiny-sd3.5-large"]


def randomize_(module, seed=0):
    """Random weights everywhere (adaLN and output layers included), scaled by fan-in so
    the activations stay O(1): a parity test on zero-initialised layers proves nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            if p.ndim == 1 and "norm" in name or "ln_" in name:  # RMSNorm weights around 1
                p.add_(1.0)
    return module


def make_diffusers(variant, seed=0):
    cfg = CONFIGS[variant]
    return randomize_(SD3Transformer2DModel(**{k: v for k, v in checkpoint.diffusers_config(cfg).items()
                                               if not k.startswith("_")}), seed).eval()


def inputs(cfg, B=2, H=12, W=8, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.in_channels, H, W, generator=g), torch.rand(B, generator=g),
            torch.randn(B, L, cfg.context_dim, generator=g), torch.randn(B, cfg.pooled_dim, generator=g))


def diffusers_forward(ref, x, t, context, y):
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y,
                   timestep=1000 * t, return_dict=False)[0]


class Reference:
    """diffusers' output in fp32, and the same model run in float64 (the closest thing to the exact
    value): the tolerance of a parity test is diffusers' own fp32 rounding error, not a constant, so
    that it holds on CPUs whose kernels round differently (measured 2026-12-05 on a 2-core AMD EPYC:
    tiny-sd3's fp32 outputs of the two implementations differ by 1.04e-5, ours is 6.0e-6 from
    float64 and diffusers' own fp32 6.9e-6)."""

    def __init__(self, ref, args):
        self.fp32 = diffusers_forward(ref, *args)
        args64 = [a.double() for a in args]
        self.fp64 = diffusers_forward(copy.deepcopy(ref).double(), *args64)
        self.rounding = (self.fp32.double() - self.fp64).abs().max().item()  # diffusers' own fp32 error

    def check(self, got, what=""):
        """got (fp32) is as close to the float64 output as diffusers' fp32 is (2x, + 1e-6), and close to it."""
        err = (got.double() - self.fp64).abs().max().item()
        assert err <= 2 * self.rounding + 1e-6, (what, err, self.rounding)
        assert (got - self.fp32).abs().max().item() <= 3 * self.rounding + 1e-6, what


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny variant saved by diffusers (folder), with its reference output (Reference)."""
    out = {}
    for variant in VARIANTS:
        folder = tmp_path_factory.mktemp(variant)
        ref = make_diffusers(variant)
        ref.save_pretrained(folder)
        args = inputs(CONFIGS[variant])
        out[variant] = (folder, args, Reference(ref, args))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_diffusers_folder(saved, variant):
    folder, args, expected = saved[variant]
    model = load_mmdit(str(folder))
    assert model.config == CONFIGS[variant]  # everything inferred from the tensors
    with torch.no_grad():
        got = model(*args)
    assert expected.fp32.std() > 0.3  # a non-trivial output
    assert expected.rounding < 2e-5  # fp32 rounding of an O(10) output: a few ulps per layer
    expected.check(got)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stability_layout_gives_same_output(saved, tmp_path, variant):
    folder, args, expected = saved[variant]
    model = load_mmdit(str(folder))
    path = save_mmdit(model, str(tmp_path / "m.safetensors"))
    # a Stability single file also holds the VAE and text encoders; they must be skipped
    from safetensors.torch import load_file
    tensors = load_file(path)
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    tensors["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    # without qk norm the head count is not in the shapes: it comes from the metadata
    # (real SD3 files need none: their heads are hidden / 64, the fallback rule)
    heads = {"mmdit_config": json.dumps({"num_heads": CONFIGS[variant].num_heads})}
    single = str(tmp_path / "single.safetensors")
    save_file(tensors, single, metadata=heads)
    unprefixed = str(tmp_path / "unprefixed.safetensors")
    save_file({k[len("model.diffusion_model."):]: v for k, v in tensors.items()
               if k.startswith("model.diffusion_model.")}, unprefixed, metadata=heads)
    for p in (path, single, unprefixed):
        with torch.no_grad():
            got = load_mmdit(p)(*args)
        expected.check(got, p)


def test_other_components_are_never_read(saved, tmp_path, monkeypatch):
    folder, args, _ = saved["tiny-sd3"]
    from safetensors.torch import load_file
    tensors = load_file(save_mmdit(load_mmdit(str(folder)), str(tmp_path / "m.safetensors")))
    tensors["first_stage_model.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3)
    tensors["text_encoders.t5xxl.transformer.shared.weight"] = torch.randn(100, 8)
    path = str(tmp_path / "all_in_one.safetensors")
    save_file(tensors, path)
    read = []
    real_open = checkpoint.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.inner = real_open(*a, **kw)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, k):
            read.append(k)
            return self.handle.get_tensor(k)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    load_mmdit(path)
    assert read and all(k.startswith("model.diffusion_model.") for k in read)


def test_head_count_rule_without_qk_norm_or_metadata(tmp_path):
    cfg = mmdit.MMDiTConfig(depth=2, hidden_size=128, num_heads=8, in_channels=4, out_channels=4,
                            context_dim=32, pooled_dim=24, pos_embed_max_size=16)
    save_file(MMDiT(cfg).state_dict(), tmp_path / "m.safetensors")
    assert mmdit.read_config(str(tmp_path / "m.safetensors")).num_heads == 2  # hidden / 64


def test_sharded_single_file_and_pipeline_folder(tmp_path):
    ref = make_diffusers("tiny-sd3.5-large", seed=3)
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="100KB")
    assert (tmp_path / "pipe/transformer/diffusion_pytorch_model.safetensors.index.json").exists()
    args = inputs(CONFIGS["tiny-sd3.5-large"], seed=4)
    expected = diffusers_forward(ref, *args)
    for p in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        with torch.no_grad():
            assert (load_mmdit(str(p))(*args) - expected).abs().max() <= 1e-5
    # a lone diffusers file (no config.json): heads come from the qk-norm weights
    ref.save_pretrained(tmp_path / "one")
    with torch.no_grad():
        got = load_mmdit(str(tmp_path / "one" / "diffusion_pytorch_model.safetensors"))(*args)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_to_diffusers_loads_in_diffusers(saved, tmp_path, variant):
    folder, args, expected = saved[variant]
    model = load_mmdit(str(folder))
    mmdit.save_mmdit_diffusers(model, str(tmp_path / "out"))
    ref = SD3Transformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert (diffusers_forward(ref, *args) - expected.fp32).abs().max() <= 1e-6  # the same module, the same kernels


def test_save_load_round_trip_is_bit_exact(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        model = randomize_(MMDiT(CONFIGS["tiny-sd3.5-medium"])).to(dtype)
        path = save_mmdit(model, str(tmp_path / f"{dtype}.safetensors"), metadata={"step": "7"})
        loaded = load_mmdit(path, dtype=dtype)
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary files left
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # readable as any file, not mkstemp's 0600


def test_vec_replaces_the_conditioning_vector():
    model = randomize_(MMDiT(CONFIGS["tiny-sd3"])).eval()
    x, t, context, y = inputs(model.config)
    with torch.no_grad():
        c = model.t_embedder(mmdit.timestep_embedding(t)) + model.y_embedder(y)  # Eq. 6 by hand
        assert torch.equal(model(x, t, context, y), model(x, t, context, y, vec=c))
        # with vec given, t and y are not used
        assert torch.equal(model(x, t, context, y, vec=c), model(x, t * 0, context, y * 0, vec=c))
        assert not torch.allclose(model(x, t, context, y, vec=c + 1), model(x, t, context, y, vec=c))


def test_precomputed_adaln_and_compiled_blocks_give_the_same_output():
    """forward(adaln=model.adaln(c)) is forward(vec=c); compile_mmdit keeps the parameter names and
    the output (traced here with the "eager" backend, which checks the graph capture in seconds;
    the inductor backend's numbers are compared with diffusers by benchmarks/bench_mmdit.py --compile)."""
    model = randomize_(MMDiT(CONFIGS["tiny-sd3.5-medium"])).eval()
    x, t, context, y = inputs(model.config)
    with torch.no_grad():
        c = model.t_embedder(mmdit.timestep_embedding(t)) + model.y_embedder(y)
        expected = model(x, t, context, y)
        assert torch.equal(model(x, t * 0, context, y * 0, adaln=model.adaln(c)), expected)
        with pytest.raises(ValueError, match="adaln must be the 7 tensors"):
            model(x, t, context, y, adaln=model.adaln(c)[:-1])
        keys = list(model.state_dict())
        compiled = mmdit.compile_mmdit(model, backend="eager")
        assert list(compiled.state_dict()) == keys
        torch.testing.assert_close(compiled(x, t, context, y), expected, rtol=0, atol=1e-6)


def test_timestep_embedding_closed_form_and_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 0.013, 0.5, 1.0, 5.0])  # flow times, and a guidance scale
    psi = mmdit.timestep_embedding(t, 256)
    i = torch.arange(128, dtype=torch.float64)
    args = 1000 * t.double()[:, None] * torch.exp(-math.log(10000) * i / 128)[None]
    # float32 rounds 1000 * 5.0 * freq to ~3e-4 rad; bf16 would round 5000 itself to 4992
    assert torch.allclose(psi.double(), torch.cat([args.cos(), args.sin()], -1), atol=5e-4)
    ref = get_timestep_embedding(1000 * t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(psi, ref)
    assert mmdit.timestep_embedding(t, 7).shape == (5, 7)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize_(MMDiT(CONFIGS["tiny-sd3.5-medium"]))
    args = inputs(model.config)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(*args).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_stays_close_to_fp32(saved, variant, dtype):
    """Stated tolerance, relative L2 error against the fp32 output: bf16 <= 2%, fp16 <= 0.5%,
    for weights cast to that dtype and for fp32 weights under autocast (the residual
    streams, LayerNorm and adaLN arithmetic stay in float32). With cast weights it is no
    worse than diffusers' own model in the same dtype. t stays float32 (the sampler's
    clock): in bf16 a flow time keeps only 3 significant digits."""
    folder, args, _ = saved[variant]
    x, t, context, y = args
    low_args = (x.to(dtype), t, context.to(dtype), y.to(dtype))
    model = load_mmdit(str(folder))
    with torch.no_grad():
        ref = model(*args)
        got = load_mmdit(str(folder), dtype=dtype)(*low_args)
        with torch.autocast("cpu", dtype=dtype):
            auto = model(*args)
        theirs = diffusers_forward(SD3Transformer2DModel.from_pretrained(folder).to(dtype), *low_args)
    assert got.dtype == dtype and auto.dtype == torch.float32

    def rel(a):
        return ((a.float() - ref).norm() / ref.norm()).item()

    tol = 0.02 if dtype == torch.bfloat16 else 0.005
    assert rel(got) <= tol and rel(auto) <= tol
    assert rel(got) <= rel(theirs)


def test_named_sizes_match_the_published_models():
    for name, params in (("sd3-medium", 2.03e9), ("sd3.5-medium", 2.24e9), ("sd3.5-large", 8.06e9)):
        cfg = CONFIGS[name]
        assert cfg.hidden_size == 64 * cfg.depth and cfg.head_size == 64
        with torch.device("meta"):
            n = sum(p.numel() for p in MMDiT(cfg).parameters())
        assert abs(n - params) / params < 0.01, (name, n)


# ---- bad input: each with its message ---------------------------------------


def test_pickle_files_are_refused(tmp_path):
    for name in ("m.ckpt", "m.pt", "m.bin", "m.pth"):
        p = tmp_path / name
        torch.save({"a": torch.zeros(1)}, p)
        with pytest.raises(CheckpointError, match="refusing a pickle checkpoint"):
            load_mmdit(str(p))
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"a": torch.zeros(1)}, disguised)
    with pytest.raises(CheckpointError, match="pickle/zip .* not safetensors"):
        load_mmdit(str(disguised))


def test_a_valid_file_starting_with_0x80_loads(tmp_path):
    """A safetensors file starts with its header length: 0x80 there is not a pickle."""
    model = MMDiT(CONFIGS["tiny-sd3"])
    for n in range(300):
        path = save_mmdit(model, str(tmp_path / "m.safetensors"), metadata={"pad": "x" * n})
        if open(path, "rb").read(1) == b"\x80":
            break
    assert open(path, "rb").read(1) == b"\x80"
    load_mmdit(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = save_mmdit(MMDiT(CONFIGS["tiny-sd3"]), str(tmp_path / "m.safetensors"))
    data = open(path, "rb").read()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_bytes(b"this is a text file, not a checkpoint\n" * 10)
    for name in ("trunc.safetensors", "text.safetensors"):
        with pytest.raises(CheckpointError, match=f"{name} is not a readable safetensors file"):
            load_mmdit(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere"):
        load_mmdit(str(tmp_path / "nowhere.safetensors"))
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="no MMDiT tensors found"):
        load_mmdit(str(tmp_path / "vae.safetensors"))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        load_mmdit(str(tmp_path / "empty_folder"))


def _stability_tensors(variant="tiny-sd3"):
    return {k: v.clone() for k, v in MMDiT(CONFIGS[variant]).state_dict().items()}


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    t = _stability_tensors()
    del t["joint_blocks.1.x_block.mlp.fc2.bias"], t["final_layer.linear.bias"]
    t["joint_blocks.0.x_block.extra.weight"] = torch.zeros(3)
    save_file(t, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_mmdit(str(tmp_path / "m.safetensors"))
    msg = str(e.value)
    assert "missing keys: final_layer.linear.bias, joint_blocks.1.x_block.mlp.fc2.bias" in msg
    assert "unexpected keys: joint_blocks.0.x_block.extra.weight" in msg
    t = _stability_tensors()
    del t["x_embedder.proj.weight"]
    save_file(t, tmp_path / "m2.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: x_embedder.proj.weight"):
        load_mmdit(str(tmp_path / "m2.safetensors"))


def test_shape_that_does_not_match_the_inferred_config(tmp_path):
    t = _stability_tensors()
    t["joint_blocks.1.context_block.attn.qkv.weight"] = torch.zeros(3 * 64, 48)
    save_file(t, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"joint_blocks.1.context_block.attn.qkv.weight: \(192, 48\) in the "
                                              r"file, \(192, 64\) expected"):
        load_mmdit(str(tmp_path / "m.safetensors"))
    t = _stability_tensors()
    t["pos_embed"] = torch.zeros(1, 15, 64)
    save_file(t, tmp_path / "m2.safetensors")
    with pytest.raises(CheckpointError, match="pos_embed has 15 positions, not a square"):
        load_mmdit(str(tmp_path / "m2.safetensors"))


def test_latent_shapes_that_cannot_work():
    model = MMDiT(CONFIGS["tiny-sd3"])  # pos_embed_max_size 16, patch 2: at most 32 per side
    x, t, context, y = inputs(model.config)
    with pytest.raises(ValueError, match=r"latent size 34x8 is 17x4 patches, more than pos_embed_max_size 16"):
        model(torch.zeros(2, 4, 34, 8), t, context, y)
    with pytest.raises(ValueError, match="latent size 11x8 is not divisible by the patch size 2"):
        model(torch.zeros(2, 4, 11, 8), t, context, y)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        model(torch.zeros(2, 3, 8, 8), t, context, y)
    with pytest.raises(ValueError, match=r"context must be \(B, L, 32\)"):
        model(x, t, context[..., :5], y)
    with pytest.raises(ValueError, match=r"t must be a scalar or \(B,\)"):
        model(x, torch.rand(3), context, y)
    model(torch.zeros(2, 4, 32, 32), t, context, y)  # the largest latent works


def test_blend_of_two_checkpoints_streams_tensor_by_tensor(tmp_path, monkeypatch):
    """W2SD's pair from one fine-tune: base + s (finetuned - base), from a Stability file and a
    diffusers folder alike, each source tensor freed before the next is read."""
    import weakref

    torch.manual_seed(0)
    base, tuned = MMDiT(CONFIGS["tiny-sd3"]), MMDiT(CONFIGS["tiny-sd3"])
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mmdit.save_mmdit(base, str(tmp_path / "base.safetensors"))
    mmdit.save_mmdit_diffusers(tuned, str(tmp_path / "tuned"))
    alive, peak = [], [0]
    read = checkpoint.read_tensor

    def recording(*args):
        tensor = read(*args)
        alive.append(weakref.ref(tensor))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return tensor

    monkeypatch.setattr(checkpoint, "read_tensor", recording)
    sb, st = base.state_dict(), tuned.state_dict()
    for scale in (1.5, -1.5, 0.8):
        blended = mmdit.load_mmdit_blend(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned"), scale).state_dict()
        for k, v in sb.items():
            torch.testing.assert_close(blended[k], v + scale * (st[k] - v), rtol=0, atol=1e-6)
    assert peak[0] <= 2  # one tensor of each file at a time
    small = MMDiT(CONFIGS["tiny-sd3.5-large"])
    mmdit.save_mmdit(small, str(tmp_path / "other.safetensors"))
    with pytest.raises(mmdit.CheckpointError, match="is not a fine-tune of"):
        mmdit.load_mmdit_blend(str(tmp_path / "base.safetensors"), str(tmp_path / "other.safetensors"), 1.5)


def test_command_line_prints_the_config_or_one_error_line(tmp_path):
    """python mmdit.py CHECKPOINT: the inferred config, or one `error:` line and exit 2 (run/cli.py)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmdit.py")
    good = save_mmdit(MMDiT(CONFIGS["tiny-sd3.5-medium"]), str(tmp_path / "m.safetensors"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "m.ckpt")
    (tmp_path / "notes.safetensors").write_text("not a checkpoint\n")

    def run(path):
        return subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True)

    r = run(good)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout[:r.stdout.index("parameters:")])
    assert mmdit.MMDiTConfig(**printed) == CONFIGS["tiny-sd3.5-medium"]
    for path, message in ((tmp_path / "nowhere.safetensors", "checkpoint not found"),
                          (tmp_path / "m.ckpt", "refusing a pickle checkpoint"),
                          (tmp_path / "notes.safetensors", "is not a readable safetensors file")):
        r = run(path)
        assert r.returncode == 2 and r.stdout == "", (path, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
