"""Reading IP-Adapters: h94's single files, and the CLIP image encoder they run on.

The file (`ip-adapter_sd15.safetensors`, `ip-adapter-plus_sd15.bin` ...), as diffusers' `load_ip_adapter` reads it:

    .safetensors   image_proj.NAME, ip_adapter.{2k + 1}.to_k_ip.weight / .to_v_ip.weight
    .bin           {"image_proj": {NAME: ...}, "ip_adapter": {...}}  (torch.load(weights_only=True) only)

`ip_adapter.{2k + 1}` belongs to the k-th cross-attention layer in diffusers' order (the numbering runs over
all attention layers; the even ones, self-attention, have no weights). The image projection's NAMEs:

    basic   proj.weight / .bias, norm.*                              -> ImageProjection (image_embeds, norm)
    plus    latents, proj_in, proj_out, norm_out,                   -> Resampler (diffusers' names:
            layers.N.0.{norm1, norm2, to_q, to_kv, to_out},            layers.N.{ln0, ln1, attn.to_q / to_k /
            layers.N.1.{0, 1, 3} (LayerNorm, Linear, GELU, Linear)     to_v / to_out.0, ff.0, ff.1.net.0.proj,
                                                                       ff.1.net.2})
Refused with one line: Full-face (proj.0 ... proj.3), FaceID (LoRA weights, perceiver_resampler) and
files in diffusers' converted names.

The image encoder is a transformers `CLIPVisionModelWithProjection` folder (config.json + model.safetensors
or pytorch_model.bin): `--image-encoder DIR`, else `image_encoder/` beside the IP-Adapter file (h94's
models/image_encoder), else the model folder's `image_encoder/` (a diffusers pipeline that holds one).
Its preprocessing is a `CLIPImageProcessor`: the encoder folder's preprocessor_config.json, else a
pipeline's `feature_extractor/` beside it or in the model folder, else diffusers' default (CLIP's
resize, centre crop and normalisation at the encoder's image size) -- one whose crop differs from the
encoder's image size is passed over.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ldmkit.adapters.ip_adapter import IPAdapter, IPAttnProcessor, ImageProjection, Resampler, cross_attention_layers
from ldmkit.errors import UserError, one_line, reading

_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_PLUS_KEY = re.compile(r"^layers\.(\d+)\.(0\.norm1|0\.norm2|0\.to_q|0\.to_kv|0\.to_out|1\.0|1\.1|1\.3)\.(weight|bias)$")
_PLUS_NAMES = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q", "0.to_out": "attn.to_out.0",
               "1.0": "ff.0", "1.1": "ff.1.net.0.proj", "1.3": "ff.1.net.2"}


def read_ip_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(image_proj tensors, ip_adapter tensors) of an h94 file, prefixes removed."""
    from ldmkit.io.adapter_files import read_tensors
    from ldmkit.io.files import load_torch_file

    path = Path(path)
    where = f"IP-Adapter {path}"
    if path.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt"):
        obj = load_torch_file(path, "IP-Adapter file")
        nested = isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("image_proj", "ip_adapter"))
        if nested:
            parts = obj["image_proj"], obj["ip_adapter"]
        elif isinstance(obj, dict):
            parts = _split(obj, where)
        else:
            raise UserError(f"{where} holds a {type(obj).__name__}, not the image_proj / ip_adapter weights")
    else:
        parts = _split(read_tensors(path, "IP-Adapter file")[0], where)
    for part in parts:
        for key, value in part.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or not torch.isfinite(value).all():
                raise UserError(f"{where}: {key!r} is not finite floating-point data")
    if not parts[0] or not parts[1]:
        missing = "image_proj" if not parts[0] else "ip_adapter"
        raise UserError(f"{where}: no {missing} weights (not an IP-Adapter file)")
    return parts


def _split(tensors: dict, where: str) -> tuple[dict, dict]:
    image_proj, layers, other = {}, {}, []
    for key, value in tensors.items():
        head, _, rest = str(key).partition(".")
        if head == "image_proj" and rest:
            image_proj[rest] = value
        elif head == "ip_adapter" and rest:
            layers[rest] = value
        else:
            other.append(key)
    if other:
        hint = " (a LoRA? use --lora)" if any("lora" in str(k) for k in other) else ""
        raise UserError(f"{where} is not an IP-Adapter file: {len(other)} keys are neither image_proj.* nor "
                        f"ip_adapter.* (e.g. {other[0]!r}){hint}")
    return image_proj, layers


def _image_projection(state: dict[str, torch.Tensor], where: str) -> tuple[torch.nn.Module, dict]:
    """The projection module for `state` (h94 names) and its tensors in the module's names."""
    if "proj.weight" in state and "norm.weight" in state:
        w, norm = state["proj.weight"], state["norm.weight"]
        if w.dim() != 2 or norm.dim() != 1 or w.shape[0] % norm.shape[0]:
            raise UserError(f"{where}: image_proj.proj.weight {tuple(w.shape)} is not a whole number of "
                            f"tokens of width {tuple(norm.shape)}")
        module = ImageProjection(w.shape[1], norm.shape[0], w.shape[0] // norm.shape[0])
        return module, {k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v
                        for k, v in state.items()}
    if "latents" in state:
        return _resampler(state, where)
    variant = ("IP-Adapter Full-face" if "proj.3.weight" in state else
               "IP-Adapter FaceID" if any(k.startswith("perceiver_resampler.") for k in state) or "norm.weight" in state
               else "an IP-Adapter in diffusers' converted names" if "image_embeds.weight" in state else None)
    if variant:
        raise UserError(f"{where} is {variant}, which ldmkit does not run (it runs the basic IP-Adapter and "
                        "IP-Adapter Plus in h94's layout)")
    raise UserError(f"{where}: image_proj holds neither proj.weight (IP-Adapter) nor latents (IP-Adapter Plus); "
                    f"keys: {sorted(state)[:4]}")


def _resampler(state: dict[str, torch.Tensor], where: str) -> tuple[torch.nn.Module, dict]:
    out, depth = {}, set()
    for key, value in state.items():
        m = _PLUS_KEY.match(key)
        if key in ("latents",) or key.split(".")[0] in ("proj_in", "proj_out", "norm_out"):
            out[key] = value
        elif m is None:
            raise UserError(f"{where}: image_proj.{key} is not part of an IP-Adapter Plus resampler")
        elif m.group(2) == "0.to_kv":
            k, v = value.chunk(2, dim=0)
            out[f"layers.{m.group(1)}.attn.to_k.{m.group(3)}"] = k
            out[f"layers.{m.group(1)}.attn.to_v.{m.group(3)}"] = v
            depth.add(int(m.group(1)))
        else:
            out[f"layers.{m.group(1)}.{_PLUS_NAMES[m.group(2)]}.{m.group(3)}"] = value
            depth.add(int(m.group(1)))
    try:
        latents, to_q = state["latents"], state["layers.0.0.to_q.weight"]
        ff = state["layers.0.1.1.weight"]
        embed_dim, out_dim = state["proj_in.weight"].shape[1], state["proj_out.weight"].shape[0]
    except (KeyError, IndexError) as exc:
        raise UserError(f"{where}: the IP-Adapter Plus resampler lacks {exc}") from None
    if latents.dim() != 3 or to_q.shape[0] % 64 or ff.shape[0] % latents.shape[2] or depth != set(range(len(depth))):
        raise UserError(f"{where}: the IP-Adapter Plus resampler's shapes do not fit together (latents "
                        f"{tuple(latents.shape)}, to_q {tuple(to_q.shape)}, layers {sorted(depth)})")
    module = Resampler(embed_dim, latents.shape[2], out_dim, len(depth), heads=to_q.shape[0] // 64,
                       num_tokens=latents.shape[1], dim_head=64, ff_mult=ff.shape[0] // latents.shape[2])
    return module, out


def read_ip_adapter(path: str | Path, dtype: torch.dtype = torch.float32) -> IPAdapter:
    """An h94 IP-Adapter file -> `IPAdapter` (float `dtype`, eval mode, scale 1)."""
    from ldmkit.io.files import check_state_dict

    where = f"IP-Adapter {path}"
    image_state, layer_state = read_ip_adapter_file(path)
    image_proj, state = _image_projection(image_state, where)
    try:
        check_state_dict(image_proj, state, f"{where}: image_proj")
    except ValueError as exc:
        raise UserError(one_line(str(exc))) from None
    image_proj.load_state_dict(state, strict=True)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in layer_state.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            what = "FaceID's LoRA weights" if "lora" in key else "not an image key / value projection"
            raise UserError(f"{where}: ip_adapter.{key} is {what}; ldmkit runs the basic IP-Adapter and "
                            "IP-Adapter Plus")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    layers = []
    for i in sorted(found):
        k, v = found[i].get("to_k_ip"), found[i].get("to_v_ip")
        if k is None or v is None or k.dim() != 2 or k.shape != v.shape:
            raise UserError(f"{where}: ip_adapter.{i} needs to_k_ip and to_v_ip weights of one 2-d shape")
        proc = IPAttnProcessor(k.shape[1], k.shape[0])
        proc.to_k_ip[0].weight.data.copy_(k)
        proc.to_v_ip[0].weight.data.copy_(v)
        layers.append(proc)
    if sorted(found) != list(range(1, 2 * len(found), 2)):
        raise UserError(f"{where}: ip_adapter layers are numbered {sorted(found)[:6]}...; expected 1, 3, 5, ... "
                        "(one per cross-attention layer)")
    return IPAdapter(image_proj, layers).to(dtype).eval()


def check_fits(adapter: IPAdapter, denoiser: torch.nn.Module, where: str) -> torch.nn.Module:
    """The UNet (inside `denoiser`) the adapter fits: one layer per cross-attention layer, each of its shape."""
    unet = denoiser.unet if isinstance(getattr(denoiser, "unet", None), torch.nn.Module) else denoiser
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise UserError(f"{where}: IP-Adapters run on UNet models; this model's denoiser is a {type(unet).__name__}")
    targets = cross_attention_layers(unet)
    if len(targets) != len(adapter.layers):
        raise UserError(f"{where}: the IP-Adapter has {len(adapter.layers)} cross-attention layers, this UNet "
                        f"{len(targets)}: an IP-Adapter for another base model (SD 1.x / 2.x: 16, SDXL: 70)")
    for k, ((path, attn), proc) in enumerate(zip(targets, adapter.layers)):
        theirs, ours = tuple(proc.to_k_ip[0].weight.shape), tuple(attn.to_k.weight.shape)
        if theirs != ours:
            raise UserError(f"{where}: ip_adapter.{2 * k + 1}.to_k_ip.weight is {theirs}, this UNet's {path} takes "
                            f"{ours}: an IP-Adapter for another base model")
    width = adapter.image_proj.norm.normalized_shape[0] if adapter.kind == "basic" else \
        adapter.image_proj.norm_out.normalized_shape[0]
    if width != targets[0][1].to_k.in_features:
        raise UserError(f"{where}: its image tokens are {width} wide, this UNet's context "
                        f"{targets[0][1].to_k.in_features}: an IP-Adapter for another base model")
    return unet


# --------------------------------------------------------------------------------------- image encoder
def image_encoder_folder(given, ip_file, model_path) -> Path:
    """The image encoder's folder: `given`, else image_encoder/ beside the IP-Adapter file, else the model's."""
    if given is not None:
        p = Path(given)
        if not p.is_dir():
            raise UserError(f"--image-encoder {p} " + ("is not a folder" if p.exists() else "does not exist"))
        return p
    candidates = [Path(ip_file).parent / "image_encoder"]
    if model_path is not None and Path(model_path).is_dir():
        candidates.append(Path(model_path) / "image_encoder")
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise UserError(f"IP-Adapter {ip_file} needs a CLIP image encoder: pass --image-encoder DIR (a transformers "
                    f"CLIPVisionModelWithProjection folder, e.g. h94/IP-Adapter's models/image_encoder); none in "
                    f"{', '.join(str(c) for c in candidates)}")


def read_image_encoder(folder: Path, model_path=None, device=None, dtype: torch.dtype = torch.float32):
    """(CLIPVisionModelWithProjection in eval mode, CLIPImageProcessor) of an encoder folder."""
    from transformers import CLIPVisionModelWithProjection

    from ldmkit.conditioning.text import quiet_loading
    from ldmkit.io.files import read_json

    where = f"image encoder {folder}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: no config.json (expected a transformers CLIPVisionModelWithProjection folder)")
    kind = read_json(folder / "config.json").get("model_type")
    if kind not in ("clip_vision_model", "clip"):
        raise UserError(f"{where}: config.json describes a {kind!r} model, not a CLIP vision model")
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((folder / n).is_file() for n in names):
        raise UserError(f"{where}: no weights (model.safetensors or pytorch_model.bin)")
    try:
        with reading(where), quiet_loading(), _quiet_transformers():
            encoder, info = CLIPVisionModelWithProjection.from_pretrained(
                str(folder), local_files_only=True, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"{where}: {one_line(str(exc), 300)}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise UserError(f"{where}: its weights lack {len(missing)} tensors of the model (e.g. {sorted(missing)[0]})")
    encoder = encoder.to(device).eval() if device is not None else encoder.eval()
    return encoder, image_processor(folder, encoder.config.image_size, model_path)


def image_processor(folder: Path, size: int, model_path=None):
    """The CLIPImageProcessor for an encoder of `size` px (see the module's docstring for the order)."""
    candidates = [folder, folder.parent / "feature_extractor"]
    if model_path is not None:
        candidates.append(Path(model_path) / "feature_extractor")
    with _quiet_transformers():
        from transformers import CLIPImageProcessor

        for c in candidates:
            if (c / "preprocessor_config.json").is_file():
                with reading(f"image processor {c}"):
                    proc = CLIPImageProcessor.from_pretrained(str(c), local_files_only=True)
                crop = getattr(proc, "crop_size", None) or {}
                if getattr(proc, "do_center_crop", False) and (crop.get("height"), crop.get("width")) == (size, size):
                    return proc
        return CLIPImageProcessor(size=size, crop_size=size)  # what diffusers makes for a pipeline without one


class _quiet_transformers:
    """transformers' logger at error level (it warns that CLIPImageProcessor falls back to PIL without torchvision)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)
        return False


def check_encoder_fits(adapter: IPAdapter, encoder, where: str) -> None:
    """The projection's input width must be what the encoder gives it (image_embeds, or hidden states for Plus)."""
    cfg = encoder.config
    give = cfg.hidden_size if adapter.kind == "plus" else cfg.projection_dim
    want = adapter.image_proj.input_width
    if give != want:
        what = "hidden states" if adapter.kind == "plus" else "image embeddings"
        raise UserError(f"{where}: the IP-Adapter takes {what} {want} wide, the image encoder gives {give} (an "
                        "encoder of another CLIP model: SD 1.5 IP-Adapters use ViT-H-14, h94's models/image_encoder)")


__all__ = ["check_encoder_fits", "check_fits", "image_encoder_folder", "read_image_encoder", "read_ip_adapter",
           "read_ip_adapter_file"]
