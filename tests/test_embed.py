"""embed.py: Eq. 6 and Eq. 7 against independent computations (by hand from the weights,
and the authors' released forward re-expressed with diffusers' modules), the Table 3
ablations, DICE, and SD3 prompt encoding against diffusers' StableDiffusion3Pipeline."""

import math

import pytest
import torch
import torch.nn.functional as F

import embed
import mmdit
import oracles  # tests/oracles.py: z written from the paper on the raw weights
from mmdit import CONFIGS, MMDiT

import diffusers  # test oracle (requirements-test.txt)
import transformers  # test oracle (requirements-test.txt)
from sd3 import student_file, text_encoders


def randomize_(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.ndim > 1 else 1))
    return module


@pytest.fixture(scope="module")
def model():
    return randomize_(MMDiT(CONFIGS["tiny-sd3.5-large"])).eval()


def mlp_by_hand(seq, h):
    """Linear, SiLU, Linear from the raw weights (independent of nn.Sequential)."""
    a = h @ seq[0].weight.T + seq[0].bias
    return (a * torch.sigmoid(a)) @ seq[2].weight.T + seq[2].bias


def psi_by_hand(s):
    i = torch.arange(128, dtype=torch.float64)
    args = 1000 * torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1) * torch.exp(-math.log(1e4) * i / 128)
    return torch.cat([args.cos(), args.sin()], -1).float()


def test_psi_is_the_timestep_sinusoid():
    from diffusers.models.embeddings import Timesteps
    s = torch.tensor([0.0, 0.25, 0.999, 2.0, 14.0])
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(1000 * s)  # SD3's time_proj
    assert torch.equal(embed.timestep_embedding(s), ref)
    # float32 arguments up to 14000 rad carry ~1e-3 rad of rounding
    assert torch.allclose(embed.timestep_embedding(s), psi_by_hand(s), atol=2e-3)


def test_eq6_by_hand(model):
    t, y = torch.rand(3), torch.randn(3, 24)
    with torch.no_grad():
        c = embed.sd3_conditioning(model, t, y)
        ref = mlp_by_hand(model.t_embedder.mlp, psi_by_hand(t)) + mlp_by_hand(model.y_embedder.mlp, y)
    assert (c - ref).abs().max() <= 1e-4


def test_eq7_minus_eq6_is_the_fused_term(model):
    B = 4
    t, y, y_null = torch.rand(B), torch.randn(B, 24), torch.randn(1, 24)
    w = torch.tensor([0.0, 2.0, 5.0, 14.0])
    with torch.no_grad():
        z = embed.teefusion_conditioning(model, t, y, y_null, w)
        c = embed.sd3_conditioning(model, t, y)
        # psi itself is pinned to diffusers' Timesteps bit for bit (test above); here the
        # MLPs are recomputed from the raw weights
        G_w = mlp_by_hand(model.t_embedder.mlp, embed.timestep_embedding(w))  # (B, D)
        F_diff = mlp_by_hand(model.y_embedder.mlp, y - y_null)  # (B, D): difference BEFORE F
        assert (z - c - G_w * F_diff / 256).abs().max() <= 1e-5  # elementwise, / 256
        # not F(y) - F(y_null): F has biases, the two differ
        F_sep = mlp_by_hand(model.y_embedder.mlp, y) - mlp_by_hand(model.y_embedder.mlp, y_null)
        assert (z - c - G_w * F_sep / 256).abs().max() > 1e-3
        # y == y_null: the fused term is G(psi(w)) * F(0) / 256, not zero
        z0 = embed.teefusion_conditioning(model, t, y, y, 5.0)
        F0 = mlp_by_hand(model.y_embedder.mlp, torch.zeros(1, 24))
        G5 = mlp_by_hand(model.t_embedder.mlp, embed.timestep_embedding(torch.tensor([5.0])))
        assert (z0 - c - G5 * F0 / 256).abs().max() <= 1e-5 and (z0 - c).abs().max() > 1e-3
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in embed.make_fusion("teefusion", model.config).parameters()) == 0
    assert sum(p.numel() for p in model.parameters()) == n  # no parameters added to the model


def test_eq7_through_the_network_matches_the_released_forward(model, tmp_path):
    """Reference: the authors' released transformer adds, inside diffusers' SD3 forward,
    timestep_embedder(time_proj(1000 w)) * text_embedder(y - y_null) / 256 to the
    conditioning. Re-expressed here on diffusers' own modules, with the same weights."""
    mmdit.save_mmdit_diffusers(model, str(tmp_path / "t"))
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "t").eval()
    B = 2
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g)
    context, y, y_null = torch.randn(B, 5, 32, generator=g), torch.randn(B, 24, generator=g), torch.randn(1, 24)
    w = torch.tensor([3.0, 7.5])
    tte = ref.time_text_embed
    plain = tte.forward

    def released(timestep, pooled_projections):
        fused = tte.timestep_embedder(tte.time_proj(1000 * w)) * tte.text_embedder(pooled_projections - y_null)
        return plain(timestep, pooled_projections) + fused / 256.0

    tte.forward = released
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=1000 * t,
                       return_dict=False)[0]
        got = model(x, t, context, y, vec=embed.teefusion_conditioning(model, t, y, y_null, w))
        plain_out = model(x, t, context, y)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - plain_out).abs().max() > 1e-3  # w changed the output


def test_ablations(model):
    B = 2
    t = torch.rand(B)
    context, y, null_ctx, y_null = torch.randn(B, 5, 32), torch.randn(B, 24), torch.randn(1, 5, 32), torch.randn(1, 24)
    args = (model, t, context, y, null_ctx, y_null, 5.0)
    with torch.no_grad():
        c = embed.sd3_conditioning(model, t, y)
        # DistillCFG: a NEW guidance MLP with PyTorch's default initialisation (FLUX / the released
        # guidance_in), added to c: by hand from its raw weights
        torch.manual_seed(0)
        dcfg = embed.make_fusion("distillcfg", model.config)
        ctx, yy, vec = dcfg(*args)
        assert torch.equal(ctx, context) and torch.equal(yy, y)
        by_hand = mlp_by_hand(dcfg.guidance_in.mlp, psi_by_hand(torch.tensor([5.0])))
        assert (vec - c - by_hand).abs().max() <= 5e-3  # psi of 5000 rad: fp32 phase rounding
        assert (vec - c - mlp_by_hand(dcfg.guidance_in.mlp, embed.timestep_embedding(torch.tensor([5.0])))
                ).abs().max() <= 1e-5
        last = dcfg.guidance_in.mlp[2].weight
        assert last.abs().max() > 0 and abs(last.std().item() - 1 / math.sqrt(3 * last.shape[1])) < 0.3 / math.sqrt(
            last.shape[1])  # kaiming-uniform(a=sqrt(5)): std 1 / sqrt(3 fan_in), not zero
        assert (vec - c).abs().max() > 1e-3 and dcfg.trains_model
        # G only, as the paper's Table 3 writes it: Eq. 6 + G(psi(w)), at full scale (no 1/256)
        _, _, vec_g = embed.make_fusion("gonly", model.config)(*args)
        G5 = mlp_by_hand(model.t_embedder.mlp, psi_by_hand(torch.tensor([5.0])))
        assert (vec_g - c - G5).abs().max() <= 5e-3  # psi of 5000 rad: fp32 phase rounding
        assert (embed.gonly_conditioning(model, t, y, 5.0) - vec_g).abs().max() == 0
        # and at Eq. 7's scale (like for like with TeEFusion's student): G(psi(w)) / 256
        _, _, vec_s = embed.make_fusion("gonly-scaled", model.config)(*args)
        assert (vec_s - c - G5 / 256).abs().max() <= 5e-5
        assert (embed.gonly_conditioning(model, t, y, 5.0, scale=1 / 256) - vec_s).abs().max() == 0
        _, _, vec_t = embed.make_fusion("teefusion", model.config)(*args)
        assert (vec_s - vec_t).abs().max() > 1e-3 and (vec_g - vec_s).abs().max() > 1e-1
    with pytest.raises(ValueError, match="unknown method 'cfg'"):
        embed.make_fusion("cfg", model.config)


@pytest.mark.parametrize("scale", [None, 0.25])
def test_every_fusion_against_the_paper_by_hand(model, scale):
    """Each student input's z, as training makes it (forward) and as the all-steps sampler makes it
    (conditioning on the N * B rows of every step at once), against z written from the paper's text on the
    raw weights (tests/oracles.py: psi from diffusers' Timesteps, G and F by hand), at the released scale
    and at another one."""
    B = 2
    t, context, y, null_ctx, y_null = torch.rand(B), torch.randn(B, 5, 32), torch.randn(B, 24), torch.randn(1, 5, 32), \
        torch.randn(1, 24)
    w = torch.tensor([3.0, 9.0])
    times = torch.tensor([0.9, 0.5, 0.1])  # (N,)
    with torch.no_grad():
        for name in embed.FUSIONS:
            torch.manual_seed(0)
            fusion = embed.make_fusion(name, model.config, scale if name in embed.SCALED else None)
            ctx, yy, vec = fusion(model, t, context, y, null_ctx, y_null, w)
            mlp = fusion.guidance_in.mlp if name == "distillcfg" else None
            expected = oracles.conditioning(model, name, t, y, y_null, w, scale, guidance_mlp=mlp)
            assert (vec - expected).abs().max() <= 1e-5, name
            rows = fusion.conditioning(model, times.repeat_interleave(B), y.repeat(3, 1), y_null.expand_as(y).repeat(3, 1),
                                       w.repeat(3)).view(3, B, -1)  # (N, B, D)
            for i, ti in enumerate(times):
                step = oracles.conditioning(model, name, ti.expand(B), y, y_null, w, scale, guidance_mlp=mlp)
                assert (rows[i] - step).abs().max() <= 1e-5, (name, i)
            assert torch.equal(ctx, fusion.student_context(model, context, null_ctx)) and torch.equal(yy, y), name
            if name != "dice":  # DICE's tokens: test_dice_enhancer
                assert torch.equal(ctx, context), name
    with pytest.raises(ValueError, match="has no Eq. 7 scale"):
        embed.make_fusion("distillcfg", model.config, 0.25)


def test_dice_enhancer(model):
    torch.manual_seed(0)
    dice = embed.make_fusion("dice", model.config)
    assert not dice.trains_model and dice.fixed_w == 4.0  # DICE's one guidance: diffusers' scale 5
    B = 2
    t, context, y = torch.rand(B), torch.randn(B, 5, 32), torch.randn(B, 24)
    null_ctx, y_null = torch.randn(1, 5, 32), torch.randn(1, 24)
    with torch.no_grad():
        ctx, yy, vec = dice(model, t, context, y, null_ctx, y_null, 5.0)
        # default initialisation, as DICE's release: the enhancer changes the tokens from the start
        assert (ctx - context)[:, 1:].abs().max() > 1e-3
        # c' = c + alpha * enhancer(c, null), the enhancer computed by hand; the start token unchanged
        s = dice.tokens
        hc, hn = F.relu(context @ s.fc1.weight.T + s.fc1.bias), F.relu(null_ctx @ s.fc1.weight.T + s.fc1.bias)
        q = (hc @ s.to_q.weight.T).view(B, 5, 8, 64).transpose(1, 2)
        k = (hn @ s.to_k.weight.T).view(1, 5, 8, 64).transpose(1, 2)
        v = (hn @ s.to_v.weight.T).view(1, 5, 8, 64).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v  # (B, 8, 5, 64)
        o = F.relu(att.transpose(1, 2).reshape(B, 5, 512) @ s.to_out.weight.T + s.to_out.bias)
        expected = context + dice.alpha * (o @ s.fc2.weight.T + s.fc2.bias)
        assert (ctx[:, 1:] - expected[:, 1:]).abs().max() <= 1e-4
        assert torch.equal(ctx[:, 0], context[:, 0])
        # the pooled vector is left untouched (DICE's SDXL release), so Eq. 6 is on the plain y
        assert torch.equal(yy, y) and (vec - embed.sd3_conditioning(model, t, y)).abs().max() == 0
        # w is ignored: DICE reproduces CFG at its one trained guidance
        assert torch.equal(dice(model, t, context, y, null_ctx, y_null, 9.0)[0], ctx)
    with torch.device("meta"):  # under 1% of SD3-medium
        big = MMDiT(CONFIGS["sd3-medium"])
        n_dice = sum(p.numel() for p in embed.make_fusion("dice", CONFIGS["sd3-medium"]).parameters())
    assert n_dice < 0.01 * sum(p.numel() for p in big.parameters())


def test_released_pipeline_rounding_of_w_in_bf16(model, tmp_path):
    """The released pipeline forms its guidance tensor as torch.tensor((w,), dtype=transformer.dtype)
    * 1000: with bf16 weights 5000 becomes 4992 and 7500 becomes 7488. Its fused term, re-expressed on
    diffusers' modules (fp32 weights here, so that only the rounding of w differs), against ours:
    w_dtype=torch.bfloat16 reproduces it to fp32 precision; our own fp32 convention does not (psi
    of 4992 and of 5000 are different vectors)."""
    assert (torch.tensor((5.0,), dtype=torch.bfloat16) * 1000.0).item() == 4992.0
    assert (torch.tensor((7.5,), dtype=torch.bfloat16) * 1000.0).item() == 7488.0
    mmdit.save_mmdit_diffusers(model, str(tmp_path / "t"))
    tte = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "t").eval().time_text_embed
    B = 2
    g = torch.Generator().manual_seed(7)
    y, y_null, t = torch.randn(B, 24, generator=g), torch.randn(1, 24, generator=g), torch.rand(B, generator=g)
    with torch.no_grad():
        for w in (5.0, 7.5):
            guidance = torch.tensor(data=(w,), dtype=torch.bfloat16) * 1000.0  # as the released pipeline
            fused = tte.timestep_embedder(tte.time_proj(guidance)) * tte.text_embedder(y - y_null) / 256.0
            c = embed.sd3_conditioning(model, t, y)
            released = embed.teefusion_conditioning(model, t, y, y_null, w, w_dtype=torch.bfloat16) - c
            ours = embed.teefusion_conditioning(model, t, y, y_null, w) - c
            assert (released - fused).abs().max() <= 1e-6 * c.abs().max()  # fp32 cancellation in z - c
            assert (ours - fused).abs().max() > 0.05 * fused.abs().max()


def test_bad_guidance_scales(model):
    t, y = torch.rand(2), torch.randn(2, 24)
    for w, msg in ((-1.0, "must be >= 0"), (float("nan"), "must be finite"), (float("inf"), "must be finite"),
                   (torch.ones(3), r"a float or a \(2,\) tensor")):
        with pytest.raises(ValueError, match=msg):
            embed.teefusion_conditioning(model, t, y, y, w)


# ---- SD3 prompt encoding ------------------------------------------------------

WORDS = "a an the red green blue cat dog square circle on left right of photo big small".split()


def word_tokenizer(bos, eos, pad, max_length):
    """A tiny word-level tokenizer made on the spot (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(["!", "<unk>", "<pad>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[
            (bos, vocab[bos]), (eos, vocab[eos])])
    else:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>", model_max_length=max_length)


def tiny_clip(hidden, seed):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=5 + len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                                      projection_dim=hidden, bos_token_id=3, eos_token_id=4, pad_token_id=2)
    return transformers.CLIPTextModelWithProjection(cfg).eval()


def tiny_t5(seed):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=5 + len(WORDS), d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                pad_token_id=2, eos_token_id=4, decoder_start_token_id=2)
    return transformers.T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def encoders():
    # CLIP-L pads with its EOS token, CLIP-G with "!" (id 0), as SD3's tokenizers do
    return dict(text_encoder=tiny_clip(16, 0), tokenizer=word_tokenizer("<s>", "</s>", "</s>", 77),
                text_encoder_2=tiny_clip(24, 1), tokenizer_2=word_tokenizer("<s>", "</s>", "!", 77),
                text_encoder_3=tiny_t5(2), tokenizer_3=word_tokenizer(None, "</s>", "<pad>", 256))


def reference_pipeline(encoders, use_t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    parts = dict(encoders)
    if not use_t5:
        parts.update(text_encoder_3=None, tokenizer_3=None)
    transformer = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=2,
                                                  joint_attention_dim=48, caption_projection_dim=16,
                                                  pooled_projection_dim=40, out_channels=4, pos_embed_max_size=8)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    **parts)


@pytest.mark.parametrize("use_t5", [True, False])
def test_prompt_encoding_matches_diffusers(encoders, tmp_path, use_t5):
    for name, part in encoders.items():
        part.save_pretrained(tmp_path / name)
    # without T5, the context width is the MMDiT's (48 here), which T5 would otherwise give
    ours = text_encoders.TextEncoders.from_pretrained(str(tmp_path), use_t5=use_t5, max_t5_tokens=256, context_dim=48)
    pipe = reference_pipeline(encoders, use_t5)
    prompts = ["a red cat on the left", "the big blue square right of a small green circle"]
    negatives = ["photo", "dog"]
    ref = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                             do_classifier_free_guidance=True, negative_prompt=negatives, max_sequence_length=256)
    context, y, context_neg, y_neg = ours.encode_with_negative(prompts, negatives)
    assert context.shape == (2, 77 + 256, 48) and y.shape == (2, 40)
    for a, b in ((context, ref[0]), (context_neg, ref[1]), (y, ref[2]), (y_neg, ref[3])):
        assert (a - b).abs().max() <= 1e-5
    # the null prompt is the encoded empty string, through all three encoders
    ref_null = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                  do_classifier_free_guidance=True, max_sequence_length=256)
    context_null, y_null = ours.encode_null()
    assert (context_null - ref_null[1][:1]).abs().max() <= 1e-5 and (y_null - ref_null[3][:1]).abs().max() <= 1e-5
    assert context_null.abs().max() > 0  # not zeros
    if not use_t5:
        assert context[:, 77:].abs().max() == 0


def test_prompt_encoding_errors_and_truncation(encoders, tmp_path):
    parts = {k: v for k, v in encoders.items()}
    ours = text_encoders.TextEncoders(parts["text_encoder"], parts["tokenizer"], parts["text_encoder_2"],
                              parts["tokenizer_2"], parts["text_encoder_3"], parts["tokenizer_3"], max_t5_tokens=8)
    with pytest.raises(ValueError, match="at least one prompt"):
        ours.encode([])
    with pytest.warns(UserWarning, match="T5: 1 prompt\\(s\\) longer than 8 tokens were truncated"):
        context, _ = ours.encode(["a red cat on the left of a big blue dog"])
    assert context.shape == (1, 77 + 8, 48)
    with pytest.raises(FileNotFoundError, match="missing text-encoder folders"):
        text_encoders.TextEncoders.from_pretrained(str(tmp_path))


def test_a_student_file_keeps_its_eq7_scale(model, tmp_path):
    """distill.py records --fused-scale in the student's metadata; load_student applies it again (absent:
    the released 1/256, as for the authors' weights and a diffusers export)."""
    B = 2
    t, y, y_null, w = torch.rand(B), torch.randn(B, 24), torch.randn(1, 24), torch.tensor([2.0, 6.0])
    cases = {"s.safetensors": ({"teefusion_method": "teefusion", embed.SCALE_METADATA: repr(0.25)}, 0.25),
             "r.safetensors": ({"teefusion_method": "teefusion"}, None),
             "g.safetensors": ({"teefusion_method": "gonly-scaled", embed.SCALE_METADATA: repr(0.5)}, 0.5),
             "u.safetensors": ({"teefusion_method": "gonly"}, None)}
    for name, (meta, scale) in cases.items():
        path = mmdit.save_mmdit(model, str(tmp_path / name), metadata=meta)
        loaded, fusion = student_file.load_student(path)
        with torch.no_grad():
            _, _, vec = fusion(loaded, t, None, y, None, y_null, w)
            expected = oracles.conditioning(model, meta["teefusion_method"], t, y, y_null, w, scale)
        assert (vec - expected).abs().max() <= 1e-5, name
    mmdit.save_mmdit_diffusers(model, str(tmp_path / "export"), extra_config={"txt_align_guidance": True})
    loaded, fusion = student_file.load_student(str(tmp_path / "export"))
    assert fusion.scale == embed.RELEASED_SCALE == 1 / 256
