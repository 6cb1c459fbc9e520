"""Opt-in additions around a plain UNet, kept out of it so the UNet itself stays diffusers' model:

* a context adapter -- trainable self-attention layers over the conditioning tokens before any
  cross-attention reads them (lets a frozen text encoder's states be re-mixed, e.g. which object of
  "a red circle left of a blue square" is the subject);
* position features -- a learned projection of normalised pixel coordinates added to conv_in's output
  and to the input of every spatial transformer (queries then know where they are).

Both start as the identity (zero-initialised output projections), so wrapping a trained UNet changes
nothing until they train. `ExtendedUNet` is its own component type ("unet-extended"): the model
folder records the extensions, and `.unet` is the plain UNet (diffusers' key names) inside.

A ControlNet runs on an extended UNet as on its plain `.unet`, reading the adapted context
(`adapt_context`); position features stay the UNet's own (the control image tells the ControlNet where).

Position features reach the UNet's inner modules through forward hooks registered as bound methods
of the injection modules, so copies of the whole wrapper (EMA, FSDP templates) hook their own copies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.nn.embeddings import PositionInjection
from ldmkit.nn.transformer import ContextAdapter, Transformer2D


@dataclass(frozen=True)
class ExtendedUNetConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    context_adapter_layers: int = 0  # trainable self-attention layers over the context (0: none)
    context_adapter_width: int = 128
    context_adapter_heads: int = 4
    position_features: bool = False  # pixel coordinates after conv_in and into every spatial transformer

    def __post_init__(self):
        from ldmkit.errors import check_int

        if isinstance(self.unet, dict):
            from ldmkit.io.files import config_from_dict

            object.__setattr__(self, "unet", config_from_dict(UNetConfig, self.unet))
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"unet must be a UNet config, got {type(self.unet).__name__}")
        check_int("context_adapter_layers", self.context_adapter_layers, 0, 64)
        check_int("context_adapter_width", self.context_adapter_width, 1, 65536)
        check_int("context_adapter_heads", self.context_adapter_heads, 1, 4096)
        if not isinstance(self.position_features, bool):
            raise ValueError(f"position_features={self.position_features!r} must be true or false")
        if self.context_adapter_layers and self.context_adapter_width % self.context_adapter_heads:
            raise ValueError(f"context_adapter_width={self.context_adapter_width} must split into "
                             f"context_adapter_heads={self.context_adapter_heads} heads")
        if self.context_adapter_layers and not self.unet.has_cross_attention:
            raise ValueError("context_adapter_layers needs a UNet with cross-attention to feed")
        if not (self.context_adapter_layers or self.position_features):
            raise ValueError("an extended UNet needs an extension (context_adapter_layers > 0 or position_features)")

    def __getattr__(self, name):  # reads like the UNet config it extends (in_channels, sample_size, ...)
        if name.startswith("__") or name == "unet":
            raise AttributeError(name)
        return getattr(self.unet, name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExtendedUNetConfig":
        if not isinstance(d, dict):
            raise ValueError(f"an extended UNet config must be a JSON object, got {type(d).__name__}")
        known = {"unet", "context_adapter_layers", "context_adapter_width", "context_adapter_heads",
                 "position_features"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown extended-UNet config fields {unknown}")
        return cls(**d)


def _key(path: str) -> str:
    return path.replace(".", "-")  # ModuleDict keys cannot hold dots


class ExtendedUNet(nn.Module):
    """A UNet plus the extensions its config names; `forward` is the UNet's."""

    component_type = "unet-extended"

    def __init__(self, config: ExtendedUNetConfig, unet: UNet | None = None):
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else UNet(config.unet)
        u = config.unet
        self.context_adapter = (ContextAdapter(u.cross_attention_dim, config.context_adapter_width,
                                               config.context_adapter_layers, config.context_adapter_heads)
                                if config.context_adapter_layers else None)
        self.position = None
        if config.position_features:
            self.position = nn.ModuleDict({"conv_in": PositionInjection(u.block_out_channels[0])})
            self.unet.conv_in.register_forward_hook(self._after_conv_in)
            for path, module in self.unet.named_modules():
                if isinstance(module, Transformer2D):
                    injection = PositionInjection(module.norm.num_channels)
                    self.position[_key(path)] = injection
                    module.register_forward_pre_hook(injection.hook)

    @staticmethod
    def legacy_state(state: dict) -> dict:
        return legacy_keys(state)

    def _after_conv_in(self, module, args, output):
        return self.position["conv_in"](output)

    def adapt_context(self, context: torch.Tensor | None, context_mask: torch.Tensor | None = None):
        """The context the UNet's cross-attention reads (a ControlNet on this UNet reads the same)."""
        if self.context_adapter is None or context is None:
            return context
        if context_mask is not None:
            context_mask = context_mask.to(device=context.device, dtype=torch.bool)
        return self.context_adapter(context, context_mask)

    @property
    def guidance_mode(self) -> str:
        return self.unet.guidance_mode

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, down_residuals=None, mid_residual=None,
                guidance=None) -> torch.Tensor:
        return self.unet(x, t, context=self.adapt_context(context, context_mask), class_labels=class_labels,
                         context_mask=context_mask, down_residuals=down_residuals, mid_residual=mid_residual,
                         guidance=guidance)


LEGACY_FIELDS = ("position_features", "context_adapter_layers", "context_adapter_width", "context_adapter_heads")


def legacy_config(config: dict) -> ExtendedUNetConfig:
    """A "unet" component config written before the extensions left the UNet (it names
    `position_features` / `context_adapter_*`) as an ExtendedUNet config."""
    from ldmkit.io.files import config_from_dict

    ext = {k: config[k] for k in LEGACY_FIELDS if k in config}
    plain = config_from_dict(UNetConfig, {k: v for k, v in config.items() if k not in LEGACY_FIELDS})
    return ExtendedUNetConfig(unet=plain, **ext)


def legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of that older layout (`position_in.*`, `...attentions.J.position.*`, `context_adapter.*`
    beside the UNet's own keys) under ExtendedUNet's names."""
    out = {}
    for k, v in state.items():
        if k.startswith("position_in."):
            out["position.conv_in." + k.removeprefix("position_in.")] = v
        elif ".position." in k:
            path, rest = k.split(".position.", 1)
            out[f"position.{_key(path)}.{rest}"] = v
        elif k.startswith("context_adapter."):
            out[k] = v
        else:
            out["unet." + k] = v
    return out
