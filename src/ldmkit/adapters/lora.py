"""LoRA (Hu et al. 2021): a frozen layer W plus a low-rank update, W x + (alpha / r) * up(down(x)).

    training   attach(module, rank, alpha, targets)   peft's LoRA layers around the chosen Linear/Conv2d
               extract(module) -> {path: LoRALayer}  the trained factors, plain tensors
    files      io/adapter_files.py                      diffusers/peft and kohya names, both ways
    sampling   merge(components, lora, scale)        W += scale * (alpha / r) * up @ down, in place

A `LoRA` holds the layers of each component it adapts, keyed by the component's name in the
ecosystem's files ("unet", "text_encoder") and the module path inside it (diffusers' paths, which
are ldmkit's). Layers of a Conv2d carry conv factors (LoCon): down [r, in, kh, kw], up [out, r, 1, 1].
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ldmkit.errors import UserError

# --lora-targets groups: module-name suffixes in each network (diffusers' and transformers' names)
TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),  # UNet/DiT attention: diffusers' LoRA default
    "ff": ("ff.net.0.proj", "ff.net.2"),  # the transformer blocks' feed-forward
    "proj": ("proj_in", "proj_out"),  # the spatial transformers' in/out projections
    "conv": ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),  # resnets (LoCon)
    "text": ("q_proj", "k_proj", "v_proj", "out_proj"),  # CLIP text encoder attention
    "text-mlp": ("fc1", "fc2"),
}
UNET_GROUPS = ("attn", "ff", "proj", "conv")
TEXT_GROUPS = ("text", "text-mlp")
COMPONENT_OF = {"unet": "denoiser", "text_encoder": "conditioner"}  # file prefix -> ldmkit component


@dataclass(eq=False)
class LoRALayer:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None = None  # None: alpha = r (scale 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """(alpha / r) * up @ down in float32, shaped like the weight it adds to."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).mul_(self.scale).reshape(shape)


@dataclass
class LoRA:
    layers: dict[str, dict[str, LoRALayer]] = field(default_factory=dict)  # component -> path -> layer
    metadata: dict[str, str] = field(default_factory=dict)  # the file's text metadata

    def __len__(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def num_parameters(self) -> int:
        return sum(x.down.numel() + x.up.numel() for v in self.layers.values() for x in v.values())


# --------------------------------------------------------------------------------------- training
def target_suffixes(targets) -> dict[str, tuple[str, ...]]:
    """--lora-targets names (groups of TARGETS or module-name suffixes) -> {"unet": ..., "text_encoder": ...}."""
    out: dict[str, list[str]] = {"unet": [], "text_encoder": []}
    for t in targets:
        if t in TARGETS:
            out["text_encoder" if t in TEXT_GROUPS else "unet"].extend(TARGETS[t])
        elif re.fullmatch(r"[A-Za-z0-9_.]+", t):
            out["unet"].append(t)
        else:
            raise UserError(f"--lora-targets {t!r} is neither a group ({', '.join(TARGETS)}) nor a module name")
    return {k: tuple(dict.fromkeys(v)) for k, v in out.items()}


def matching_modules(module: nn.Module, suffixes) -> list[str]:
    """Paths of the Linear / Conv2d layers of `module` whose path ends with one of `suffixes`."""
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(n == s or n.endswith("." + s) for s in suffixes)]


def attach(module: nn.Module, rank: int, alpha: float | None, suffixes, dropout: float = 0.0,
           what: str = "the denoiser") -> list[str]:
    """Wrap the matching layers of `module` in peft LoRA layers (down: Kaiming, up: zero, so training
    starts from the model itself); every other parameter of `module` is frozen. Returns the paths."""
    from peft import LoraConfig, inject_adapter_in_model

    paths = matching_modules(module, suffixes)
    if not paths:
        raise UserError(f"--lora-targets {', '.join(suffixes)} match no Linear/Conv2d layer of {what}")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules="^(" + "|".join(re.escape(p) for p in paths) + ")$")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that no model card / config travels with the module
        inject_adapter_in_model(config, module)
    return paths


def extract(module: nn.Module) -> dict[str, LoRALayer]:
    """The peft LoRA layers of `module` as plain factors (copies, float32, on the CPU)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            out[name] = LoRALayer(m.lora_A["default"].weight.detach().float().cpu().clone(),
                                  m.lora_B["default"].weight.detach().float().cpu().clone(),
                                  float(m.lora_alpha["default"]))
    return out


@contextlib.contextmanager
def disabled(module: nn.Module):
    """`module` computes without its peft LoRA layers inside the block (LCM-LoRA's teacher is the base model);
    the layers' parameters keep their requires_grad (peft's own switch would freeze them)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m._disable_adapters = True  # what peft's LoRA forward reads (`disable_adapters`)
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


# --------------------------------------------------------------------------------------- merging
def layer_index(root: nn.Module) -> dict[str, nn.Module]:
    """The Linear / Conv2d layers of `root` by flat name (path with "." -> "_", kohya's form, which also
    looks up dotted paths), with and without the `text_model.` level transformers 4 has and 5 does not."""
    index = {}
    for name, m in root.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            other = name.removeprefix("text_model.") if name.startswith("text_model.") else "text_model." + name
            index.setdefault(other.replace(".", "_"), m)
            index[name.replace(".", "_")] = m
    return index


def _check_shapes(layer: LoRALayer, target: nn.Module, where: str) -> None:
    """up @ down must have the weight's shape (a Linear's factors also fit a 1x1 conv and back)."""
    w, d, u = target.weight, layer.down, layer.up
    ok = (u.shape[0] == w.shape[0] and u.dim() >= 2 and u.shape[1] == d.shape[0] and u.shape[2:].numel() == 1
          and d.dim() >= 2 and d.shape[1] == w.shape[1] and d[0].numel() == w[0].numel())
    if not ok:
        raise UserError(f"LoRA layer {where}: down {tuple(d.shape)} / up {tuple(u.shape)} do not fit the model's "
                        f"weight {tuple(w.shape)} (a LoRA for another base model?)")


def resolve(components: dict[str, nn.Module | None], lora: LoRA, source: str) -> list[tuple[str, nn.Module, LoRALayer]]:
    """(file path, model layer, LoRA layer) for every layer of `lora` the model has; shapes checked.
    None match: an error; some unmatched: a warning that counts them."""
    found, unmatched = [], []
    for comp, layers in lora.layers.items():
        root = components.get(COMPONENT_OF.get(comp, comp))
        if root is not None and comp == "text_encoder":
            root = getattr(root, "model", None)
        if isinstance(getattr(root, "unet", None), nn.Module):  # a wrapped UNet (ldmkit's extensions): the UNet
            root = root.unet
        index = layer_index(root) if root is not None else {}
        for path, layer in layers.items():
            target = index.get(path.replace(".", "_"))
            if target is None:
                unmatched.append(f"{comp}.{path}")
                continue
            _check_shapes(layer, target, f"{comp}.{path}")
            found.append((f"{comp}.{path}", target, layer))
    if not found:
        raise UserError(f"LoRA {source}: none of its {len(unmatched)} layers matches a layer of this model "
                        f"(e.g. {', '.join(unmatched[:2])}); it was made for another base model")
    if unmatched:
        warnings.warn(f"LoRA {source}: {len(unmatched)} of {len(unmatched) + len(found)} layers match no layer of "
                      f"this model and are ignored (e.g. {unmatched[0]})", stacklevel=2)
    return found


@torch.no_grad()
def merge(components: dict[str, nn.Module | None], lora: LoRA, scale: float = 1.0, source: str = "") -> int:
    """Add `scale` x the LoRA's updates into the model's weights (in float32, stored in their dtype);
    returns the number of layers changed."""
    found = resolve(components, lora, source)
    for _, target, layer in found:
        w = target.weight
        w.copy_((w.float() + layer.delta(w.shape).to(w.device).mul_(scale)).to(w.dtype))
    return len(found)


__all__ = ["LoRA", "LoRALayer", "TARGETS", "attach", "extract", "layer_index", "matching_modules", "merge",
           "resolve", "target_suffixes"]
