"""Generated bad-input fuzz for the `ldm` command: every case ends in exit code 2 and one line.

The project rule: bad input (corrupt or truncated files, JSON of the wrong shape, wrong sizes, huge
values, bad flags) gets a one-line `ldm CMD: error: ...` naming the value and the rule, exit code 2,
no traceback, and loses nothing (the input files are unchanged afterwards). Weights are read only
through safetensors or `torch.load(weights_only=True)`: a pickle payload never runs (the malicious
checkpoints below would create a marker file).

The cases are generated (see `all_cases`): corruptions x files x commands, JSON shapes x config
files, bad values x flags. Valid tiny models are built once per module (`world`) and every file case
works on its own hard-linked copy, whose corrupted files are written anew (never through a link).

`ldm train` and `ldm train-autoencoder` take their flags from the training configs; their cases
(`train_cases`, `train_autoencoder_cases`) cover every kind of field, the `--config` / `--resume` /
`--init-from` files and the run folder's rules.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipelines import make_autoencoder, make_unet  # noqa: E402

CASE_TIMEOUT_S = 60  # a bad input must fail fast; a hang fails the case instead of the suite
REPO = Path(__file__).resolve().parent.parent


# ============================================================================= the valid world
CAPTIONS = ["a red square", "a blue circle", "a green triangle on grey"]


def _index(conditioning, concat=None):
    from ldmkit.diffusion.schedules import make_schedule

    return {"schedule": make_schedule("sd15").to_dict(), "objective": "eps", "conditioning": conditioning,
            "concat": concat, "latent_size": [8, 8],
            "defaults": {"sampler": "ddim", "steps": 2, "guidance": 3.0}}


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _build_world(root: Path) -> Path:
    """Tiny valid models and inputs (a few seconds on one core)."""
    from ldmkit.conditioning import SpatialConditioner, TransformerTextEncoder
    from ldmkit.conditioning.spatial import SpatialConfig
    from ldmkit.io.format import save_model
    from ldmkit.metrics.classifier import PRESETS as CLF_PRESETS
    from ldmkit.metrics.classifier import FeatureClassifier, save_classifier

    torch.manual_seed(3)
    text = TransformerTextEncoder.from_captions(CAPTIONS, width=32, depth=1, heads=2, max_length=8)
    save_model(root / "text", {"autoencoder": make_autoencoder(), "denoiser": make_unet(), "conditioner": text},
               _index("text"))
    save_model(root / "upscale", {"autoencoder": make_autoencoder(), "denoiser": make_unet(in_channels=7, cross=None)},
               _index("none", "upscale"))
    save_model(root / "semantic", {"autoencoder": make_autoencoder(), "denoiser": make_unet(in_channels=8, cross=None),
                                   "spatial": SpatialConditioner(SpatialConfig("semantic", num_classes=4))},
               _index("none", "semantic"))
    torch.manual_seed(0)
    save_classifier(FeatureClassifier(CLF_PRESETS["shapes"]), root / "clf", dataset="shapes", accuracy=0.0)

    img = root / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    _png(img / "in.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    _png(img / "small.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    _png(img / "mask.png", mask)
    _png(img / "map.png", (np.arange(32 * 32).reshape(32, 32) % 4).astype(np.uint8))
    gen = root / "gen"  # a folder of "generated" images for `ldm eval --generated`
    gen.mkdir()
    for i in range(4):
        _png(gen / f"{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))

    # Stable Diffusion interop: a tiny diffusers folder and the same weights as an original single file
    import interop_models as im
    from safetensors.torch import save_file

    # a latent cache of 8 shapes images (captions) for `ldm train`, and an `ldm train` checkpoint
    from ldmkit.data.latents import encode_dataset
    from ldmkit.data.shapes import ShapesDataset

    encode_dataset(make_autoencoder(), ShapesDataset("train", size=32, length=8, seed=0), root / "lat",
                   progress=False)
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1}, root / "foreign.pt")

    pipe = im.build_pipeline("sd1", workdir=root / "work")
    pipe.save_pretrained(root / "sd1-diffusers")
    ckpt = im.to_original_checkpoint(pipe, "sd1")
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(root / "sd1.safetensors"))
    shutil.rmtree(root / "work")
    # a valid LoRA (kohya names) and embedding for the diffusers model
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{q}.lora_down.weight": torch.randn(2, 32), f"{q}.lora_up.weight": torch.randn(32, 2),
               f"{q}.alpha": torch.tensor(2.0)}, str(root / "lora.safetensors"))
    save_file({"emb_params": torch.randn(2, 128)}, str(root / "emb.safetensors"))
    # a ControlNet for the diffusers model (factor-2 hint embedder), and one of another base
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(root / "cn")
    ControlNetModel(block_out_channels=(32, 32, 64), cross_attention_dim=64, layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    conditioning_embedding_out_channels=(16, 32)).save_pretrained(root / "cn-other")
    # an IP-Adapter (h94's layout) for the diffusers model, its image encoder beside it
    from test_ip_adapter import basic_adapter, random_encoder

    random_encoder().save_pretrained(root / "ip" / "image_encoder")
    save_file(basic_adapter(pipe.unet), str(root / "ip" / "ip-adapter.safetensors"))
    # a tiny SDXL, its refiner, an SDXL LoRA (kohya names) and an SDXL ControlNet; the base as a single file
    xl = im.build_sdxl_pipeline(workdir=root / "work-xl")
    xl.save_pretrained(root / "sdxl")
    im.build_sdxl_pipeline(refiner=True, workdir=root / "work-xl").save_pretrained(root / "sdxl-refiner")
    save_file(im.to_original_sdxl(xl), str(root / "sdxl.safetensors"))
    shutil.rmtree(root / "work-xl")
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{q}.lora_down.weight": torch.randn(2, 128), f"{q}.lora_up.weight": torch.randn(128, 2),
               f"{q}.alpha": torch.tensor(2.0)}, str(root / "lora-xl.safetensors"))
    ControlNetModel.from_unet(xl.unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(root / "cn-xl")
    # a tiny SD3 and FLUX.1-schnell as diffusers folders and original single files (SD3: also without CLIP-G)
    sd3 = im.build_sd3_pipeline(single_file=True, workdir=root / "work-sd3")
    sd3.save_pretrained(root / "sd3")
    sd3_file = im.to_original_sd3(sd3)
    save_file(sd3_file, str(root / "sd3.safetensors"))
    save_file({k: v for k, v in sd3_file.items() if ".clip_g." not in k}, str(root / "sd3-no-clip-g.safetensors"))
    flux = im.build_flux_pipeline(dev=False, workdir=root / "work-sd3")
    flux.save_pretrained(root / "flux")
    save_file(im.to_original_flux(flux.transformer.state_dict()), str(root / "flux1.safetensors"))
    shutil.rmtree(root / "work-sd3")
    # control data for `ldm train --method controlnet`: 4 captioned images and their control images
    for i in range(4):
        for sub in ("images", "conditioning"):
            (root / "cdata" / sub).mkdir(parents=True, exist_ok=True)
            _png(root / "cdata" / sub / f"{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        (root / "cdata" / "images" / f"{i}.txt").write_text("a cat")
    return root


# ============================================================================= bad files
def _fresh(path: Path) -> Path:
    """Unlink `path` (it may be a hard link into the world) so what is written next is a new file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(path: Path, data: bytes) -> None:
    _fresh(path).write_bytes(data)


def _safetensors_parts(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(header, body: bytes = b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _tamper(raw: bytes, **entry) -> bytes:
    header, body = _safetensors_parts(raw)
    key = _first_tensor(header)
    header[key] = {**header[key], **entry}
    return _with_header(header, body)


# name -> bytes of a valid safetensors file -> bytes of a broken one
SAFETENSORS_CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "zero-byte": lambda raw: b"",
    "5-bytes": lambda raw: raw[:5],
    "truncated-half": lambda raw: raw[: len(raw) // 2],
    "truncated-header": lambda raw: raw[: 8 + struct.unpack("<Q", raw[:8])[0] // 2],
    "header-bomb-2^60": lambda raw: struct.pack("<Q", 2 ** 60) + raw[8:],
    "header-past-eof": lambda raw: struct.pack("<Q", len(raw) + 100) + raw[8:],
    "header-is-list": lambda raw: _with_header([1, 2, 3]),
    "header-garbage": lambda raw: _with_header(b"{garbage: ]"),
    "offsets-past-eof": lambda raw: _tamper(raw, data_offsets=[0, 10 ** 12]),
    "unknown-dtype": lambda raw: _tamper(raw, dtype="Z9"),
    "huge-shape": lambda raw: _tamper(raw, shape=[10 ** 6, 10 ** 6]),
    "text": lambda raw: b"this is not a safetensors file\n" * 3,
}


def corrupt_safetensors(path: Path, how: str) -> None:
    raw = path.read_bytes()
    _write(path, SAFETENSORS_CORRUPTIONS[how](raw))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _valid_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# name -> bytes of a broken image file
BAD_IMAGES: dict[str, Callable[[], bytes]] = {
    "truncated-png": lambda: _valid_png()[: len(_valid_png()) // 2],
    "bomb-png-60000x60000": bomb_png,
    "zero-byte": lambda: b"",
    "text-as-png": lambda: b"hello, not an image\n",
    "png-signature-only": lambda: b"\x89PNG\r\n\x1a\n",
    "bad-crc": lambda: _valid_png()[:20] + b"\x00\x00\x00\x00" + _valid_png()[24:],
}


class _OsSystem:
    """Pickles as os.system(cmd): unpickling it would run the command."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Open:
    """Pickles as open(path, "w"): unpickling it would create the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


MARKER = "PWNED"
UNET_WEIGHTS = "diffusion_pytorch_model"


def malicious_pickle(path: Path, style: str) -> None:
    """A checkpoint whose unpickling would create {folder}/PWNED."""
    marker = str(path.parent / MARKER)
    if style == "torch-zip-system":
        _fresh(path)
        torch.save({"state_dict": {"x": _OsSystem(f"touch {marker}")}}, path)
    elif style == "torch-zip-open":
        _fresh(path)
        torch.save(_Open(marker), path)
    else:  # a plain pickle stream (torch's legacy format)
        _write(path, pickle.dumps({"state_dict": _OsSystem(f"touch {marker}")}, protocol=2))


def weights_only_but_not_a_state_dict(path: Path, value) -> None:
    _fresh(path)
    torch.save(value, path)


# ============================================================================= cases
W, T = "{w}", "{t}"  # placeholders: the world root, the case's own folder


@dataclass(frozen=True)
class Case:
    cid: str
    argv: tuple
    setup: tuple = ()  # callables (world, tmp) -> None that make the case's bad inputs under tmp
    marker: bool = False  # a malicious pickle is involved: its marker file must never appear


def _copy(rel: str, name: str | None = None):
    """Setup step: a hard-linked copy of world/rel at tmp/name."""
    def run(world: Path, tmp: Path) -> None:
        src, dst = world / rel, tmp / (name or Path(rel).name)
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=os.link)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    run.__name__ = f"copy({rel})"
    return run


def _step(fn: Callable[[Path], None], rel: str):
    """Setup step: fn(tmp/rel)."""
    def run(world: Path, tmp: Path) -> None:
        fn(tmp / rel)
    return run


def _json_file(rel: str, value):
    return _step(lambda p: _write(p, json.dumps(value).encode()), rel)


def _patch_json(rel: str, path: tuple, value, delete: bool = False):
    """Setup step: set (or delete) one field inside a JSON file of the copy."""
    def patch(p: Path) -> None:
        data = json.loads(p.read_text())
        node = data
        for k in path[:-1]:
            node = node[k]
        if delete:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
        _write(p, json.dumps(data).encode())
    return _step(patch, rel)


def _bytes_file(rel: str, data: bytes):
    return _step(lambda p: _write(p, data), rel)


def _dir(rel: str):
    return _step(lambda p: _fresh(p).mkdir(), rel)


def _safe(value) -> str:
    text = repr(value)
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)[:40]


GEN_OUT = ("--out", f"{T}/out", "--no-progress")


def _gen(command: str, model: str, *extra, prompt: bool = True) -> tuple:
    """argv of a generation command (sample / img2img / inpaint / upscale / semantic)."""
    inputs = {"img2img": ("--image", f"{W}/img/in.png"),
              "inpaint": ("--image", f"{W}/img/in.png", "--mask", f"{W}/img/mask.png"),
              "upscale": ("--image", f"{W}/img/small.png"),
              "semantic": ("--map", f"{W}/img/map.png")}.get(command, ())
    p = ("--prompt", "a red square") if prompt else ()
    return (command, "--model", model, *p, *inputs, *extra, *GEN_OUT)


GEN_MODELS = {"sample": f"{W}/text", "img2img": f"{W}/text", "inpaint": f"{W}/text",
              "upscale": f"{W}/upscale", "semantic": f"{W}/semantic"}


# ----------------------------------------------------------------------------- weights files
def weights_cases() -> list[Case]:
    out = []
    targets = [  # (label, folder to copy, weights file inside it, argv with {m} = the copy)
        ("ldmkit-autoencoder", "text", "autoencoder/model.safetensors",
         lambda m: _gen("sample", m)),
        ("ldmkit-denoiser", "text", "denoiser/model.safetensors", lambda m: _gen("sample", m)),
        ("ldmkit-conditioner", "text", "conditioner/model.safetensors", lambda m: _gen("sample", m)),
        ("diffusers-unet", "sd1-diffusers", "unet/diffusion_pytorch_model.safetensors",
         lambda m: _gen("sample", m)),
        ("diffusers-vae", "sd1-diffusers", "vae/diffusion_pytorch_model.safetensors",
         lambda m: ("convert", "--from", m, "--to", f"{T}/out")),
        ("diffusers-text", "sd1-diffusers", "text_encoder/model.safetensors",
         lambda m: _gen("img2img", m)),
        ("single-file", "sd1.safetensors", "",
         lambda m: ("convert", "--from", m, "--to", f"{T}/out", "--tokenizer", f"{W}/sd1-diffusers/tokenizer")),
    ]
    for label, folder, rel, argv in targets:
        for how in SAFETENSORS_CORRUPTIONS:
            name = Path(folder).name
            weights = f"{name}/{rel}" if rel else name
            out.append(Case(f"weights-{label}-{how}", argv(f"{T}/{name}"),
                            (_copy(folder), _step(functools.partial(corrupt_safetensors, how=how), weights))))
    # the autoencoder component read by ae-stats / eval-autoencoder / cache-latents
    for how in ("zero-byte", "truncated-half", "header-bomb-2^60", "header-garbage", "huge-shape"):
        setup = (_copy("text/autoencoder", "ae"), _step(functools.partial(corrupt_safetensors, how=how),
                                                         "ae/model.safetensors"))
        out += [
            Case(f"weights-ae-stats-{how}", ("ae-stats", "--model", f"{T}/ae", "--data", "shapes",
                                             "--num-samples", "2"), setup),
            Case(f"weights-eval-ae-{how}", ("eval-autoencoder", "--model", f"{T}/ae", "--data", "shapes",
                                            "--no-lpips", "--num-images", "2"), setup),
            Case(f"weights-cache-latents-{how}", ("cache-latents", "--autoencoder", f"{T}/ae", "--data", "shapes",
                                                  "--length", "2", "--out", f"{T}/cache"), setup),
            Case(f"weights-classifier-{how}", ("eval", "--generated", f"{W}/gen", "--reference", f"{W}/gen",
                                               "--features", f"{T}/clf"),
                 (_copy("clf"), _step(functools.partial(corrupt_safetensors, how=how), "clf/model.safetensors"))),
        ]
    return out


# ----------------------------------------------------------------------------- JSON of the wrong shape
NOT_OBJECTS = {"list": [1, 2], "null": None, "number": 42, "string": "model"}


def ldmkit_json_cases() -> list[Case]:
    out = []
    run = _gen("sample", f"{T}/text")
    for label, value in NOT_OBJECTS.items():
        out.append(Case(f"ldmkit-index-is-{label}", run, (_copy("text"), _json_file("text/model_index.json", value))))
        for comp in ("autoencoder", "denoiser", "conditioner"):
            out.append(Case(f"ldmkit-{comp}-config.json-is-{label}", run,
                            (_copy("text"), _json_file(f"text/{comp}/config.json", value))))
    index_fields = [
        ("components", 5), ("components", ["../../etc"]), ("components", [["x"]]), ("schedule", "sd15"),
        ("schedule", {"num_train_timesteps": 10 ** 12}), ("schedule", {"beta_start": "x"}),
        ("schedule", {"beta_schedule": ["linear"]}), ("schedule", {"num_train_timesteps": -5}),
        ("latent_size", "ab"), ("latent_size", [-1, -1]), ("latent_size", [10 ** 6, 10 ** 6]),
        ("latent_size", [8.5, 8]), ("defaults", []), ("defaults", {"steps": "x"}), ("defaults", {"height": -5}),
        ("defaults", {"guidance": "high"}), ("defaults", {"sampler": 7}), ("concat", 5), ("conditioning", ["text"]),
        ("objective", 3),
    ]
    for key, value in index_fields:
        out.append(Case(f"ldmkit-index-{key}-{_safe(value)}", run,
                        (_copy("text"), _patch_json("text/model_index.json", (key,), value))))
    component_shapes = [("type-missing", None), ("type-list", {"type": ["unet"], "config": {}}),
                        ("type-unknown", {"type": "nope", "config": {}}), ("config-list", "CONFIG-LIST"),
                        ("config-missing", "CONFIG-MISSING"), ("unknown-key", "UNKNOWN-KEY")]
    for comp in ("autoencoder", "denoiser", "conditioner"):
        rel = f"text/{comp}/config.json"
        for label, value in component_shapes:
            if value == "CONFIG-LIST":
                step = _patch_json(rel, ("config",), [1, 2])
            elif value == "CONFIG-MISSING":
                step = _patch_json(rel, ("config",), None, delete=True)
            elif value == "UNKNOWN-KEY":
                step = _patch_json(rel, ("config", "bogus_field"), 1)
            elif value is None:
                step = _patch_json(rel, ("type",), None, delete=True)
            else:
                step = _json_file(rel, value)
            out.append(Case(f"ldmkit-{comp}-{label}", run, (_copy("text"), step)))
    return out


BAD_INTS = {"negative": -4, "zero": 0, "huge": 2 ** 40, "string": "abc", "float": 2.5, "bool": True,
            "list": [4]}


def config_field_cases() -> list[Case]:
    out = []
    run = _gen("sample", f"{T}/text")
    fields = {
        "autoencoder": [("in_channels", BAD_INTS), ("out_channels", ("negative", "huge", "string")),
                        ("channels", BAD_INTS), ("latent_channels", ("negative", "zero", "huge", "float")),
                        ("num_res_blocks", ("negative", "huge", "string")), ("norm_groups", ("zero", "negative")),
                        ("ch_mult", {"huge": [1, 2 ** 30], "string": "abc", "empty": [], "negative": [1, -2]}),
                        ("num_codes", ("negative", "huge")), ("sample_size", ("negative", "string")),
                        ("scaling_factor", {"string": "x", "negative": -1.0, "nan": "NaN-JSON"}),
                        ("kind", {"number": 3, "list": ["kl"]})],
        "denoiser": [("in_channels", BAD_INTS), ("out_channels", ("negative", "huge")),
                     ("block_out_channels", {"huge": [2 ** 20, 2 ** 20], "string": "abc", "empty": [],
                                             "negative": [-32, 64], "float": [32.5, 64]}),
                     ("layers_per_block", ("negative", "huge", "string")),
                     ("attention_head_dim", ("zero", "negative", "string")),
                     ("cross_attention_dim", ("zero", "negative", "huge", "string")),
                     ("norm_num_groups", ("zero", "negative", "string")),
                     ("num_class_embeds", ("negative", "huge")), ("sample_size", ("negative", "string")),
                     ("transformer_layers_per_block", ("zero", "huge")),
                     ("context_adapter_layers", ("huge", "string")), ("down_block_types", {"number": 5}),
                     ("dropout", {"string": "x", "negative": -0.5})],
        "conditioner": [("vocab_size", ("negative", "huge", "string")), ("max_length", ("huge", "zero", "string")),
                        ("width", ("zero", "huge", "negative")), ("depth", ("huge", "negative")),
                        ("heads", ("zero", "negative", "string"))],
    }
    for comp, entries in fields.items():
        for field, values in entries:
            items = values.items() if isinstance(values, dict) else ((v, BAD_INTS[v]) for v in values)
            for label, value in items:
                rel = f"text/{comp}/config.json"
                if value == "NaN-JSON":  # Python's json writes NaN; a JSON reader may get one
                    step = _step(lambda p, f=field: _write(p, json.dumps(
                        {**json.loads(p.read_text()), "config": {**json.loads(p.read_text())["config"],
                                                                  f: float("nan")}}).encode()), rel)
                else:
                    step = _patch_json(rel, ("config", field), value)
                out.append(Case(f"config-{comp}-{field}-{label}", run, (_copy("text"), step)))
    # a DiT denoiser config with bad values (the DiT is built from config.json before any weights are read)
    from ldmkit.denoisers.dit import PRESETS as DIT_PRESETS

    base = dataclasses.asdict(DIT_PRESETS["tiny-text"])
    dit_bad = [("hidden_size", 0), ("hidden_size", -64), ("hidden_size", 2 ** 40), ("depth", 10 ** 6),
               ("depth", "deep"), ("num_heads", 0), ("num_heads", -4), ("patch_size", 0), ("patch_size", "x"),
               ("in_channels", -1), ("in_channels", 2 ** 40), ("mlp_ratio", 1e9), ("mlp_ratio", -1.0),
               ("cross_attention_dim", -1), ("num_classes", 2 ** 40), ("sample_size", -2), ("sample_size", None)]
    for field, value in dit_bad:
        cfg = {**base, field: value}
        out.append(Case(f"config-dit-{field}-{_safe(value)}", run,
                        (_copy("text"), _json_file("text/denoiser/config.json", {"type": "dit", "config": cfg}))))
    # class and spatial conditioners
    spatial = [("num_classes", -1), ("num_classes", 2 ** 40), ("latent_channels", "x"), ("latent_size", [10 ** 9, 8]),
               ("kind", 5)]
    for field, value in spatial:
        out.append(Case(f"config-spatial-{field}-{_safe(value)}", _gen("semantic", f"{T}/semantic", prompt=False),
                        (_copy("semantic"), _patch_json("semantic/spatial/config.json", ("config", field), value))))
    klass = [("num_classes", 2 ** 40), ("num_classes", "ten"), ("context_dim", -1), ("context_dim", 2 ** 40),
             ("class_names", 5)]
    for field, value in klass:
        cfg = {"type": "class", "config": {"num_classes": 3, "context_dim": None, "class_names": ["a", "b", "c"],
                                           field: value}}
        out.append(Case(f"config-class-{field}-{_safe(value)}", run,
                        (_copy("text"), _json_file("text/conditioner/config.json", cfg))))
    # the text encoder's tokenizer.json
    tokenizers = {"garbage": b"{garbage", "list": b"[1, 2]", "empty-object": b"{}", "not-utf8": b"\xff\xfe\xfa",
                  "zero-byte": b"", "wrong-model": json.dumps({"model": {"type": "Nope"}}).encode()}
    for label, data in tokenizers.items():
        out.append(Case(f"tokenizer-json-{label}", run,
                        (_copy("text"), _bytes_file("text/conditioner/tokenizer.json", data))))
    return out


def diffusers_json_cases() -> list[Case]:
    out = []
    m = f"{T}/sd1-diffusers"
    run = _gen("sample", m)
    files = {
        "model_index.json": [*NOT_OBJECTS.items(), ("class-number", {"_class_name": 5}),
                             ("class-list", {"_class_name": ["x"]}), ("ldmkit-list", {"_ldmkit": [1]}),
                             ("ldmkit-defaults-list", {"_ldmkit": {"defaults": [1]}}),
                             ("ldmkit-clip-skip", {"_ldmkit": {"conditioner": {"clip_skip": "x"}}}),
                             ("ldmkit-latent-size", {"_ldmkit": {"latent_size": "ab"}}),
                             ("ldmkit-max-length", {"_ldmkit": {"conditioner": {"max_length": 10 ** 9}}})],
        "unet/config.json": [*NOT_OBJECTS.items(), ("block_out_channels", "abc"), ("layers_per_block", "two"),
                             ("in_channels", -1), ("in_channels", 2 ** 40), ("attention_head_dim", 0),
                             ("cross_attention_dim", "x"), ("norm_num_groups", 0), ("down_block_types", 5),
                             ("block_out_channels", [2 ** 20] * 3), ("sample_size", "x")],
        "vae/config.json": [*NOT_OBJECTS.items(), ("block_out_channels", "abc"), ("block_out_channels", [0]),
                            ("block_out_channels", []), ("latent_channels", -1), ("latent_channels", "x"),
                            ("scaling_factor", "x"), ("layers_per_block", 2 ** 40), ("norm_num_groups", 0),
                            ("in_channels", 2 ** 40), ("down_block_types", 5)],
        "scheduler/scheduler_config.json": [*NOT_OBJECTS.items(), ("num_train_timesteps", "abc"),
                                            ("num_train_timesteps", None), ("num_train_timesteps", -5),
                                            ("num_train_timesteps", 10 ** 12), ("beta_start", "x"), ("beta_end", 5),
                                            ("beta_schedule", 5), ("beta_schedule", ["linear"]),
                                            ("prediction_type", 7), ("steps_offset", "x"), ("timestep_spacing", 3),
                                            ("_class_name", 5), ("_class_name", ["x"]), ("clip_sample_range", "x")],
        "text_encoder/config.json": [*NOT_OBJECTS.items(), ("hidden_size", -1), ("hidden_size", "x"),
                                     ("vocab_size", 2 ** 40), ("num_hidden_layers", 10 ** 6),
                                     ("max_position_embeddings", -1), ("intermediate_size", 2 ** 40),
                                     ("num_attention_heads", 0), ("model_type", 5)],
    }
    for rel, variants in files.items():
        short = rel.split("/")[0].replace("_config.json", "").replace(".json", "")
        for key, value in variants:
            if key in NOT_OBJECTS or (rel == "model_index.json" and isinstance(value, dict)):
                step = _json_file(f"sd1-diffusers/{rel}", value)
            else:
                step = _patch_json(f"sd1-diffusers/{rel}", (key,), value)
            out.append(Case(f"diffusers-{short}-{key}-{_safe(value)}", run, (_copy("sd1-diffusers"), step)))
    # the UNet's sample_size set to null: accepted (see test_null_sample_size_is_accepted); with a bad flag the
    # error is still one line
    out.append(Case("diffusers-unet-sample_size-null-and-bad-height", _gen("sample", m, "--height", "31"),
                    (_copy("sd1-diffusers"), _patch_json("sd1-diffusers/unet/config.json", ("sample_size",), None))))
    tok = "sd1-diffusers/tokenizer"
    tokenizer_files = [("tokenizer.json", b"{garbage"), ("tokenizer.json", b"[1, 2]"), ("tokenizer.json", b"\xff\xfe"),
                       ("tokenizer.json", b""), ("tokenizer.json", b"{}"),
                       ("tokenizer.json", json.dumps({"model": {"type": "Nope"}}).encode()),
                       ("tokenizer_config.json", b"[1]"),
                       ("tokenizer_config.json", b"{garbage"),
                       ("tokenizer_config.json", json.dumps({"model_max_length": "x"}).encode()),
                       ("special_tokens_map.json", b"null")]
    for name, data in tokenizer_files:
        out.append(Case(f"diffusers-tokenizer-{name}-{_safe(data)}", run,
                        (_copy("sd1-diffusers"), _bytes_file(f"{tok}/{name}", data))))
    return out


# ----------------------------------------------------------------------------- single files and pickles
def pickle_cases() -> list[Case]:
    out = []
    tok = ("--tokenizer", f"{W}/sd1-diffusers/tokenizer")
    for suffix in (".ckpt", ".pt", ".bin"):
        for style in ("torch-zip-system", "torch-zip-open", "plain-pickle"):
            f = f"model{suffix}"
            out.append(Case(f"pickle-convert-{style}{suffix}",
                            ("convert", "--from", f"{T}/{f}", "--to", f"{T}/out", *tok),
                            (_step(functools.partial(malicious_pickle, style=style), f),), marker=True))
    eval_ae = ("eval-autoencoder", "--model", f"{W}/text/autoencoder", "--data", "shapes", "--num-images", "2")
    for style in ("torch-zip-system", "torch-zip-open", "plain-pickle"):
        out.append(Case(f"pickle-vgg-weights-{style}", (*eval_ae, "--vgg-weights", f"{T}/vgg.pth"),
                        (_step(functools.partial(malicious_pickle, style=style), "vgg.pth"),), marker=True))
        out.append(Case(f"pickle-inception-{style}",
                        ("eval", "--generated", f"{W}/gen", "--reference", f"{W}/gen", "--features",
                         f"inception:{T}/inception.pth"),
                        (_step(functools.partial(malicious_pickle, style=style), "inception.pth"),), marker=True))
        out.append(Case(f"pickle-sample-{style}", _gen("sample", f"{T}/x.ckpt", *tok),
                        (_step(functools.partial(malicious_pickle, style=style), "x.ckpt"),), marker=True))
        out.append(Case(f"pickle-diffusers-bin-{style}", _gen("sample", f"{T}/sd1-diffusers"),
                        (_copy("sd1-diffusers"), _step(_fresh, f"sd1-diffusers/unet/{UNET_WEIGHTS}.safetensors"),
                         _step(functools.partial(malicious_pickle, style=style),
                               f"sd1-diffusers/unet/{UNET_WEIGHTS}.bin")), marker=True))
    odd = {"list": [1, 2, 3], "string": "weights", "state-dict-number": {"state_dict": 5},
           "tensor": torch.zeros(3), "empty-dict": {}}
    for label, value in odd.items():
        out.append(Case(f"weights-only-convert-{label}", ("convert", "--from", f"{T}/m.ckpt", "--to", f"{T}/out", *tok),
                        (_step(functools.partial(weights_only_but_not_a_state_dict, value=value), "m.ckpt"),)))
        out.append(Case(f"weights-only-vgg-{label}", (*eval_ae, "--vgg-weights", f"{T}/vgg.pth"),
                        (_step(functools.partial(weights_only_but_not_a_state_dict, value=value), "vgg.pth"),)))
        out.append(Case(f"weights-only-inception-{label}",
                        ("eval", "--generated", f"{W}/gen", "--reference", f"{W}/gen", "--features",
                         f"inception:{T}/inc.pth"),
                        (_step(functools.partial(weights_only_but_not_a_state_dict, value=value), "inc.pth"),)))
    for label, data in {"zero-byte": b"", "text": b"not a checkpoint", "truncated-zip": "TRUNC"}.items():
        def make(p: Path, data=data):
            if data == "TRUNC":
                buf = io.BytesIO()
                torch.save({"a": torch.zeros(100)}, buf)
                _write(p, buf.getvalue()[:300])
            else:
                _write(p, data)
        out.append(Case(f"ckpt-convert-{label}", ("convert", "--from", f"{T}/m.ckpt", "--to", f"{T}/out", *tok),
                        (_step(make, "m.ckpt"),)))
        out.append(Case(f"ckpt-vgg-{label}", (*eval_ae, "--vgg-weights", f"{T}/vgg.pth"), (_step(make, "vgg.pth"),)))
    # safetensors single files that are not Stable Diffusion checkpoints
    from safetensors.torch import save_file

    unet_only = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    for label, tensors in {"no-tensors": {}, "unrelated": {"x": torch.zeros(2)}, "unet-only": unet_only}.items():
        out.append(Case(f"single-file-{label}", ("convert", "--from", f"{T}/m.safetensors", "--to", f"{T}/out", *tok),
                        (_step(lambda p, t=tensors: (_fresh(p), save_file(t, str(p))), "m.safetensors"),)))
    return out


def single_file_option_cases() -> list[Case]:
    base = ("convert", "--from", f"{W}/sd1.safetensors", "--to", f"{T}/out")
    tok = ("--tokenizer", f"{W}/sd1-diffusers/tokenizer")
    out = []
    for flag, values in (("--num-heads", ("0", "-1", "1000000000", "3")),
                         ("--num-head-channels", ("0", "-8", "7", "1000000000"))):
        for v in values:
            out.append(Case(f"convert{flag}={v}", (*base, *tok, flag, v)))
    yaml_files = {"garbage": b"model: [unclosed\n  - x: {", "list": b"- 1\n- 2\n", "not-utf8": b"\xff\xfe\xfa",
                  "params-list": b"model:\n  params: [1, 2]\n", "scalar": b"42\n",
                  "bad-scale": b"model:\n  params:\n    scale_factor: abc\n",
                  "bad-timesteps": b"model:\n  params:\n    linear_start: 0.1\n    linear_end: 0.2\n    timesteps: x\n"}
    for label, data in yaml_files.items():
        out.append(Case(f"convert-original-config-{label}", (*base, *tok, "--original-config", f"{T}/c.yaml"),
                        (_bytes_file("c.yaml", data),)))
    out.append(Case("convert-original-config-missing", (*base, *tok, "--original-config", f"{T}/missing.yaml")))
    out.append(Case("convert-original-config-dir", (*base, *tok, "--original-config", f"{T}/d"), (_dir("d"),)))
    for label, step in {"missing": None, "a-file": _bytes_file("tok", b"x"), "empty-dir": _dir("tok"),
                        "garbage-vocab": _bytes_file("tok/vocab.json", b"{garbage"),
                        "list-vocab": _bytes_file("tok/vocab.json", b"[1]")}.items():
        setup = (step,) if step else ()
        if label.endswith("vocab"):
            setup = (step, _bytes_file("tok/merges.txt", b"#version: 0.2\na b\n"))
        out.append(Case(f"convert-tokenizer-{label}", (*base, "--tokenizer", f"{T}/tok"), setup))
    return out


# ----------------------------------------------------------------------------- images
def image_cases() -> list[Case]:
    out = []
    slots = [("img2img", "--image"), ("inpaint", "--image"), ("inpaint", "--mask"), ("upscale", "--image"),
             ("semantic", "--map")]
    for command, flag in slots:
        for label in BAD_IMAGES:
            argv = list(_gen(command, GEN_MODELS[command], prompt=command in ("img2img", "inpaint")))
            argv[argv.index(flag) + 1] = f"{T}/bad.png"
            out.append(Case(f"image-{command}{flag}-{label}", tuple(argv),
                            (_bytes_file("bad.png", BAD_IMAGES[label]()),)))
        for label, setup in (("missing", ()), ("directory", (_dir("bad.png"),))):
            argv = list(_gen(command, GEN_MODELS[command], prompt=command in ("img2img", "inpaint")))
            argv[argv.index(flag) + 1] = f"{T}/bad.png"
            out.append(Case(f"image-{command}{flag}-{label}", tuple(argv), setup))
    # images in folders read by `ldm eval --generated` / image-folder data sets
    for label in ("truncated-png", "bomb-png-60000x60000", "zero-byte"):
        setup = (_copy("gen"), _bytes_file("gen/bad.png", BAD_IMAGES[label]()))
        out.append(Case(f"image-eval-generated-{label}", ("eval", "--generated", f"{T}/gen", "--reference",
                                                          f"{W}/gen", "--features", f"{W}/clf"), setup))
    out.append(Case("image-semantic-colour-map", _gen("semantic", f"{W}/semantic", prompt=False)[:-3]
                    + ("--map", f"{W}/img/in.png") + GEN_OUT))
    out.append(Case("image-upscale-huge-input", _gen("upscale", f"{W}/upscale", prompt=False)[:-3]
                    + ("--image", f"{T}/big.png") + GEN_OUT,
                    (_step(lambda p: (_fresh(p), Image.new("RGB", (4200, 4200)).save(p)), "big.png"),)))
    return out


# ----------------------------------------------------------------------------- flags
NUM_FLAGS = {  # flag -> bad values, for every generation command
    "--num": ("0", "-1", "1000000000000", "100001", "abc"),
    "--steps": ("0", "-3", "1000000000", "1.5"),
    "--guidance": ("nan", "inf", "-inf", "-1", "x"),
    "--guidance-rescale": ("nan", "-0.5", "2"),
    "--seed": (str(2 ** 64), str(-(2 ** 63) - 1), str(10 ** 30), "one"),
    "--batch-size": ("0", "-2"),
    "--max-model-batch": ("0", "-1"),
    "--decode-batch": ("0", "-1"),
    "--vae-tile": ("-1", "2"),
    "--device": ("tpu:x", "cuda:99", "", "cpu:-1"),
    "--dtype": ("float8", ""),
    "--sampler": ("dpm_fast", ""),  # ("plms" is A1111's PLMS: pndm)
    "--prediction-type": ("x",),
}
SIZE_VALUES = ("0", "-8", "30", "1000000000", str(2 ** 31), "40000")


def generation_flag_cases() -> list[Case]:
    out = []
    for command, model in GEN_MODELS.items():
        full = command == "sample"  # every value for sample, the first two of each flag elsewhere
        prompt = command in ("sample", "img2img", "inpaint")
        for flag, values in NUM_FLAGS.items():
            for v in values if full else values[:2]:
                out.append(Case(f"flag-{command}{flag}={v}", _gen(command, model, flag, v, prompt=prompt)))
        if command in ("sample", "img2img", "inpaint"):
            for v in SIZE_VALUES if full else SIZE_VALUES[:3]:
                for flags in (("--height", v), ("--width", v)):
                    out.append(Case(f"flag-{command}{flags[0]}={v}", _gen(command, model, *flags, prompt=prompt)))
            out.append(Case(f"flag-{command}-40000x40000",
                            _gen(command, model, "--width", "40000", "--height", "40000", prompt=prompt)))
            out.append(Case(f"flag-{command}-16384x16384-num-1000",
                            _gen(command, model, "--width", "16384", "--height", "16384", "--num", "1000",
                                 "--batch-size", "1000", prompt=prompt)))
        if command in ("img2img", "inpaint"):
            for v in ("nan", "inf", "-0.1", "1.5", "x"):
                out.append(Case(f"flag-{command}--strength={v}", _gen(command, model, "--strength", v)))
        if command == "upscale":
            for v in ("-1", "1000000000", "x"):
                out.append(Case(f"flag-upscale--noise-level={v}", _gen(command, model, "--noise-level", v,
                                                                        prompt=False)))
        # prompts
        if prompt:
            out.append(Case(f"prompt-{command}-surrogate", _gen(command, model, prompt=False)[:-3]
                            + ("--prompt", "a \udcff square") + GEN_OUT))
            out.append(Case(f"prompt-{command}-negative-surrogate",
                            _gen(command, model, "--negative-prompt", "x\udc80")))
        pf = [("missing", ()), ("directory", (_dir("p.txt"),)),
              ("not-utf8", (_bytes_file("p.txt", b"a red \xff\xfe\n"),)),
              ("empty", (_bytes_file("p.txt", b"\n \n"),)), ("zero-byte", (_bytes_file("p.txt", b""),))]
        for label, setup in pf if full or command == "img2img" else pf[:1]:
            out.append(Case(f"prompts-file-{command}-{label}",
                            _gen(command, model, prompt=False)[:-3] + ("--prompts-file", f"{T}/p.txt") + GEN_OUT,
                            setup))
        out.append(Case(f"prompts-file-and-prompt-{command}", _gen(command, model, "--prompts-file", f"{T}/p.txt"),
                        (_bytes_file("p.txt", b"a red square\n"),)))
        # the model path
        for label, path, setup in (("missing", f"{T}/nowhere", ()), ("png-file", f"{W}/img/in.png", ()),
                                   ("empty-dir", f"{T}/empty", (_dir("empty"),)),
                                   ("txt-file", f"{T}/m.txt", (_bytes_file("m.txt", b"x"),)),
                                   ("zero-byte-safetensors", f"{T}/m.safetensors",
                                    (_bytes_file("m.safetensors", b""),)),
                                   ("component-folder", f"{W}/text/denoiser", ())):
            if full or label in ("missing", "zero-byte-safetensors"):
                out.append(Case(f"model-{command}-{label}", _gen(command, path, prompt=prompt), setup))
        # the output path
        out.append(Case(f"out-{command}-under-a-file", _gen(command, model, prompt=prompt)[:-3]
                        + ("--out", f"{T}/file.txt/out.png", "--no-progress"), (_bytes_file("file.txt", b"x"),)))
    # the wrong kind of model for the task / condition
    out += [Case("task-sample-semantic-model", _gen("sample", f"{W}/semantic", prompt=False)),
            Case("task-img2img-upscale-model", _gen("img2img", f"{W}/upscale", prompt=False)),
            Case("task-sample-class-on-text", _gen("sample", f"{W}/text", "--class", "3", prompt=False)),
            Case("task-semantic-prompt-on-uncond", _gen("semantic", f"{W}/semantic", "--prompt", "x", prompt=False))]
    return out


def cache_latents_cases() -> list[Case]:
    ae = f"{W}/text/autoencoder"

    def run(*extra, autoencoder=ae, data="shapes"):
        return ("cache-latents", "--autoencoder", autoencoder, "--data", data, "--length", "2",
                "--out", f"{T}/cache", *extra)
    out = []
    for flag, values in {"--size": ("0", "7", "-1", "1000000000", "30", "x"), "--length": ("0", "-1", "1000000000000"),
                         "--batch-size": ("0", "-1"), "--device": ("tpu:x", "cuda:99"),
                         "--dtype": ("float8",)}.items():
        for v in values:
            out.append(Case(f"cache-latents{flag}={v}", run(flag, v)))
    for label, data, setup in (("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()),
                               ("empty-dir", f"{T}/e", (_dir("e"),)),
                               ("only-bad-images", f"{T}/b", (_bytes_file("b/x.png", b"xx"),
                                                              _bytes_file("b/y.png", bomb_png()))),
                               ("fashion-mnist-64", "fashion-mnist", ())):
        extra = ("--size", "64") if label == "fashion-mnist-64" else ()
        out.append(Case(f"cache-latents-data-{label}", run(*extra, data=data), setup))
    for label, path, setup in (("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()),
                               ("model-folder", f"{W}/text", ()), ("denoiser", f"{W}/text/denoiser", ()),
                               ("empty-dir", f"{T}/e", (_dir("e"),))):
        out.append(Case(f"cache-latents-autoencoder-{label}", run(autoencoder=path), setup))
    out.append(Case("cache-latents-out-is-a-file", ("cache-latents", "--autoencoder", ae, "--data", "shapes",
                                                    "--length", "2", "--out", f"{T}/f"), (_bytes_file("f", b"x"),)))
    out.append(Case("cache-latents-segmentation-on-folder", run("--segmentation", data=f"{W}/gen")))
    return out


def eval_cases() -> list[Case]:
    def run(*extra, features=f"{W}/clf", source=("--generated", f"{W}/gen"), reference=f"{W}/gen"):
        return ("eval", *source, "--reference", reference, "--features", features, *extra)
    out = []
    for flag, values in {"--num-reference": ("0", "-1"), "--batch-size": ("0", "-5"), "--kid-subsets": ("0", "-1"),
                         "--kid-subset-size": ("1", "0", "-3"), "--k": ("0", "-1", "1000000000"),
                         "--device": ("tpu:x", "cuda:99"), "--seed": (str(10 ** 30),)}.items():
        for v in values:
            out.append(Case(f"eval{flag}={v}", run(flag, v)))
    for v in ("0", "-1", "1000000000000"):
        out.append(Case(f"eval-model--num={v}", run("--num", v, "--dataset", "shapes",
                                                     source=("--model", f"{W}/text"), reference="shapes")))
    for flag, v in (("--steps", "0"), ("--steps", "1000000"), ("--guidance", "nan"), ("--sampler", "plms")):
        out.append(Case(f"eval-model{flag}={v}", run(flag, v, "--num", "2", "--dataset", "shapes",
                                                      source=("--model", f"{W}/text"), reference="shapes")))
    out.append(Case("eval-model-text-without-dataset", run("--num", "2", source=("--model", f"{W}/text"),
                                                           reference=f"{W}/gen")))
    out.append(Case("eval-model-missing", run("--num", "2", source=("--model", f"{T}/none"), reference="shapes")))
    for label, features, setup in (
            ("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()), ("empty-dir", f"{T}/e", (_dir("e"),)),
            ("inception-missing", f"inception:{T}/none.pth", ()),
            ("inception-dir", f"inception:{T}/d", (_dir("d"),)),
            ("inception-zero-byte", f"inception:{T}/z.pth", (_bytes_file("z.pth", b""),)),
            ("inception-safetensors", f"inception:{W}/clf/model.safetensors", ()),
            ("classifier-config-list", f"{T}/clf", (_copy("clf"), _json_file("clf/config.json", [1]))),
            ("classifier-config-null", f"{T}/clf", (_copy("clf"), _json_file("clf/config.json", None))),
            ("classifier-config-no-config", f"{T}/clf", (_copy("clf"), _patch_json("clf/config.json", ("config",),
                                                                                   None, delete=True))),
            ("classifier-widths-string", f"{T}/clf", (_copy("clf"), _patch_json("clf/config.json",
                                                                                ("config", "widths"), "abc"))),
            ("classifier-num-classes-huge", f"{T}/clf", (_copy("clf"), _patch_json(
                "clf/config.json", ("config", "num_classes"), 2 ** 40))),
            ("classifier-feature-dim-negative", f"{T}/clf", (_copy("clf"), _patch_json(
                "clf/config.json", ("config", "feature_dim"), -1))),
            ("classifier-meta-list", f"{T}/clf", (_copy("clf"), _json_file("clf/classifier.json", [1])))):
        out.append(Case(f"eval-features-{label}", run(features=features), setup))
    out.append(Case("eval-classifier-missing", run("--classifier", f"{T}/none")))
    for label, gen, setup in (("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()),
                              ("empty-dir", f"{T}/e", (_dir("e"),)),
                              ("mixed-sizes", f"{T}/g", (_copy("gen", "g"),
                                                         _step(lambda p: (_fresh(p), Image.new("RGB", (8, 8)).save(p)),
                                                               "g/small.png")))):
        out.append(Case(f"eval-generated-{label}", run(source=("--generated", gen)), setup))
    out.append(Case("eval-reference-missing", run(reference=f"{T}/none")))
    out.append(Case("eval-reference-split-bogus", run("--reference-split", "bogus", reference="shapes")))
    out.append(Case("eval-out-under-a-file", run("--out", f"{T}/f/report.json"), (_bytes_file("f", b"x"),)))
    return out


def train_classifier_cases() -> list[Case]:
    def run(*extra):
        return ("train-classifier", "--dataset", "shapes", "--out", f"{T}/clf", "--limit", "8", "--test-limit", "8",
                "--max-steps", "1", *extra)
    out = []
    for flag, values in {"--epochs": ("0", "-1", "1000000000000"), "--batch-size": ("0", "-1"),
                         "--lr": ("0", "-1", "nan", "inf", "x"), "--limit": ("0", "-1"), "--test-limit": ("0", "-3"),
                         "--max-steps": ("0", "-1"), "--device": ("tpu:x", "cuda:99"), "--seed": (str(10 ** 30),),
                         "--dataset": ("imagenet",)}.items():
        for v in values:
            out.append(Case(f"train-classifier{flag}={v}", run(flag, v)))
    out.append(Case("train-classifier-out-is-a-file", ("train-classifier", "--dataset", "shapes", "--out", f"{T}/f",
                                                       "--limit", "8", "--max-steps", "1"), (_bytes_file("f", b"x"),)))
    return out


def convert_cases() -> list[Case]:
    out = []
    for label, src, setup in (("missing", f"{T}/none", ()), ("png", f"{W}/img/in.png", ()),
                              ("txt", f"{T}/m.txt", (_bytes_file("m.txt", b"x"),)),
                              ("empty-dir", f"{T}/e", (_dir("e"),)), ("component-folder", f"{W}/text/denoiser", ())):
        out.append(Case(f"convert-from-{label}", ("convert", "--from", src, "--to", f"{T}/out")))
        if setup:
            out[-1] = dataclasses.replace(out[-1], setup=setup)
    out += [Case("convert-to-a-file", ("convert", "--from", f"{W}/text", "--to", f"{T}/f"), (_bytes_file("f", b"x"),)),
            Case("convert-to-itself", ("convert", "--from", f"{W}/text", "--to", f"{W}/text")),
            Case("convert-ldmkit-to-diffusers", ("convert", "--from", f"{W}/text", "--to", f"{T}/o", "--format",
                                                 "diffusers")),
            Case("convert-options-on-folder", ("convert", "--from", f"{W}/text", "--to", f"{T}/o", "--ema")),
            Case("convert-ema-missing", ("convert", "--from", f"{W}/sd1.safetensors", "--to", f"{T}/o", "--ema",
                                         "--tokenizer", f"{W}/sd1-diffusers/tokenizer")),
            Case("convert-dtype-bogus", ("convert", "--from", f"{W}/text", "--to", f"{T}/o", "--dtype", "fp8")),
            Case("convert-format-bogus", ("convert", "--from", f"{W}/text", "--to", f"{T}/o", "--format", "onnx"))]
    return out


def autoencoder_command_cases() -> list[Case]:
    ae = f"{W}/text/autoencoder"
    out = []
    for command in ("ae-stats", "eval-autoencoder"):
        def run(*extra, model=ae, data="shapes", command=command):
            base = ("--num-samples", "2") if command == "ae-stats" else ("--num-images", "2", "--no-lpips")
            return (command, "--model", model, "--data", data, *base, *extra)
        flags = {"--size": ("0", "-1", "1000000000", "x"), "--device": ("tpu:x", "cuda:99", ""),
                 "--seed": (str(10 ** 30), str(-(2 ** 64)))}
        if command == "ae-stats":
            flags["--num-samples"] = ("0", "-1", "1000000000000")
        else:
            flags.update({"--num-images": ("0", "-1"), "--batch-size": ("0", "-1")})
        for flag, values in flags.items():
            for v in values:
                out.append(Case(f"{command}{flag}={v}", run(flag, v)))
        for label, model, setup in (("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()),
                                    ("empty-dir", f"{T}/e", (_dir("e"),)), ("denoiser", f"{W}/text/denoiser", ()),
                                    ("config-list", f"{T}/ae", (_copy("text/autoencoder", "ae"),
                                                                _json_file("ae/config.json", [1]))),
                                    ("config-channels-huge", f"{T}/ae", (_copy("text/autoencoder", "ae"),
                                                                         _patch_json("ae/config.json",
                                                                                     ("config", "channels"), 2 ** 40))),
                                    ("config-sample-size-string", f"{T}/ae", (_copy("text/autoencoder", "ae"),
                                                                              _patch_json("ae/config.json",
                                                                                          ("config", "sample_size"),
                                                                                          "x")))):
            out.append(Case(f"{command}-model-{label}", run(model=model), setup))
        for label, data, setup in (("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()),
                                   ("empty-dir", f"{T}/e", (_dir("e"),)),
                                   ("one-image", f"{T}/one", (_copy("img/in.png", "one/in.png"),)),
                                   ("fashion-mnist-size-64", "fashion-mnist", ())):
            if command == "eval-autoencoder" and label == "one-image":
                continue  # a one-image folder is a valid (small) evaluation set
            extra = ("--size", "64") if label.startswith("fashion") else ()
            out.append(Case(f"{command}-data-{label}", run(*extra, data=data), setup))
    for label, path, setup in (("missing", f"{T}/none.pth", ()), ("directory", f"{T}/d", (_dir("d"),)),
                               ("text", f"{T}/v.pth", (_bytes_file("v.pth", b"hello"),)),
                               ("safetensors", f"{W}/text/autoencoder/model.safetensors", ())):
        out.append(Case(f"eval-autoencoder-vgg-weights-{label}",
                        ("eval-autoencoder", "--model", ae, "--data", "shapes", "--num-images", "2",
                         "--vgg-weights", path), setup))
    out.append(Case("eval-autoencoder-out-under-a-file",
                    ("eval-autoencoder", "--model", ae, "--data", "shapes", "--num-images", "2", "--no-lpips",
                     "--out", f"{T}/f/r.json"), (_bytes_file("f", b"x"),)))
    return out


# ----------------------------------------------------------------------------- commands being rewritten
TRAIN = ("train", "--latents", f"{W}/lat", "--autoencoder", f"{W}/text/autoencoder", "--out", f"{T}/run",
         "--steps", "1", "--batch-size", "4", "--no-progress")


def train_cases() -> list[Case]:
    """`ldm train`: every kind of config field (numbers, choices, lists, the rules between fields), the
    --config / --resume / --init-from files and the run folder."""
    out = []
    flags = {"--steps": ("0", "-1", "x", "1e999"), "--batch-size": ("0", "-4", "9"), "--lr": ("0", "-1", "nan", "inf",
             "fast"), "--grad-accum": ("0", "3"), "--warmup-steps": ("-1",), "--ema-decay": ("1", "-0.1", "2"),
             "--cond-drop": ("1", "-0.5"), "--guidance": ("-1", "nan"), "--sample-steps": ("0", "1001"),
             "--threads": ("0", "-1"), "--num-train-timesteps": ("1", "0"), "--noise-level-max": ("1000", "-1"),
             "--seed": ("-1",), "--sample-seeds": ("-1",), "--keep-checkpoints": ("0",), "--checkpoint-every": ("0",),
             "--objective": ("flowx",), "--denoiser": ("vit",), "--precision": ("fp8", "fp16"),
             "--strategy": ("zero3",), "--conditioning": ("image",), "--spatial": ("outpaint", "inpaint"),
             "--text-encoder": ("huge",), "--sampler": ("plms", "flow_euler"), "--preset": ("nope",),
             "--text-encoder-layer": ("2", "7"), "--method": ("nope",), "--device": ("tpu", "cuda:7"),
             "--max-bad-steps": ("0",), "--weight-decay": ("-1",), "--grad-clip": ("-1",)}
    for flag, values in flags.items():
        for v in values:
            out.append(Case(f"train{flag}={v}", TRAIN + (flag, v)))
    for label, extra in (("adam-betas-one", ("--adam-betas", "0.9")), ("adam-betas-big", ("--adam-betas", "2", "2")),
                         ("dit-position-features", ("--denoiser", "dit", "--preset", "tiny", "--position-features")),
                         ("adapter-unconditional", ("--context-adapter-layers", "1", "--conditioning", "none")),
                         ("flow-sampler-eps", ("--objective", "eps", "--sampler", "flow_heun")),
                         ("no-out", ("--out", "")), ("resume-and-config", ("--resume", "--config", f"{T}/c.json"))):
        out.append(Case(f"train-{label}", TRAIN + extra, (_json_file("c.json", {}),)))
    for label, path, setup in (("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()),
                               ("empty-dir", f"{T}/e", (_dir("e"),)),
                               ("shard-corrupt", f"{T}/lat", (_copy("lat"), _bytes_file("lat/shard-00000.safetensors",
                                                                                        b"\x00" * 12))),
                               ("index-list", f"{T}/lat", (_copy("lat"), _json_file("lat/index.json", [1]))),
                               ("index-null", f"{T}/lat", (_copy("lat"), _json_file("lat/index.json", None)))):
        out.append(Case(f"train-latents-{label}", TRAIN + ("--latents", path), setup))
    for label, path, setup in (("missing", f"{T}/none", ()), ("denoiser", f"{W}/text/denoiser", ()),
                               ("weights-corrupt", f"{T}/ae", (_copy("text/autoencoder", "ae"),
                                                               _bytes_file("ae/model.safetensors", b"garbage")))):
        out.append(Case(f"train-autoencoder-path-{label}", TRAIN + ("--autoencoder", path), setup))
    for label, value in (("list", [1, 2]), ("null", None), ("lr-string", {"lr": "fast"}),
                         ("batch-null", {"batch_size": None}), ("unknown-key", {"speed": 3}),
                         ("run-config-list", {"method": "ldm", "config": [1]}), ("steps-float", {"steps": 1.5})):
        out.append(Case(f"train-config-{label}", TRAIN[:7] + ("--config", f"{T}/c.json"),
                        (_json_file("c.json", value),)))
    for label, setup in (("not-json", (_bytes_file("c.json", b"{lr: 1"),)),
                         ("not-utf8", (_bytes_file("c.json", b'{"lr": "\xff"}'),)), ("missing", ())):
        out.append(Case(f"train-config-{label}", TRAIN[:7] + ("--config", f"{T}/c.json"), setup))
    # resuming: no run, a run config of the wrong shape, checkpoints that are not checkpoints
    resume = ("train", "--out", f"{T}/run", "--resume")
    out.append(Case("train-resume-no-run", resume))
    out.append(Case("train-resume-config-list", resume, (_json_file("run/config.json", [1]),)))
    out.append(Case("train-resume-config-other-method", resume,
                    (_json_file("run/config.json", {"method": "autoencoder", "config": {}}),)))
    run_config = {"method": "ldm", "config": {"latents": "x", "autoencoder": "y", "out": "z"}}
    for label, data in (("truncated", b"PK\x03\x04garbage"), ("zero-bytes", b""), ("text", b"hello")):
        out.append(Case(f"train-resume-checkpoint-{label}", resume + (f"{T}/ck.pt",),
                        (_json_file("run/config.json", run_config), _bytes_file("ck.pt", data))))
    out.append(Case("train-resume-checkpoint-pickle", resume + (f"{T}/evil.pt",),
                    (_json_file("run/config.json", run_config), _step(lambda p: malicious_pickle(p, "torch-zip-system"), "evil.pt")),
                    marker=True))
    for label, path, setup, marker in (
            ("missing", f"{T}/none.pt", (), False), ("text", f"{T}/x.pt", (_bytes_file("x.pt", b"hello"),), False),
            ("pickle", f"{T}/evil.pt", (_step(lambda p: malicious_pickle(p, "torch-zip-system"), "evil.pt"),), True),
            ("other-model", f"{W}/foreign.pt", (), False), ("model-folder-of-another-shape", f"{W}/upscale", (), False)):
        out.append(Case(f"train-init-from-{label}", TRAIN + ("--init-from", path), setup, marker))
    # the run folder: an existing run is not overwritten without --overwrite; --out a file
    out.append(Case("train-existing-run", TRAIN, (_json_file("run/config.json", run_config),)))
    out.append(Case("train-out-is-a-file", TRAIN[:-4] + ("--out", f"{T}/f") + TRAIN[-3:], (_bytes_file("f", b"x"),)))
    return out


def train_autoencoder_cases() -> list[Case]:
    """`ldm train-autoencoder`: its own fields (architecture, losses, data) and the shared ones."""
    base = ("train-autoencoder", "--data", "shapes", "--out", f"{T}/run", "--steps", "1", "--batch-size", "2",
            "--size", "16", "--no-progress")
    out = []
    flags = {"--preset": ("nope",), "--steps": ("0",), "--threads": ("0",), "--size": ("7", "100000"),
             "--ch-mult": ("0", "1 x"), "--num-codes": ("1",), "--disc-loss": ("wasserstein",),
             "--image-channels": ("2",), "--kl-weight": ("-1", "nan"), "--disc-lr": ("0",), "--holdout": ("0",),
             "--latent-channels": ("0",), "--batch-size": ("0",)}
    for flag, values in flags.items():
        for v in values:
            out.append(Case(f"train-autoencoder{flag}={_safe(v)}", base + (flag, *v.split())))
    for label, data, setup in (("missing", f"{T}/none", ()), ("a-file", f"{W}/img/in.png", ()),
                               ("empty-dir", f"{T}/e", (_dir("e"),)),
                               ("one-image", f"{T}/one", (_copy("img/in.png", "one/in.png"),)),
                               ("fashion-mnist-64", "fashion-mnist", ())):
        extra = ("--size", "64") if label.startswith("fashion") else ()
        out.append(Case(f"train-autoencoder-data-{label}", base + ("--data", data, *extra), setup))
    for label, path, setup, marker in (("missing", f"{T}/none.pth", (), False),
                                       ("text", f"{T}/v.pth", (_bytes_file("v.pth", b"hello"),), False),
                                       ("pickle", f"{T}/evil.pth",
                                        (_step(lambda p: malicious_pickle(p, "torch-zip-system"), "evil.pth"),), True)):
        out.append(Case(f"train-autoencoder-vgg-weights-{label}", base + ("--vgg-weights", path), setup, marker))
    out.append(Case("train-autoencoder-resume-nothing", ("train-autoencoder", "--out", f"{T}/run", "--resume")))
    return out


# ----------------------------------------------------------------------------- adapters
def adapter_cases() -> list[Case]:
    """--lora / --embedding files: damaged, malicious, of another model, or not adapters at all."""
    m = f"{W}/sd1-diffusers"
    out = []
    for how in SAFETENSORS_CORRUPTIONS:
        for flag, name in (("--lora", "lora.safetensors"), ("--embedding", "emb.safetensors")):
            setup = (_copy(name), _step(functools.partial(corrupt_safetensors, how=how), name))
            out.append(Case(f"adapter{flag}-{how}", _gen("sample", m, flag, f"{T}/{name}"), setup))
        out.append(Case(f"adapter-convert-lora-{how}", ("convert", "--from", m, "--to", f"{T}/out", "--lora",
                                                         f"{T}/lora.safetensors"),
                        (_copy("lora.safetensors"), _step(functools.partial(corrupt_safetensors, how=how),
                                                          "lora.safetensors"))))
    for style in ("torch-zip-system", "torch-zip-open", "legacy-pickle"):
        out.append(Case(f"adapter-embedding-pickle-{style}", _gen("sample", m, "--embedding", f"{T}/e.pt"),
                        (_step(functools.partial(malicious_pickle, style=style), "e.pt"),), marker=True))
        out.append(Case(f"adapter-lora-pickle-{style}", _gen("sample", m, "--lora", f"{T}/l.ckpt"),
                        (_step(functools.partial(malicious_pickle, style=style), "l.ckpt"),), marker=True))
    from safetensors.torch import save as st_save

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wrong = {
        "lora-other-base": {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 640),
                            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 2)},
        "lora-wide": {f"{q}.lora_down.weight": torch.zeros(2, 320), f"{q}.lora_up.weight": torch.zeros(320, 2)},
        "lora-rank-mismatch": {f"{q}.lora_down.weight": torch.zeros(4, 32), f"{q}.lora_up.weight": torch.zeros(32, 2)},
        "lora-no-up": {f"{q}.lora_down.weight": torch.zeros(2, 32)},
        "lora-inf": {f"{q}.lora_down.weight": torch.full((2, 32), float("inf")), f"{q}.lora_up.weight": torch.zeros(32, 2)},
        "lora-int": {f"{q}.lora_down.weight": torch.zeros(2, 32, dtype=torch.int32),
                     f"{q}.lora_up.weight": torch.zeros(32, 2, dtype=torch.int32)},
        "lora-not-lora": {"first_stage_model.encoder.conv_in.weight": torch.zeros(2)},
        "embedding-wide": {"emb_params": torch.zeros(2, 768)},
        "embedding-3d": {"emb_params": torch.zeros(2, 2, 128)},
        "embedding-two": {"a": torch.zeros(1, 128), "b": torch.zeros(1, 128)},
        "embedding-sdxl": {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
        "embedding-taken-token": {"cat</w>": torch.zeros(1, 128)},
    }
    for label, tensors in wrong.items():
        flag = "--lora" if label.startswith("lora") else "--embedding"
        out.append(Case(f"adapter-{label}", _gen("sample", m, flag, f"{T}/x.safetensors"),
                        (_bytes_file("x.safetensors", st_save(tensors)),)))
    out += [Case("adapter-lora-missing", _gen("sample", m, "--lora", f"{T}/nope.safetensors")),
            Case("adapter-lora-bad-scale", _gen("sample", m, "--lora", f"{W}/lora.safetensors:1e9")),
            Case("adapter-lora-folder", _gen("sample", m, "--lora", f"{T}/d"), (_dir("d"),)),
            Case("adapter-embedding-space-token", _gen("sample", m, "--embedding", f"{W}/emb.safetensors:a b"))]
    return out


def controlnet_cases() -> list[Case]:
    """--controlnet folders and files, --control-image inputs and settings, ldm control-image."""
    m, cn, edges = f"{W}/sd1-diffusers", f"{W}/cn", f"{W}/img/in.png"

    def gen(*extra, command="sample"):
        return _gen(command, m, *extra, prompt=True)

    weights = "cn/diffusion_pytorch_model.safetensors"
    out = [Case(f"controlnet-weights-{how}", gen("--controlnet", f"{T}/cn", "--control-image", edges),
                (_copy("cn"), _step(functools.partial(corrupt_safetensors, how=how), weights)))
           for how in SAFETENSORS_CORRUPTIONS]
    out += [Case(f"controlnet-single-file-{how}", gen("--controlnet", f"{T}/c.safetensors", "--control-image", edges),
                 (_copy(weights, "c.safetensors"), _step(functools.partial(corrupt_safetensors, how=how),
                                                         "c.safetensors")))
            for how in SAFETENSORS_CORRUPTIONS]
    for style in ("torch-zip-system", "legacy-pickle"):
        out.append(Case(f"controlnet-pickle-{style}", gen("--controlnet", f"{T}/control.pth", "--control-image", edges),
                        (_step(functools.partial(malicious_pickle, style=style), "control.pth"),), marker=True))
    for label, value in (("list", [1]), ("null-channels", {"_class_name": "ControlNetModel", "block_out_channels": None}),
                         ("huge-channels", {"_class_name": "ControlNetModel", "block_out_channels": [2 ** 40] * 3}),
                         ("sdxl", {"_class_name": "ControlNetModel", "addition_embed_type": "text_time"}),
                         ("hint-zero", {"_class_name": "ControlNetModel", "conditioning_embedding_out_channels": [0]}),
                         ("other-class", {"_class_name": "ControlNetXSAdapter"})):
        out.append(Case(f"controlnet-config-{label}", gen("--controlnet", f"{T}/cn", "--control-image", edges),
                        (_copy("cn"), _json_file("cn/config.json", value))))
    for label, image in BAD_IMAGES.items():
        out.append(Case(f"controlnet-control-image-{label}", gen("--controlnet", cn, "--control-image", f"{T}/bad.png"),
                        (_bytes_file("bad.png", image()),)))
    rgba = _step(lambda p: Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(_fresh(p)), "clear.png")
    out += [
        Case("controlnet-other-base", gen("--controlnet", f"{W}/cn-other", "--control-image", edges)),
        Case("controlnet-missing", gen("--controlnet", f"{T}/nope", "--control-image", edges)),
        Case("controlnet-empty-folder", gen("--controlnet", f"{T}/d", "--control-image", edges), (_dir("d"),)),
        Case("controlnet-two-nets-one-image", gen("--controlnet", cn, "--controlnet", cn, "--control-image", edges)),
        Case("controlnet-no-image", gen("--controlnet", cn)),
        Case("controlnet-image-without-net", gen("--control-image", edges)),
        Case("controlnet-transparent-image", gen("--controlnet", cn, "--control-image", f"{T}/clear.png"), (rgba,)),
        Case("controlnet-aspect-error", gen("--controlnet", cn, "--control-image", edges, "--control-fit", "error",
                                            "--width", "32", "--height", "16")),
        Case("controlnet-start-after-end", gen("--controlnet", cn, "--control-image", edges, "--control-start", "0.9",
                                               "--control-end", "0.1")),
        Case("controlnet-end-above-one", gen("--controlnet", cn, "--control-image", edges, "--control-end", "2")),
        Case("controlnet-huge-scale", gen("--controlnet", f"{cn}:1e9", "--control-image", edges)),
        Case("controlnet-nan-scale", gen("--controlnet", f"{cn}:nan", "--control-image", edges)),
        Case("controlnet-on-upscale", _gen("upscale", f"{W}/upscale", "--controlnet", cn, "--control-image", edges,
                                           prompt=False)),
    ]
    train = ("train", "--init-from", m, "--control-data", f"{T}/cd", "--resolution", "16", "--steps", "1",
             "--batch-size", "2", "--out", f"{T}/run", "--no-progress")
    data = _copy("cdata", "cd")
    grey_alpha = _step(lambda p: Image.new("LA", (16, 16)).save(_fresh(p)), "cd/conditioning/1.png")
    small = _step(lambda p: Image.new("RGB", (8, 8)).save(_fresh(p)), "cd/conditioning/1.png")
    gone = _step(lambda p: p.unlink(), "cd/conditioning/2.png")
    out += [Case("train-controlnet-no-init-from", train[:1] + train[3:]),
            Case("train-controlnet-no-conditioning", train, (_dir("cd/images"),)),
            Case("train-controlnet-missing-control", train, (data, gone)),
            Case("train-controlnet-control-size", train, (data, small)),
            Case("train-controlnet-control-alpha", train, (data, grey_alpha)),
            Case("train-controlnet-control-garbage", train, (data, _bytes_file("cd/conditioning/3.png", b"xx"))),
            Case("train-controlnet-with-data", train + ("--data", f"{W}/cdata/images"), (data,)),
            Case("train-controlnet-on-upscale", ("train", "--init-from", f"{W}/upscale") + train[3:], (data,)),
            Case("train-controlnet-other-base", train + ("--controlnet", f"{W}/cn-other"), (data,)),
            Case("train-controlnet-corrupt", train + ("--controlnet", f"{T}/cn"),
                 (data, _copy("cn"), _step(functools.partial(corrupt_safetensors, how="truncated-half"), weights)))]
    ci = ("control-image", "--out", f"{T}/o.png")
    out += [Case("control-image-bad-kind", ci + ("--kind", "hed", "--image", edges)),
            Case("control-image-missing", ci + ("--kind", "canny", "--image", f"{T}/nope.png")),
            Case("control-image-transparent", ci + ("--kind", "canny", "--image", f"{T}/clear.png"), (rgba,)),
            Case("control-image-thresholds", ci + ("--kind", "canny", "--image", edges, "--low", "300")),
            Case("control-image-resolution", ci + ("--kind", "canny", "--image", edges, "--resolution", "0")),
            Case("control-image-not-png", ("control-image", "--out", f"{T}/o.jpg", "--kind", "canny", "--image", edges)),
            Case("control-image-exists", ("control-image", "--out", edges, "--kind", "canny", "--image", edges))]
    for label, image in BAD_IMAGES.items():
        out.append(Case(f"control-image-input-{label}", ci + ("--kind", "canny", "--image", f"{T}/bad.png"),
                        (_bytes_file("bad.png", image()),)))
    return out


def ip_adapter_cases() -> list[Case]:
    """--ip-adapter files, --image-prompt images, --ip-scale, --image-encoder folders."""
    m, ip, img = f"{W}/sd1-diffusers", f"{W}/ip/ip-adapter.safetensors", f"{W}/img/in.png"

    def gen(*extra):
        return _gen("sample", m, *extra, prompt=True)

    own = ("--image-encoder", f"{W}/ip/image_encoder")
    copy = (_copy("ip/ip-adapter.safetensors", "a.safetensors"),)
    out = [Case(f"ip-adapter-weights-{how}", gen("--ip-adapter", f"{T}/a.safetensors", "--image-prompt", img, *own),
                copy + (_step(functools.partial(corrupt_safetensors, how=how), "a.safetensors"),))
           for how in SAFETENSORS_CORRUPTIONS]
    for style in ("torch-zip-system", "legacy-pickle"):
        out.append(Case(f"ip-adapter-pickle-{style}", gen("--ip-adapter", f"{T}/ip.bin", "--image-prompt", img, *own),
                        (_step(functools.partial(malicious_pickle, style=style), "ip.bin"),), marker=True))
    for label, image in BAD_IMAGES.items():
        out.append(Case(f"ip-adapter-image-prompt-{label}", gen("--ip-adapter", ip, "--image-prompt", f"{T}/bad.png"),
                        (_bytes_file("bad.png", image()),)))
    out += [Case("ip-adapter-missing", gen("--ip-adapter", f"{T}/none.safetensors", "--image-prompt", img, *own)),
            Case("ip-adapter-lora-file", gen("--ip-adapter", f"{W}/lora.safetensors", "--image-prompt", img, *own)),
            Case("ip-adapter-controlnet-file", gen("--ip-adapter", f"{W}/cn/diffusion_pytorch_model.safetensors",
                                                   "--image-prompt", img, *own)),
            Case("ip-adapter-no-image", gen("--ip-adapter", ip)),
            Case("ip-adapter-image-without-adapter", gen("--image-prompt", img)),
            Case("ip-adapter-scale-huge", gen("--ip-adapter", ip, "--image-prompt", img, "--ip-scale", "1e9")),
            Case("ip-adapter-scale-nan", gen("--ip-adapter", ip, "--image-prompt", img, "--ip-scale", "nan")),
            Case("ip-adapter-encoder-missing", gen("--ip-adapter", ip, "--image-prompt", img, "--image-encoder",
                                                   f"{T}/none")),
            Case("ip-adapter-encoder-not-clip", gen("--ip-adapter", ip, "--image-prompt", img, "--image-encoder",
                                                    f"{W}/cn")),
            Case("ip-adapter-encoder-config-list", gen("--ip-adapter", f"{T}/ip/ip-adapter.safetensors",
                                                       "--image-prompt", img),
                 (_copy("ip"), _json_file("ip/image_encoder/config.json", [1]))),
            Case("ip-adapter-on-upscale", _gen("upscale", f"{W}/upscale", "--ip-adapter", ip, "--image-prompt", img,
                                               prompt=False))]
    return out


def sdxl_cases() -> list[Case]:
    """SDXL: adapters of the other family, the refiner, micro-conditioning, sizes, damaged single files."""
    xl, sd1, ref, img = f"{W}/sdxl", f"{W}/sd1-diffusers", f"{W}/sdxl-refiner", f"{W}/img/in.png"

    def gen(model, *extra, command="sample"):
        return _gen(command, model, *extra, prompt=True)

    out = [Case("sdxl-lora-on-sd1", gen(sd1, "--lora", f"{W}/lora-xl.safetensors")),
           Case("sd1-lora-on-sdxl", gen(xl, "--lora", f"{W}/lora.safetensors")),
           Case("sdxl-controlnet-on-sd1", gen(sd1, "--controlnet", f"{W}/cn-xl", "--control-image", img)),
           Case("sd1-controlnet-on-sdxl", gen(xl, "--controlnet", f"{W}/cn", "--control-image", img)),
           Case("sdxl-refiner-alone", gen(ref)),
           Case("sdxl-refiner-start-without-refiner", gen(xl, "--refiner-start", "0.5")),
           Case("sdxl-refiner-not-a-model", gen(xl, "--refiner", f"{T}/none")),
           Case("sdxl-micro-on-sd1", gen(sd1, "--original-size", "32", "32")),
           Case("sdxl-aesthetic-without-refiner", gen(xl, "--aesthetic-score", "6")),
           Case("sdxl-original-size-zero", gen(xl, "--original-size", "0", "16")),
           Case("sdxl-crop-huge", gen(xl, "--crop", "99999", "0")),
           Case("sdxl-aesthetic-nan", gen(xl, "--refiner", ref, "--aesthetic-score", "nan")),
           Case("sdxl-height-not-multiple", gen(xl, "--height", "21")),
           Case("sdxl-index-force-zeros-string", gen(f"{T}/x"), (_copy("sdxl", "x"),
                _patch_json("x/model_index.json", ("force_zeros_for_empty_prompt",), "yes"))),
           Case("sdxl-no-text-encoder-2", gen(f"{T}/x"), (_copy("sdxl", "x"), _step(shutil.rmtree, "x/text_encoder_2")))]
    for value in ("0", "1", "1.5", "nan", "-0.2"):
        out.append(Case(f"sdxl-refiner-start-{value}", gen(xl, "--refiner", ref, "--refiner-start", value)))
    for how in ("truncated-half", "header-garbage", "zero-byte"):
        out.append(Case(f"sdxl-single-file-{how}", gen(f"{T}/xl.safetensors"),
                        (_copy("sdxl.safetensors", "xl.safetensors"),
                         _step(functools.partial(corrupt_safetensors, how=how), "xl.safetensors"))))
    return out


def transformer_single_file_cases() -> list[Case]:
    """SD3 / FLUX.1 single files: what the file lacks (text encoders, tokenizers, the rest of FLUX), --base
    of the wrong family or on a folder, SD-only flags, damaged files."""
    sd3, flux = f"{W}/sd3.safetensors", f"{W}/flux1.safetensors"

    def gen(model, *extra):
        return _gen("sample", model, *extra, prompt=True)

    out = [Case("sd3-file-t5-without-tokenizer", gen(sd3)),
           Case("sd3-file-no-clip-g", gen(f"{W}/sd3-no-clip-g.safetensors")),
           Case("sd3-file-base-missing", gen(sd3, "--base", f"{T}/none")),
           Case("sd3-file-base-is-flux", gen(sd3, "--base", f"{W}/flux")),
           Case("sd3-file-tokenizer-flag", gen(sd3, "--base", f"{W}/sd3", "--tokenizer", f"{W}/sd3/tokenizer")),
           Case("sd3-file-prediction-type", gen(sd3, "--base", f"{W}/sd3", "--prediction-type", "v")),
           Case("sd3-folder-with-base", gen(f"{W}/sd3", "--base", f"{W}/sd3")),
           Case("sd1-file-with-base", gen(f"{W}/sd1.safetensors", "--base", f"{W}/sd3")),
           Case("flux-file-without-base", gen(flux)),
           Case("flux-file-base-is-sd3", gen(flux, "--base", f"{W}/sd3")),
           Case("flux-file-base-without-vae", gen(flux, "--base", f"{T}/x"), (_copy("flux", "x"),
                _step(shutil.rmtree, "x/vae"))),
           Case("convert-flux-file-without-base", ("convert", "--from", flux, "--to", f"{T}/out"))]
    for name, src in (("sd3", "sd3.safetensors"), ("flux", "flux1.safetensors")):
        for how in ("truncated-half", "header-garbage"):
            out.append(Case(f"{name}-single-file-{how}", gen(f"{T}/m.safetensors", "--base", f"{W}/{name}"),
                            (_copy(src, "m.safetensors"),
                             _step(functools.partial(corrupt_safetensors, how=how), "m.safetensors"))))
    return out


# ----------------------------------------------------------------------------- all cases
CASES_BY_COMMAND: dict[str, Callable[[], list[Case]]] = {
    "weights files": weights_cases,
    "ldmkit JSON": ldmkit_json_cases,
    "config fields": config_field_cases,
    "diffusers JSON": diffusers_json_cases,
    "pickles": pickle_cases,
    "single-file options": single_file_option_cases,
    "images": image_cases,
    "generation flags": generation_flag_cases,
    "cache-latents": cache_latents_cases,
    "eval": eval_cases,
    "train-classifier": train_classifier_cases,
    "convert": convert_cases,
    "ae-stats / eval-autoencoder": autoencoder_command_cases,
    "train": train_cases,
    "train-autoencoder": train_autoencoder_cases,
    "adapters": adapter_cases,
    "ControlNets": controlnet_cases,
    "IP-Adapters": ip_adapter_cases,
    "SDXL": sdxl_cases,
    "SD3 / FLUX.1 single files": transformer_single_file_cases,
}


def all_cases() -> list[Case]:
    cases = [c for make in CASES_BY_COMMAND.values() for c in make()]
    ids = [c.cid for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate case ids {dupes}"
    return cases


CASES = all_cases()


# ============================================================================= running a case
def _fill(arg: str, world: Path, tmp: Path) -> str:
    return arg.replace(W, str(world)).replace(T, str(tmp))


def _paths_in(argv: list[str]) -> list[Path]:
    paths = []
    for a in argv:
        for cand in (a, a.split(":", 1)[-1]):
            if cand.startswith("/") and Path(cand).exists():
                paths.append(Path(cand))
    return paths


def _snapshot(paths: list[Path]) -> dict:
    """Every file's hash and every folder's listing; a run folder's `.lock` (the writer lock a command
    takes before it reads anything) is not data and is left out."""
    state = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file() and q.name != ".lock")
        for f in files:
            state[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        if p.is_dir():
            state[str(p) + "/"] = sorted(str(q) for q in p.rglob("*") if q.name != ".lock")
    return state


class _CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _CaseTimeout(f"the case ran for more than {CASE_TIMEOUT_S} s")


def run_ldm(argv: list[str]) -> int:
    """`ldm ARGV` in this process -> exit code (argparse's own errors exit through SystemExit)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_one_line(command: str, rc: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err
    assert rc == 2, f"exit code {rc}; stderr: {err[-2000:]}"
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err[-2000:]!r}"
    prefix = f"ldm {command}: error:"
    assert lines[0].startswith(prefix), lines[0]
    assert len(lines[0].strip()) > len(prefix) + 10, lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = _build_world(tmp_path_factory.mktemp("world"))
    before = _snapshot([root])
    yield root
    assert _snapshot([root]) == before, "a case changed the shared valid models"


def test_enough_generated_cases():
    assert len(CASES) >= 200, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.cid for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(world, tmp_path, capfd, case):
    for step in case.setup:
        step(world, tmp_path)
    argv = [_fill(a, world, tmp_path) for a in case.argv]
    paths = _paths_in(argv)
    inputs = _snapshot(paths)
    capfd.readouterr()
    rc = run_ldm(argv)
    out, err = capfd.readouterr()
    check_one_line(argv[0], rc, out, err)
    assert all(p.exists() for p in paths) and _snapshot(paths) == inputs, "an input file changed"
    if case.marker:
        assert not list(tmp_path.rglob(MARKER)), "a pickle payload ran"
        assert not (Path.cwd() / MARKER).exists()


# ----------------------------------------------------------------------------- through the installed command
SUBPROCESS_CASES = [
    ("module", "weights-ldmkit-denoiser-header-bomb-2^60"),
    ("module", "pickle-convert-torch-zip-system.ckpt"),
    ("entry-point", "image-img2img--image-bomb-png-60000x60000"),
    ("entry-point", "flag-sample--num=1000000000000"),
    ("entry-point", "ldmkit-index-is-null"),
]


@pytest.mark.parametrize("how,cid", SUBPROCESS_CASES, ids=[f"{h}:{c}" for h, c in SUBPROCESS_CASES])
def test_installed_command_prints_one_line(world, tmp_path, how, cid):
    case = next(c for c in CASES if c.cid == cid)
    for step in case.setup:
        step(world, tmp_path)
    argv = [_fill(a, world, tmp_path) for a in case.argv]
    paths = _paths_in(argv)
    inputs = _snapshot(paths)
    if how == "module":
        cmd = [sys.executable, "-m", "ldmkit.cli", *argv]
    else:
        cmd = [str(Path(sys.executable).parent / "ldm"), *argv]
        if not Path(cmd[0]).is_file():
            pytest.skip("no `ldm` entry point next to this Python")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    check_one_line(argv[0], proc.returncode, proc.stdout, proc.stderr)
    assert _snapshot(paths) == inputs
    if case.marker:
        assert not list(tmp_path.rglob(MARKER))


# ----------------------------------------------------------------------------- library readers
def _latent_cache(world: Path) -> Path:
    cache = world.parent / "latent-cache"
    if not cache.exists():
        from ldmkit.data.latents import encode_dataset
        from ldmkit.data.shapes import ShapesDataset
        from ldmkit.io.format import load_component

        encode_dataset(load_component(world / "text" / "autoencoder"), ShapesDataset("train", size=32, length=4),
                       cache, batch_size=4, progress=False)
    return cache


LATENT_CACHE_CASES = [(f"shard-{how}", how) for how in SAFETENSORS_CORRUPTIONS] + [
    ("index-list", [1]), ("index-null", None), ("index-shards-string", "SHARDS"), ("side-json-list", "SIDE"),
    ("index-garbage", b"{garbage")]


@pytest.mark.parametrize("label,how", LATENT_CACHE_CASES, ids=[c[0] for c in LATENT_CACHE_CASES])
def test_damaged_latent_cache_is_one_line_value_error(world, tmp_path, label, how):
    from ldmkit.data.latents import CachedLatents
    from ldmkit.errors import UserError

    src = _latent_cache(world)
    cache = tmp_path / "cache"
    shutil.copytree(src, cache, copy_function=os.link)
    if label.startswith("shard-"):
        corrupt_safetensors(cache / "shard-00000.safetensors", how)
    elif how == "SHARDS":
        _patch_json("index.json", ("shards",), "x")(cache, cache)
    elif how == "SIDE":
        _write(cache / "shard-00000.json", b"[1]")
    elif isinstance(how, bytes):
        _write(cache / "index.json", how)
    else:
        _write(cache / "index.json", json.dumps(how).encode())
    with pytest.raises(UserError) as info:
        CachedLatents(cache)
    assert "\n" not in str(info.value) and str(cache) in str(info.value)


def test_null_sample_size_is_accepted(world, tmp_path, capfd):
    """`"sample_size": null` in a UNet config is allowed: the pipeline falls back to a default size."""
    shutil.copytree(world / "sd1-diffusers", tmp_path / "m", copy_function=os.link)
    _patch_json("m/unet/config.json", ("sample_size",), None)(world, tmp_path)
    rc = run_ldm(["sample", "--model", str(tmp_path / "m"), "--prompt", "a red cat", "--steps", "1",
                  "--out", str(tmp_path / "o.png"), "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert Image.open(tmp_path / "o.png").size[0] > 0
    shutil.copytree(world / "text", tmp_path / "t", copy_function=os.link)
    _patch_json("t/denoiser/config.json", ("config", "sample_size"), None)(world, tmp_path)
    rc = run_ldm(["sample", "--model", str(tmp_path / "t"), "--prompt", "a red square", "--steps", "1",
                  "--out", str(tmp_path / "t.png"), "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert Image.open(tmp_path / "t.png").size == (32, 32)
