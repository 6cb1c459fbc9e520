"""The text conditioning of Stable Diffusion 3 (CLIP ViT-L, OpenCLIP ViT-bigG and T5-XXL) and FLUX.1 (CLIP ViT-L's
pooled output and T5-XXL's states: `FluxTextEncoder`). SD3's, as diffusers'
StableDiffusion3Pipeline combines them:

    clip      both CLIPs' hidden states before their last layer (clip_skip k: k layers earlier), side by
              side [B, 77, 768 + 1280], zero-padded to T5's width (4096)
    t5        T5's last hidden state [B, 256, 4096] (max_sequence_length tokens; zeros without T5)
    context   [clip; t5] along the sequence: [B, 77 + 256, 4096]
    pooled    both CLIPs' projected [EOS] states side by side: [B, 768 + 1280]

SD3 may run without T5 (its tokens are then zeros, as diffusers does), which saves 4.7 B parameters.
The unconditional side is the encoded empty prompt (SD3 has no force_zeros rule).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.conditioning.base import Conditioner, Conditioning
from ldmkit.conditioning.sdxl import SDXLTextPart
from ldmkit.conditioning.text import PretrainedTextConfig, _FrozenHFText, hf_config_fields


class T5Part(_FrozenHFText):
    """T5's encoder: the last hidden state of max_length tokens (no attention mask, as SD3 and FLUX use it)."""

    prompt_syntax = False  # weights and BREAK are CLIP conventions; T5 reads the prompt as written

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        device = next(self.model.parameters()).device
        with self.grad_context():
            out = self.model(input_ids=ids.to(device))
        return Conditioning(context=out[0])

    def encode(self, prompts: list[str], syntax: bool = False) -> Conditioning:
        return super().encode(prompts, syntax=False)


@dataclass(frozen=True)
class SD3TextConfig:
    clip: tuple = ()  # PretrainedTextConfig fields of CLIP-L and CLIP-G (CLIPTextModelWithProjection)
    t5: dict | None = None  # that of T5 (T5EncoderModel), or None: SD3 without T5
    joint_attention_dim: int = 4096  # T5's width: the CLIP states are padded to it
    max_sequence_length: int = 256  # T5 tokens (zeros of this length without T5)

    def __post_init__(self):
        from ldmkit.errors import check_int

        object.__setattr__(self, "clip", tuple(asdict(c) if isinstance(c, PretrainedTextConfig) else dict(c)
                                               for c in self.clip))
        if isinstance(self.t5, PretrainedTextConfig):
            object.__setattr__(self, "t5", asdict(self.t5))
        if len(self.clip) != 2:
            raise ValueError(f"SD3 reads the prompt with two CLIP text encoders, got {len(self.clip)}")
        check_int("joint_attention_dim", self.joint_attention_dim, 1, 1 << 16)
        check_int("max_sequence_length", self.max_sequence_length, 1, 4096)

    def to_dict(self) -> dict:
        return asdict(self)


class SD3TextEncoder(Conditioner):
    component_type = "text-sd3"
    prompt_syntax = True  # the CLIPs read A1111's syntax (and chunks); T5 the plain prompt

    def __init__(self, config: SD3TextConfig, clips: list[SDXLTextPart], t5: T5Part | None):
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleList(clips)
        self.t5 = t5

    @classmethod
    def build(cls, clips: list, tokenizers: list, t5=None, t5_tokenizer=None, clip_skip: int = 0,
              max_sequence_length: int = 256, joint_attention_dim: int | None = None) -> "SD3TextEncoder":
        parts = [SDXLTextPart(PretrainedTextConfig(_hf(m), 77, clip_skip, False), m, tok)
                 for m, tok in zip(clips, tokenizers)]
        t5_part = None
        if t5 is not None:
            t5_part = T5Part(PretrainedTextConfig(_hf(t5), max_sequence_length, 0, False), t5, t5_tokenizer)
        width = joint_attention_dim or (t5.config.d_model if t5 is not None else 4096)
        cfg = SD3TextConfig(tuple(p.config for p in parts), t5_part.config if t5_part is not None else None, width,
                            max_sequence_length)
        return cls(cfg, parts, t5_part)

    def encode(self, prompts: list[str], **kw) -> Conditioning:
        clips = [enc.encode(prompts, **kw) for enc in self.encoders]
        clip = torch.cat([c.context for c in clips], dim=-1)  # [B, L, 768 + 1280]
        clip = F.pad(clip, (0, self.config.joint_attention_dim - clip.shape[-1]))
        if self.t5 is not None:
            t5 = self.t5.encode(prompts).context.to(clip.dtype)
        else:
            t5 = clip.new_zeros(clip.shape[0], self.config.max_sequence_length, self.config.joint_attention_dim)
        return Conditioning(context=torch.cat([clip, t5], dim=-2), pooled=torch.cat([c.pooled for c in clips], dim=-1))

    def null(self, batch_size: int) -> Conditioning:
        return self.encode([""] * batch_size)

    # ---- the component folder ----------------------------------------------------------------
    def save_extra_files(self, folder) -> None:
        for k, enc in enumerate(self.encoders):
            enc.tokenizer.save_pretrained(str(Path(folder) / f"tokenizer_{k}"))
        if self.t5 is not None:
            self.t5.tokenizer.save_pretrained(str(Path(folder) / "tokenizer_t5"))

    @classmethod
    def from_component(cls, config: dict, folder) -> "SD3TextEncoder":
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config
        from transformers import T5EncoderModel

        from ldmkit.conditioning.text import check_hf_text_config, load_hf_tokenizer
        from ldmkit.io.files import config_from_dict

        cfg = config_from_dict(SD3TextConfig, config)
        parts = []
        for k, enc in enumerate(cfg.clip):
            pc = config_from_dict(PretrainedTextConfig, enc)
            check_hf_text_config(pc.hf_config, f"{Path(folder) / 'config.json'} (CLIP {k})")
            model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(hf_config_fields(pc.hf_config)))
            d = Path(folder) / f"tokenizer_{k}"
            parts.append(SDXLTextPart(pc, model, load_hf_tokenizer(
                lambda d=d: CLIPTokenizer.from_pretrained(str(d), local_files_only=True), d)))
        t5 = None
        if cfg.t5 is not None:
            pc = config_from_dict(PretrainedTextConfig, cfg.t5)
            check_hf_text_config(pc.hf_config, f"{Path(folder) / 'config.json'} (T5)")
            d = Path(folder) / "tokenizer_t5"
            t5 = T5Part(pc, T5EncoderModel(T5Config.from_dict(hf_config_fields(pc.hf_config))), load_hf_tokenizer(
                lambda: AutoTokenizer.from_pretrained(str(d), local_files_only=True), d))
        return cls(cfg, parts, t5)


def _hf(model) -> dict:
    """The config a component records: the model's fields and its class (CLIP with or without projection)."""
    return {**hf_config_fields(model.config.to_dict()), "architectures": [type(model).__name__]}





@dataclass(frozen=True)
class FluxTextConfig:
    clip: dict = None  # PretrainedTextConfig fields of CLIP-L (CLIPTextModel: its pooled output)
    t5: dict = None  # that of T5-XXL (its states are the context)

    def __post_init__(self):
        for name in ("clip", "t5"):
            v = getattr(self, name)
            object.__setattr__(self, name, asdict(v) if isinstance(v, PretrainedTextConfig) else dict(v or {}))

    def to_dict(self) -> dict:
        return asdict(self)


class FluxTextEncoder(Conditioner):
    """FLUX.1's conditioning, as diffusers' FluxPipeline: context = T5's last hidden state [B, L, 4096]
    (max_sequence_length tokens, 512 by default), pooled = CLIP-L's pooled output [B, 768]."""

    component_type = "text-flux"
    prompt_syntax = True  # CLIP reads A1111's syntax for the pooled vector; T5 the plain prompt

    def __init__(self, config: FluxTextConfig, clip, t5: T5Part):
        super().__init__()
        self.config, self.clip, self.t5 = config, clip, t5

    @classmethod
    def build(cls, clip_model, clip_tokenizer, t5_model, t5_tokenizer, max_sequence_length: int = 512):
        from ldmkit.conditioning.text import CLIPTextEncoder

        clip = CLIPTextEncoder(PretrainedTextConfig(_hf(clip_model), 77, 0, False), clip_model, clip_tokenizer)
        t5 = T5Part(PretrainedTextConfig(_hf(t5_model), max_sequence_length, 0, False), t5_model, t5_tokenizer)
        return cls(FluxTextConfig(clip.config, t5.config), clip, t5)

    def encode(self, prompts: list[str], **kw) -> Conditioning:
        pooled = self.clip.encode(prompts, **kw).pooled
        return Conditioning(context=self.t5.encode(prompts).context, pooled=pooled.to(self.t5.model.dtype))

    def null(self, batch_size: int) -> Conditioning:
        return self.encode([""] * batch_size)

    def save_extra_files(self, folder) -> None:
        self.clip.tokenizer.save_pretrained(str(Path(folder) / "tokenizer_clip"))
        self.t5.tokenizer.save_pretrained(str(Path(folder) / "tokenizer_t5"))

    @classmethod
    def from_component(cls, config: dict, folder) -> "FluxTextEncoder":
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

        from ldmkit.conditioning.text import CLIPTextEncoder, check_hf_text_config, load_hf_tokenizer
        from ldmkit.io.files import config_from_dict

        cfg = config_from_dict(FluxTextConfig, config)
        pc, pt = config_from_dict(PretrainedTextConfig, cfg.clip), config_from_dict(PretrainedTextConfig, cfg.t5)
        for what, c in (("CLIP", pc), ("T5", pt)):
            check_hf_text_config(c.hf_config, f"{Path(folder) / 'config.json'} ({what})")
        dc, dt = Path(folder) / "tokenizer_clip", Path(folder) / "tokenizer_t5"
        clip_model = CLIPTextModel(CLIPTextConfig.from_dict(hf_config_fields(pc.hf_config)))
        clip = CLIPTextEncoder(pc, clip_model, load_hf_tokenizer(
            lambda: CLIPTokenizer.from_pretrained(str(dc), local_files_only=True), dc))
        t5 = T5Part(pt, T5EncoderModel(T5Config.from_dict(hf_config_fields(pt.hf_config))), load_hf_tokenizer(
            lambda: AutoTokenizer.from_pretrained(str(dt), local_files_only=True), dt))
        return cls(cfg, clip, t5)
__all__ = ["FluxTextConfig", "FluxTextEncoder", "SD3TextConfig", "SD3TextEncoder", "T5Part"]
