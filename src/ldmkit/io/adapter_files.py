"""Adapter files of the ecosystem, both ways: LoRA (diffusers/peft and kohya names) and textual-inversion
embeddings (diffusers and AUTOMATIC1111), detected from their keys.

LoRA key layouts read (component "unet" or "text_encoder", PATH a diffusers / transformers module path):

    peft / diffusers     unet.PATH.lora_A.weight  unet.PATH.lora_B.weight   (alpha: `lora_adapter_metadata`)
    diffusers (older)    unet.PATH.lora.down.weight, text_encoder.PATH.lora_linear_layer.up.weight,
                         unet.PATH.processor.to_q_lora.down.weight (attention processors)
    kohya (A1111, ComfyUI) lora_unet_FLAT.lora_down.weight / .lora_up.weight / .alpha, lora_te_FLAT...
                         (FLAT = PATH with "." -> "_"; the text encoder's PATH starts with text_model.)

Written: diffusers/peft (`pytorch_lora_weights.safetensors`; alpha / r folded into lora_B, so every
reader applies it at scale 1) and kohya (alpha kept, `ss_*` metadata).

Embeddings read: diffusers `{token: [n, d]}` (.safetensors / .bin), A1111 `{"emb_params": [n, d]}`
(.safetensors, token = file name) and A1111 `.pt` (`string_to_param`); written in the first two.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ldmkit.adapters.lora import LoRA, LoRALayer
from ldmkit.errors import UserError, reading
from ldmkit.io.files import read_torch_weights, save_tensors

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_EMBEDDING_FILE = "learned_embeds.safetensors"
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
_KOHYA_PREFIX = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_LAYOUTS = [  # (format, pattern -> (component or None, path, role))
    ("kohya", re.compile(r"^lora_(unet|te1|te2|te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")),
    ("diffusers", re.compile(r"^(?:(unet|text_encoder_2|text_encoder|transformer)\.)?(.+?)\.processor\."
                             r"(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")),
    ("diffusers", re.compile(r"^(?:(unet|text_encoder_2|text_encoder|transformer)\.)?(.+?)\."
                             r"(lora_A\.weight|lora_B\.weight|lora_A\.default\.weight|lora_B\.default\.weight|"
                             r"lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
                             r"lora_linear_layer\.up\.weight|alpha)$")),
]
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
         "lora_A.default.weight": "down", "lora_B.default.weight": "up", "lora.down.weight": "down",
         "lora.up.weight": "up", "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
         "alpha": "alpha"}
_LYCORIS = re.compile(r"\.(hada_\w+|lokr_\w+|dora_scale|lora_magnitude_vector(\.\w+)?|diff|diff_b)$")


def read_tensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, text metadata) of a .safetensors file, or of a weights-only PyTorch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} " + ("is not a file" if path.exists() else "does not exist"))
    if path.suffix.lower() in (".pt", ".ckpt", ".bin", ".pth"):
        return read_torch_weights(path, what), {}
    from safetensors import safe_open

    with reading(f"{what} {path}"), safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# --------------------------------------------------------------------------------------- LoRA
def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(format, component, path, role) of one LoRA key, None when it is not one."""
    for fmt, pattern in _LAYOUTS:
        m = pattern.match(key)
        if m is None:
            continue
        if fmt == "kohya":
            return fmt, _KOHYA_PREFIX[m.group(1)], m.group(2), _ROLE[m.group(3)]
        if len(m.groups()) == 4:  # attention-processor layout: PATH.processor.to_q_lora.down.weight
            comp, path, proj, role = m.groups()
            return fmt, comp or "unet", f"{path}.{proj}" + (".0" if proj == "to_out" else ""), role
        comp, path, role = m.groups()
        if comp is None:  # keys without a component prefix: the text encoder's start at text_model.
            comp = "text_encoder" if path.startswith("text_model.") else "unet"
        return fmt, comp, path, _ROLE[role]
    return None


def _alphas_from_metadata(metadata: dict[str, str], where: str) -> dict[str, tuple[float | None, dict]]:
    """diffusers' `lora_adapter_metadata` (LoraConfig kwargs per component) -> {component: (lora_alpha,
    alpha_pattern)}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"LoRA {where}: its lora_adapter_metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UserError(f"LoRA {where}: its lora_adapter_metadata must be a JSON object")
    out = {}
    for comp in _COMPONENTS:
        alpha = meta.get(f"{comp}.lora_alpha")
        pattern = meta.get(f"{comp}.alpha_pattern") or {}
        if alpha is not None or pattern:
            if not isinstance(pattern, dict) or (alpha is not None and not isinstance(alpha, (int, float))):
                raise UserError(f"LoRA {where}: {comp}.lora_alpha / alpha_pattern in its metadata are malformed")
            out[comp] = (None if alpha is None else float(alpha), pattern)
    return out


def _pattern_alpha(path: str, default: float | None, pattern: dict) -> float | None:
    for key, value in pattern.items():
        if path == key or path.endswith("." + key) or re.fullmatch(key, path):
            return float(value)
    return default


def read_lora(path: str | Path) -> LoRA:
    """A LoRA file in any of the layouts above; a file that is not one is a one-line error."""
    tensors, metadata = read_tensors(path, "LoRA file")
    where = str(path)
    lycoris = sorted(k for k in tensors if _LYCORIS.search(k))
    if lycoris:
        raise UserError(f"LoRA {where}: {lycoris[0]!r} belongs to a LyCORIS / DoRA variant (LoHa, LoKr, DoRA), "
                        "which ldmkit does not read; use a plain LoRA (lora_down/lora_up or lora_A/lora_B)")
    parts: dict[tuple[str, str], dict] = {}
    formats, unknown = set(), []
    for key, value in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        fmt, comp, p, role = parsed
        formats.add(fmt)
        parts.setdefault((comp, p), {})[role] = value
    if not parts:
        raise UserError(f"{where} is not a LoRA file: no key has a LoRA layout (e.g. {list(tensors)[:2]}; expected "
                        "lora_unet_*.lora_down.weight or unet.*.lora_A.weight)")
    if unknown:
        raise UserError(f"LoRA {where}: {len(unknown)} keys are not LoRA weights (e.g. {unknown[0]!r})")
    if len(formats) > 1:
        raise UserError(f"LoRA {where} mixes kohya and diffusers key layouts")
    alphas = _alphas_from_metadata(metadata, where)
    lora = LoRA(metadata=metadata)
    for (comp, p), roles in sorted(parts.items()):
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            raise UserError(f"LoRA {where}: layer {comp}.{p} has no {missing} weight")
        down, up = roles["down"], roles["up"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA {where}: layer {comp}.{p} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                            "expected [r, in(, kh, kw)] and [out, r(, 1, 1)] of one rank r")
        alpha = roles.get("alpha")
        if alpha is not None:
            if alpha.numel() != 1 or not torch.isfinite(alpha).all():
                raise UserError(f"LoRA {where}: the alpha of {comp}.{p} is not one finite number")
            alpha = float(alpha.reshape(()).float())
        elif comp in alphas:
            alpha = _pattern_alpha(p, *alphas[comp])
        for name, t in (("down", down), ("up", up)):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise UserError(f"LoRA {where}: the {name} weight of {comp}.{p} is not finite floating-point data")
        lora.layers.setdefault(comp, {})[p] = LoRALayer(down, up, alpha)
    lora.metadata["ldmkit_format"] = formats.pop()
    return lora


def parse_weighted(spec: str, what: str = "--lora") -> tuple[str, float]:
    """"PATH[:SCALE]" -> (path, scale); a Windows-style "C:..." or a path with ':' and no number keeps it."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return spec, 1.0
        if not -100 <= scale <= 100 or scale != scale:
            raise UserError(f"{what} {spec}: scale {tail} must be a number in [-100, 100]")
        return path, scale
    return spec, 1.0


def _text_path(path: str) -> str:
    """The classic transformers path of a CLIP text-encoder module (with its text_model. level)."""
    return path if path.startswith("text_model.") else "text_model." + path


def lora_to_diffusers(lora: LoRA) -> dict[str, torch.Tensor]:
    out = {}
    for comp, layers in lora.layers.items():
        for p, layer in layers.items():
            p = _text_path(p) if comp.startswith("text_encoder") else p
            out[f"{comp}.{p}.lora_A.weight"] = layer.down.contiguous()
            out[f"{comp}.{p}.lora_B.weight"] = (layer.up.float() * layer.scale).to(layer.up.dtype).contiguous()
    return out


def lora_to_kohya(lora: LoRA) -> dict[str, torch.Tensor]:
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
    out = {}
    for comp, layers in lora.layers.items():
        if comp not in prefix:
            raise UserError(f"kohya LoRA files have no names for component {comp!r}")
        for p, layer in layers.items():
            p = _text_path(p) if comp.startswith("text_encoder") else p
            name = f"{prefix[comp]}_{p.replace('.', '_')}"
            out[f"{name}.lora_down.weight"] = layer.down.contiguous()
            out[f"{name}.lora_up.weight"] = layer.up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
    return out


def write_lora(path: str | Path, lora: LoRA, fmt: str = "diffusers", metadata: dict[str, str] | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write `lora` as a diffusers/peft or kohya safetensors file (atomically)."""
    if fmt not in ("diffusers", "kohya"):
        raise UserError(f"LoRA format {fmt!r} is not one of diffusers, kohya")
    tensors = lora_to_diffusers(lora) if fmt == "diffusers" else lora_to_kohya(lora)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return save_tensors(path, tensors, metadata={"format": "pt", **(metadata or {})})


def kohya_metadata(lora: LoRA, base: str, settings: dict) -> dict[str, str]:
    """The `ss_*` fields kohya's sd-scripts write, which A1111's and ComfyUI's LoRA lists show."""
    layers = [x for v in lora.layers.values() for x in v.values()]
    is_conv = [x.down.dim() == 4 and x.down.shape[2:].numel() > 1 for x in layers]  # kohya's conv_dim layers
    linear = [x for x, c in zip(layers, is_conv) if not c]
    conv = [x for x, c in zip(layers, is_conv) if c]
    rank = max((x.rank for x in linear), default=0)
    alpha = next((x.alpha for x in linear if x.alpha is not None), rank)
    args = {}
    if conv:
        args = {"conv_dim": str(max(x.rank for x in conv)),
                "conv_alpha": str(next((x.alpha for x in conv if x.alpha is not None), conv[0].rank))}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps(args) if args else "", "ss_sd_model_name": base,
            "ss_training_comment": "trained with ldmkit", "ss_output_name": settings.get("name", "lora")}
    for key, value in settings.items():
        if key.startswith("ss_"):
            meta[key] = str(value)
    return {k: v for k, v in meta.items() if v != ""}


# --------------------------------------------------------------------------------------- embeddings
def read_embedding(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """(trigger token or None, vectors [n, d]) of a textual-inversion file (diffusers or A1111)."""
    path = Path(path)
    if path.suffix.lower() in (".pt", ".bin", ".pth", ".ckpt"):
        tensors = read_a1111_pt(path)
    else:
        tensors, _ = read_tensors(path, "embedding file")
    where = str(path)
    if "clip_l" in tensors or "clip_g" in tensors:
        raise UserError(f"embedding {where} is an SDXL embedding (clip_l / clip_g vectors); this model has one "
                        "CLIP text encoder")
    if "emb_params" in tensors:
        token, vectors = None, tensors["emb_params"]
    elif len(tensors) == 1:
        token, vectors = next(iter(tensors.items()))
    else:
        raise UserError(f"{where} is not a textual-inversion embedding: expected one {{token: vectors}} entry or "
                        f"'emb_params', found {len(tensors)} tensors (e.g. {list(tensors)[:3]})")
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or not vectors.is_floating_point() or not torch.isfinite(vectors).all() or not len(vectors):
        raise UserError(f"embedding {where}: vectors must be finite floats of shape [n, width], got "
                        f"{vectors.dtype} {tuple(vectors.shape)}")
    return token, vectors


def read_a1111_pt(path: Path) -> dict[str, torch.Tensor]:
    """An A1111 .pt embedding ({"string_to_param": {"*": tensor}, ...}) as {"emb_params": tensor}."""
    from ldmkit.io.files import load_torch_file

    obj = load_torch_file(path, "embedding file")
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        params = list(obj["string_to_param"].values())
        if len(params) == 1 and isinstance(params[0], torch.Tensor):
            return {"emb_params": params[0]}
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    raise UserError(f"embedding file {path}: not a textual-inversion embedding ({type(obj).__name__} without "
                    "string_to_param or {token: vectors})")


def write_embedding(path: str | Path, token: str, vectors: torch.Tensor, fmt: str = "diffusers",
                    metadata: dict[str, str] | None = None) -> Path:
    """diffusers: {token: [n, d]}; a1111: {"emb_params": [n, d]} (A1111 takes the token from the file name)."""
    if fmt not in ("diffusers", "a1111"):
        raise UserError(f"embedding format {fmt!r} is not one of diffusers, a1111")
    key = token if fmt == "diffusers" else "emb_params"
    return save_tensors(path, {key: vectors.detach().float().cpu().contiguous()},
                        metadata={"format": "pt", **(metadata or {})})


__all__ = ["DIFFUSERS_EMBEDDING_FILE", "DIFFUSERS_LORA_FILE", "kohya_metadata", "parse_weighted", "read_embedding",
           "read_lora", "write_embedding", "write_lora"]
