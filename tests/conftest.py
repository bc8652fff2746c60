"""
Fixtures shared by more than one test file: one CPU thread per test file, the tiny SD3-shaped VAE
config (tests/test_vae.py, tests/test_prepare.py), and a tiny random CLIP with a word-level
tokenizer (tests/test_metrics.py, tests/test_evaluate.py).
"""

import pytest
import torch
import transformers

from vae import VAEConfig

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
