"""
SD3's prompt encoding: prompts -> (context, y), through transformers' CLIP-L, CLIP-G and T5-XXL.

    encoders = TextEncoders.from_pretrained("/models/stable-diffusion-3-medium-diffusers")
    context, y = encoders.encode(["a photo of a cat"])      # (1, 333, 4096), (1, 2048)
    context_null, y_null = encoders.encode_null()           # the empty string: the paper's null prompt

The null prompt is the encoded empty string (what training uses for y_null, as the authors' release
does). Weights are read as safetensors only. Shape legend: B batch, L tokens, Dc context width, Dy
pooled width.
"""

import os
import warnings

import torch
import torch.nn.functional as F_


class TextEncoders:
    """SD3's three text encoders (transformers models), as one callable.

    Per token: CLIP-L and CLIP-G penultimate hidden states (hidden_states[-2], no final
    LayerNorm), concatenated on features (768 + 1280 = 2048), zero-padded to the T5 width
    (4096), then T5-XXL's last hidden state appended on the sequence axis: 77 + 256 tokens.
    Pooled: CLIP-L's and CLIP-G's projected pooled outputs, concatenated (2048). SD3's
    CLIP-L ships an identity text_projection, so "projected" and "not projected" agree.
    Without T5 its part of the context is zeros (as diffusers does). No attention masks.
    The null prompt is the encoded EMPTY STRING, through all three encoders.
    """

    def __init__(self, clip_l, tokenizer_l, clip_g, tokenizer_g, t5=None, tokenizer_t5=None,
                 max_t5_tokens=256, context_dim=4096, device="cpu", dtype=torch.float32):
        if (t5 is None) != (tokenizer_t5 is None):
            raise ValueError("T5 needs both its model and its tokenizer (or neither)")
        self.clips = [(clip_l.to(device, dtype).eval(), tokenizer_l), (clip_g.to(device, dtype).eval(), tokenizer_g)]
        # T5 overflows in fp16 (NaN): it runs in bf16 when fp16 is asked for
        self.t5_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        self.t5 = (t5.to(device, self.t5_dtype).eval(), tokenizer_t5) if t5 is not None else None
        self.max_t5_tokens, self.device, self.dtype = max_t5_tokens, torch.device(device), dtype
        self.context_dim = t5.config.d_model if t5 is not None else context_dim
        for m in [clip_l, clip_g] + ([t5] if t5 is not None else []):
            m.requires_grad_(False)
        self._null = None

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32, use_t5=True, max_t5_tokens=256,
                        context_dim=4096):
        """From a folder in the diffusers layout: text_encoder (CLIP-L), text_encoder_2
        (CLIP-G), text_encoder_3 (T5), tokenizer, tokenizer_2, tokenizer_3. context_dim is
        the MMDiT's context width, used only without T5 (with T5 it is T5's width)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        parts = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        parts += ["text_encoder_3", "tokenizer_3"] if use_t5 else []
        missing = [p for p in parts if not os.path.isdir(os.path.join(folder, p))]
        if missing:
            raise FileNotFoundError(f"{folder}: missing text-encoder folders {missing} (expected the diffusers "
                                    f"layout: {', '.join(parts)}); pass use_t5=False to run without T5")
        sub = lambda p: os.path.join(folder, p)  # noqa: E731
        kw = {"use_safetensors": True}  # weights must be safetensors: pickles can execute code
        clip_l = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder"), **kw)
        clip_g = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder_2"), **kw)
        t5 = tok3 = None
        if use_t5:
            t5 = T5EncoderModel.from_pretrained(sub("text_encoder_3"), **kw)
            tok3 = AutoTokenizer.from_pretrained(sub("tokenizer_3"))
        return cls(clip_l, AutoTokenizer.from_pretrained(sub("tokenizer")), clip_g,
                   AutoTokenizer.from_pretrained(sub("tokenizer_2")), t5, tok3, max_t5_tokens, context_dim,
                   device=device, dtype=dtype)

    def _tokenize(self, tokenizer, prompts, max_length, name):
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids  # (B, max_length)
        full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[1] > max_length:
            cut = [p for p, n in zip(prompts, (full != tokenizer.pad_token_id).sum(1).tolist()) if n > max_length]
            warnings.warn(f"{name}: {len(cut)} prompt(s) longer than {max_length} tokens were truncated, "
                          f"e.g. {cut[0][:80]!r}", stacklevel=3)
        return ids.to(self.device)

    @torch.no_grad()
    def encode(self, prompts):
        """prompts (list of B str) -> context (B, 77 + max_t5_tokens, Dc), y (B, Dy)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("encode() needs at least one prompt, got an empty list")
        tokens, pooled = [], []
        for (model, tokenizer), name in zip(self.clips, ("CLIP-L", "CLIP-G")):
            ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length, name)
            out = model(ids, output_hidden_states=True)
            tokens.append(out.hidden_states[-2])  # (B, 77, 768 | 1280): penultimate layer
            pooled.append(out.text_embeds)  # (B, 768 | 1280)
        clip_tokens = torch.cat(tokens, dim=-1)  # (B, 77, 2048)
        if clip_tokens.shape[-1] > self.context_dim:
            raise ValueError(f"CLIP token width {clip_tokens.shape[-1]} exceeds the context width {self.context_dim}")
        clip_tokens = F_.pad(clip_tokens, (0, self.context_dim - clip_tokens.shape[-1]))  # (B, 77, Dc)
        if self.t5 is not None:
            model, tokenizer = self.t5
            ids = self._tokenize(tokenizer, prompts, self.max_t5_tokens, "T5")
            t5_tokens = model(ids).last_hidden_state  # (B, max_t5_tokens, Dc)
        else:
            t5_tokens = torch.zeros(len(prompts), self.max_t5_tokens, self.context_dim, device=self.device)
        context = torch.cat([clip_tokens.to(self.dtype), t5_tokens.to(self.dtype)], dim=1)  # (B, L, Dc)
        return context, torch.cat(pooled, dim=-1).to(self.dtype)  # (B, Dy)

    def encode_null(self):
        """The null prompt (the paper's empty-set symbol): the encoded empty string,
        (1, L, Dc) and (1, Dy). Cached."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null

    def encode_with_negative(self, prompts, negative_prompts=None):
        """(context, y, context_null, y_null); the null side is the empty string, or the
        negative prompts (one per prompt) when given."""
        context, y = self.encode(prompts)
        if negative_prompts is None:
            context_null, y_null = self.encode_null()
            return context, y, context_null.expand_as(context), y_null.expand_as(y)
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(context)
        if len(negative_prompts) != len(context):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(context)} prompts")
        return (context, y) + self.encode(negative_prompts)
