"""SDXL's conditioning: two CLIP text encoders and the micro-conditioning ids (Podell et al. 2023).

The base model reads the prompt with CLIP ViT-L (`CLIPTextModel`) and OpenCLIP ViT-bigG (converted to
`CLIPTextModelWithProjection`); the refiner with the second alone. As diffusers' SDXL pipelines:

    context   each encoder's hidden states before its last layer (clip_skip k: k layers earlier), no
              final LayerNorm, side by side: [B, 77, 768 + 1280]
    pooled    the last encoder's projected [EOS] state, `text_embeds` [B, 1280]
    time_ids  base:    original size (h, w) + crop top-left (y, x) + target size (h, w)
              refiner: original size (h, w) + crop top-left (y, x) + aesthetic score

`pooled` and `time_ids` reach the UNet's time embedding (`UNetConfig.addition_embed_type="text_time"`).
The unconditional side is zeros when the model says `force_zeros_for_empty_prompt` (SDXL base does)
and no negative prompt is given, else the encoded negative prompt. The sizes default to the output
size, the crop to (0, 0), the aesthetic scores to 6.0 / 2.5, and the negative side follows diffusers'
text-to-image rules (`SDXLTextEncoder.time_ids`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.conditioning.base import Conditioner, Conditioning
from ldmkit.conditioning.text import CLIPTextEncoder, PretrainedTextConfig, hf_config_fields

# micro-conditioning settings a pipeline call may give, with what they default to
MICRO = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
         "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


def check_micro(micro: dict) -> dict:
    """Micro-conditioning settings: sizes are (h, w) pairs of 1..16384, crops (y, x) of 0..16384,
    aesthetic scores finite numbers in [0, 10]. (The base reads no score, the refiner no target size.)"""
    from ldmkit.errors import check_number

    out = {}
    for name, value in micro.items():
        if name not in MICRO:
            raise ValueError(f"unknown micro-conditioning setting {name!r} (one of {', '.join(MICRO)})")
        if name.endswith("aesthetic_score"):
            check_number(name, value, 0.0, 10.0)
            out[name] = float(value)
            continue
        lo = 0 if "crops" in name else 1
        pair = tuple(value) if isinstance(value, (list, tuple)) else ()
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= 16384 for v in pair):
            raise ValueError(f"{name}={value!r} must be two integers (height, width / top, left) in [{lo}, 16384]")
        out[name] = pair
    return out


def time_ids(height: int, width: int, micro: dict | None = None, negative: bool = False,
             aesthetic: bool = False) -> torch.Tensor:
    """[1, 6] (base) or, with `aesthetic`, [1, 5] (refiner) micro-conditioning ids of an output of height x
    width, by diffusers' rules: the base's negative side has its own ids only when both negative sizes
    are given (its crop then defaults to (0, 0)), else the positive ids; the refiner's negative side
    takes the negative sizes (default: the positive ones), the negative crop (default (0, 0)) and the
    negative score (default 2.5)."""
    m = dict(micro or {})
    own = negative and (aesthetic or (m.get("negative_original_size") is not None
                                      and m.get("negative_target_size") is not None))
    side = "negative_" if own else ""
    size = (height, width)
    original = tuple(m.get(side + "original_size") or m.get("original_size") or size)
    crop = tuple(m.get(side + "crops_coords_top_left") or (0, 0))
    if aesthetic:
        ids = original + crop + (m.get("negative_aesthetic_score", 2.5) if negative else m.get("aesthetic_score", 6.0),)
    else:
        ids = original + crop + tuple(m.get(side + "target_size") or m.get("target_size") or size)
    return torch.tensor([list(map(float, ids))])


class SDXLTextPart(CLIPTextEncoder):
    """One of SDXL's encoders: hidden states from before the last layer, without the final LayerNorm;
    pooled = the projected [EOS] state (`text_embeds`) of a `CLIPTextModelWithProjection`."""

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        device = next(self.model.parameters()).device
        with self.grad_context():
            out = self.model(input_ids=ids.to(device), output_hidden_states=True)
        pooled = getattr(out, "text_embeds", None)
        return Conditioning(context=out.hidden_states[-(self.config.clip_skip + 2)],
                            pooled=pooled if pooled is not None else out.pooler_output)


@dataclass(frozen=True)
class SDXLTextConfig:
    encoders: tuple = ()  # PretrainedTextConfig fields of each encoder, in order (the last one pools)
    projection: tuple = ()  # per encoder: True for CLIPTextModelWithProjection
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False  # the refiner: 5 time ids with the aesthetic score
    pooled_width: int = 1280

    def __post_init__(self):
        object.__setattr__(self, "encoders", tuple(dict(e) if not isinstance(e, PretrainedTextConfig) else
                                                   _fields(e) for e in self.encoders))
        object.__setattr__(self, "projection", tuple(bool(p) for p in self.projection))
        if not 1 <= len(self.encoders) <= 2 or len(self.projection) != len(self.encoders):
            raise ValueError(f"an SDXL conditioner has one or two text encoders (got {len(self.encoders)}, "
                             f"{len(self.projection)} projection flags)")
        for name in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")


def _fields(cfg: PretrainedTextConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


class SDXLTextEncoder(Conditioner):
    component_type = "text-sdxl"
    prompt_syntax = True  # encode(..., syntax=True): A1111's weights, BREAK and chunks, in both encoders

    def __init__(self, config: SDXLTextConfig, parts: list[SDXLTextPart]):
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleList(parts)

    @property
    def max_length(self) -> int:
        return self.encoders[-1].max_length

    @classmethod
    def build(cls, models: list[nn.Module], tokenizers: list, max_length: int | None = None, clip_skip: int = 0,
              force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False
              ) -> "SDXLTextEncoder":
        """From transformers models (CLIPTextModel and/or CLIPTextModelWithProjection) and their tokenizers."""
        parts = []
        for model, tok in zip(models, tokenizers):
            hf = {**hf_config_fields(model.config.to_dict()), "architectures": [type(model).__name__]}
            length = max_length or min(int(tok.model_max_length), model.config.max_position_embeddings)
            parts.append(SDXLTextPart(PretrainedTextConfig(hf, length, clip_skip, False), model, tok))
        width = int(getattr(models[-1].config, "projection_dim", models[-1].config.hidden_size))
        cfg = SDXLTextConfig(tuple(p.config for p in parts), tuple(hasattr(m, "text_projection") for m in models),
                             force_zeros_for_empty_prompt, requires_aesthetics_score, width)
        return cls(cfg, parts)

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, prompts: list[str], **kw) -> Conditioning:
        conds = [enc.encode(prompts, **kw) for enc in self.encoders]
        return Conditioning(context=torch.cat([c.context for c in conds], dim=-1), pooled=conds[-1].pooled)

    def null(self, batch_size: int) -> Conditioning:
        if not self.config.force_zeros_for_empty_prompt:
            return self.encode([""] * batch_size)
        p = next(self.parameters())
        width = sum(enc.model.config.hidden_size for enc in self.encoders)
        return Conditioning(context=torch.zeros(batch_size, self.max_length, width, device=p.device, dtype=p.dtype),
                            pooled=torch.zeros(batch_size, self.config.pooled_width, device=p.device, dtype=p.dtype))

    def time_ids(self, height: int, width: int, micro: dict | None = None, negative: bool = False) -> torch.Tensor:
        return time_ids(height, width, micro, negative, aesthetic=self.config.requires_aesthetics_score)

    # ---- the component folder ----------------------------------------------------------------
    def save_extra_files(self, folder) -> None:
        for k, enc in enumerate(self.encoders):
            enc.tokenizer.save_pretrained(str(Path(folder) / f"tokenizer_{k}"))

    @classmethod
    def from_component(cls, config: dict, folder) -> "SDXLTextEncoder":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from ldmkit.conditioning.text import check_hf_text_config, load_hf_tokenizer
        from ldmkit.io.files import config_from_dict

        cfg = config_from_dict(SDXLTextConfig, config)
        parts = []
        for k, (enc, proj) in enumerate(zip(cfg.encoders, cfg.projection)):
            pc = config_from_dict(PretrainedTextConfig, enc)
            check_hf_text_config(pc.hf_config, f"{Path(folder) / 'config.json'} (text encoder {k})")
            hf = hf_config_fields(pc.hf_config)
            model = (CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig.from_dict(hf))
            tok_dir = Path(folder) / f"tokenizer_{k}"
            tok = load_hf_tokenizer(lambda d=tok_dir: CLIPTokenizer.from_pretrained(str(d), local_files_only=True),
                                    tok_dir)
            parts.append(SDXLTextPart(pc, model, tok))
        return cls(cfg, parts)


__all__ = ["MICRO", "check_micro", "time_ids", "SDXLTextConfig", "SDXLTextEncoder", "SDXLTextPart"]
