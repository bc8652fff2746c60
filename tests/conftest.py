"""
Fixtures shared by more than one test file: one CPU thread per test file, the tiny SD3-shaped VAE
config (tests/sd3/test_vae.py, tests/test_prepare.py), a tiny random CLIP with a word-level
tokenizer (tests/evaluation/test_metrics.py, tests/test_evaluate.py), and a tiny random SD3 pipeline folder
(tests/test_generate.py, tests/run/test_monitor.py, tests/sd3/test_export.py).
"""

import pytest
import torch
import transformers

from sd3.vae import VAEConfig
from sd3 import text_encoders

WORDS = ["a", "red", "blue", "cat", "dog", "on", "the", "grass", "photo", "of"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared CPU a 2-thread OpenMP
    region can be 100x slower than one thread; restored after each file's tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_vae_config():
    """The SD3 VAE's shape at tiny widths: 4 levels of (32, 32, 64, 64) channels, 2 resnets per
    level, 16 latent channels, GroupNorm of 32 groups, SD3's scale and shift."""
    return VAEConfig(block_out_channels=[32, 32, 64, 64])


def word_tokenizer():
    """A word-level tokenizer over WORDS with CLIP's layout: <s> words </s>, padded with </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {tok: i for i, tok in enumerate(["!", "<unk>", "<pad>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 4)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>", unk_token="<unk>", model_max_length=16)


def tiny_clip_model(seed=0, logit_scale=3.0):
    """A random transformers CLIPModel: 32 x 32 images in 8 x 8 patches, width 16, projection 8."""
    torch.manual_seed(seed)
    text = dict(vocab_size=5 + len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=3, eos_token_id=4, pad_token_id=4)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    return model


@pytest.fixture(scope="session")
def clip_parts():
    """(tiny CLIPModel, its word tokenizer); the model is frozen by the wrappers, never trained."""
    return tiny_clip_model(), word_tokenizer()


@pytest.fixture(scope="session")
def clip_folder(clip_parts, tmp_path_factory):
    """clip_parts saved as a transformers folder (config.json, weights, tokenizer files)."""
    model, tok = clip_parts
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def sd3_pipeline(tmp_path_factory, tiny_vae_config):
    """(diffusers StableDiffusion3Pipeline, the folder it was saved to with save_pretrained): a tiny random SD3
    pipeline (2-layer SD3Transformer2DModel, a tiny AutoencoderKL with SD3's 16 latent channels, scale and
    shift, tiny CLIP-L, CLIP-G and T5 with word tokenizers); images up to 8 * 2 * 8 = 128 px a side."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from test_embed import tiny_clip, tiny_t5, word_tokenizer  # tiny text encoders, built on the spot
    from test_vae import make_reference  # a tiny AutoencoderKL shaped like SD3's
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                        caption_projection_dim=16, pooled_projection_dim=40, out_channels=16,
                                        pos_embed_max_size=8).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=make_reference(tiny_vae_config), text_encoder=tiny_clip(16, 0),
        tokenizer=word_tokenizer("<s>", "</s>", "</s>", 77), text_encoder_2=tiny_clip(24, 1),
        tokenizer_2=word_tokenizer("<s>", "</s>", "!", 77), text_encoder_3=tiny_t5(2),
        tokenizer_3=word_tokenizer(None, "</s>", "<pad>", 256))
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sd3") / "pipeline"
    pipe.save_pretrained(folder)
    return pipe, str(folder)


SD3_CAPTIONS = ["a red cat on the left", "the big blue dog", "a small green square", "a photo of a circle",
                "the red square right of a blue circle", "a big dog on the grass", "a green cat", "the small circle"]


@pytest.fixture(scope="session")
def sd3_data(sd3_pipeline, tmp_path_factory):
    """Training shards for sd3_pipeline in prepare.py's layout (one shard, index.json, null.safetensors): 8
    captions encoded by the pipeline's own text encoders (text_encoders.TextEncoders), random 64 x 64 px latents
    (16 x 8 x 8), the null prompt the encoded empty string."""
    import json

    from safetensors.torch import save_file

    _, folder = sd3_pipeline
    encoders = text_encoders.TextEncoders.from_pretrained(folder, context_dim=48)
    context, y = encoders.encode(SD3_CAPTIONS)  # (N, L, Dc), (N, Dy)
    context_null, y_null = encoders.encode_null()  # (1, L, Dc), (1, Dy)
    latents = torch.randn(len(SD3_CAPTIONS), 16, 8, 8, generator=torch.Generator().manual_seed(0))  # (N, 16, 8, 8)
    data = tmp_path_factory.mktemp("sd3data")
    meta = {"num_samples": str(len(SD3_CAPTIONS)), "captions": json.dumps(SD3_CAPTIONS)}
    save_file({"latents": latents, "context": context.contiguous(), "y": y.contiguous()},
              str(data / "shard-00000.safetensors"), meta)
    save_file({"context": context_null.contiguous(), "y": y_null.contiguous()}, str(data / "null.safetensors"))
    (data / "index.json").write_text(json.dumps({"settings": {"text": True}, "shards": [
        {"file": "shard-00000.safetensors", "num_samples": len(SD3_CAPTIONS)}]}))
    return str(data)
