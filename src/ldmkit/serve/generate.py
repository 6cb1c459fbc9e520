"""One /sdapi/v1/txt2img or /img2img request, run on the worker: the pipeline call and the response.

    seeds      seed -1 draws one; image i of the request uses seed + i (A1111's all_seeds)
    sampler    A1111's name + schedule type ("DPM++ 2M" + "Karras") or ldmkit's ("dpmpp_2m_karras")
    LoRAs      <lora:name:weight> in the prompt (A1111's tag), from --lora-dir; merged for the request
               and the weights restored after it
    ControlNet alwayson_scripts.controlnet.args, from --controlnet-dir; attached for the request only
    files      every image is also written to --out as NNNNN-SEED.png (names never reused), with its
               settings in the PNG's `parameters` and `ldmkit` chunks, the same bytes the response holds
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
import secrets
import time
from pathlib import Path

import torch

from ldmkit.pipelines.fast_decode import preview_decoder
from ldmkit.serve.requests import ControlUnit, FieldError, Img2ImgRequest, Limits, Txt2ImgRequest, ignored_fields

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # <lora:name>, <lora:name:0.8>
MODULES = {"none": None, "canny": "canny", "scribble": "scribble", "scribble_xdog": "scribble",
           "softedge": "softedge"}  # A1111 ControlNet preprocessors ldmkit has (conditioning.control_images)


def decode_base64(text: str, field: str) -> bytes:
    """The bytes of a base64 string (a data: URL too); anything else is a FieldError naming `field`."""
    if not isinstance(text, str) or not text:
        raise FieldError(field, f"{field} must be a base64-encoded image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, f"{field} is not valid base64") from None


def decode_image(text: str, field: str, limits: Limits, mode: str | None = "RGB"):
    """A base64 image (a data: URL too) as a PIL image, at most `limits.max_pixels` (checked before it is
    decoded); anything else is a FieldError naming `field`."""
    from PIL import Image

    raw = decode_base64(text, field)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise FieldError(field, f"{field} is {w}x{h} pixels; this server reads at most {limits.max_pixels}")
            img.load()
            return img.convert(mode) if mode else img.copy()
    except FieldError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL reports a bad file in many ways
        raise FieldError(field, f"{field} is not a readable image ({type(exc).__name__})") from None


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its <lora:name:weight> tags, and the (name, weight) pairs."""
    loras = []
    for m in LORA_TAG.finditer(prompt):
        try:
            weight = float(m.group(2)) if m.group(2) not in (None, "") else 1.0
        except ValueError:
            raise FieldError("prompt", f"<lora:{m.group(1)}:{m.group(2)}>: the weight is not a number") from None
        loras.append((m.group(1).strip(), weight))
    return (LORA_TAG.sub("", prompt).strip() if loras else prompt), loras


def resolve_sampler(req: Txt2ImgRequest, pipe) -> str | None:
    """The ldmkit sampler a request asks for (None: the model's default)."""
    from ldmkit.diffusion.samplers import SAMPLERS, sampler_names
    from ldmkit.io.infotext import ldmkit_sampler

    name = req.sampler_name or req.sampler_index
    if not name:
        return None
    if name in SAMPLERS:
        return name
    flow = getattr(pipe.schedule, "kind", "discrete") == "flow"
    found = ldmkit_sampler(name, req.scheduler, flow)
    if found is None:
        labels = sorted({SAMPLERS[n].label for n in sampler_names(pipe.schedule)})
        raise FieldError("sampler_name", f"sampler {name!r}" + (f" with schedule {req.scheduler!r}" if req.scheduler
                                                                 else "") + f" is not available; samplers: "
                         f"{', '.join(labels)} (schedule types Automatic, Uniform, Karras, Exponential, Beta)")
    return found


def control_units(req: Txt2ImgRequest, models, pipe, limits: Limits) -> list:
    """(pipelines.control.Attached, control image) for every enabled ControlNet unit of the request."""
    from pydantic import ValidationError

    from ldmkit.pipelines.control import Attached

    scripts = {k.lower(): v for k, v in (req.alwayson_scripts or {}).items()}
    args = (scripts.get("controlnet") or {}).get("args", []) if isinstance(scripts.get("controlnet"), dict) else []
    if not isinstance(args, list):
        raise FieldError("alwayson_scripts.controlnet.args", "alwayson_scripts.controlnet.args must be a list")
    units = []
    for k, raw in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{k}]"
        try:
            unit = ControlUnit.model_validate(raw)
        except ValidationError as exc:
            raise FieldError(where, f"{where}: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None
        if not unit.enabled:
            continue
        if unit.guidance_start >= unit.guidance_end:
            raise FieldError(where, f"{where}: guidance_start {unit.guidance_start} must be below guidance_end "
                             f"{unit.guidance_end}")
        if unit.module.lower() not in MODULES:
            raise FieldError(where, f"{where}: module {unit.module!r} is not one of {', '.join(MODULES)}")
        try:
            net = models.controlnet(unit.model, pipe)
        except KeyError as exc:
            raise FieldError(where, f"{where}: {exc.args[0]}") from None
        image = decode_image(unit.image or unit.input_image or "", f"{where}.image", limits, mode=None)
        kind = MODULES[unit.module.lower()]
        if kind is not None:
            from ldmkit.conditioning.control_images import make_control_image

            low, high = int(unit.threshold_a or 100), int(unit.threshold_b or 200)
            image = make_control_image(image, kind, low, high, threshold=int(unit.threshold_a or 32))
        units.append((Attached(net, _name(unit.model), unit.weight, unit.guidance_start, unit.guidance_end), image))
    return units


def _name(text: str) -> str:
    from ldmkit.serve.models import bare_name

    return bare_name(text)


@contextlib.contextmanager
def loras_applied(pipe, loras: list[tuple[Path, float]]):
    """The LoRAs merged into the weights for one request; the weights they touch are restored after."""
    from ldmkit.adapters.lora import resolve
    from ldmkit.io.adapter_files import read_lora

    saved, adapters = {}, list(pipe.adapters)
    try:
        for path, scale in loras:
            for _, target, _ in resolve({"denoiser": pipe.denoiser, "conditioner": pipe.conditioner},
                                        read_lora(path), str(path)):
                saved.setdefault(id(target), (target, target.weight.detach().clone()))
            pipe.load_lora(path, scale)
        yield
    finally:
        with torch.no_grad():
            for target, weight in saved.values():
                target.weight.copy_(weight)
        pipe.adapters[:] = adapters
        if saved and hasattr(pipe.conditioner, "_cache"):  # encodings made with the LoRA are stale
            pipe.conditioner._cache = {}


@contextlib.contextmanager
def controlnets_attached(pipe, units: list):
    before = list(pipe.controlnets)
    pipe.controlnets[:] = before + [u for u, _ in units]
    try:
        yield
    finally:
        pipe.controlnets[:] = before


def _call_args(req: Txt2ImgRequest, pipe, seed: int) -> dict:
    prompt, _ = split_lora_tags(req.prompt)
    kw = dict(num=req.batch_size * req.n_iter, seed=seed, sampler=resolve_sampler(req, pipe), steps=req.steps,
              guidance=req.cfg_scale, height=req.height, width=req.width, batch_size=req.batch_size, progress=False)
    if pipe.conditioning == "text":
        kw.update(prompt=prompt, negative_prompt=req.negative_prompt or None)
    elif pipe.conditioning == "class":  # a class-conditional model takes the class name or id as the prompt
        kw.update(prompt=None, class_label=prompt.strip() or None)
    return kw


def run_request(job, req: Txt2ImgRequest, models, out: Path, limits: Limits, name: str | None = None) -> dict:
    """The worker's part of a request: generate with model `name` (None: the one the request names, else the
    current one), write the PNGs, return the response body."""
    name = name or models.find((req.override_settings or {}).get("sd_model_checkpoint"))
    pipe = models.pipes[name]
    seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed
    kw = _call_args(req, pipe, seed)
    loras = []
    for lora, weight in split_lora_tags(req.prompt)[1]:
        try:
            loras.append((models.lora_path(lora), weight))
        except KeyError as exc:
            raise FieldError("prompt", f"<lora:{lora}>: {exc.args[0]}") from None
    units = control_units(req, models, pipe, limits)
    job.batches, job.decode = req.n_iter, preview_decoder(pipe)  # the tiny decoder when the model has one
    img2img = isinstance(req, Img2ImgRequest)
    if img2img:
        init = decode_image(req.init_images[0], "init_images", limits)
        mask = decode_image(req.mask, "mask", limits, mode="L") if req.mask else None
        if mask is not None:
            mask = mask.resize(init.size) if mask.size != init.size else mask
            if req.inpainting_mask_invert:
                from PIL import ImageOps

                mask = ImageOps.invert(mask)
    prompt = kw.pop("prompt", None)
    if units:
        kw["control_image"] = [image for _, image in units]
    with loras_applied(pipe, loras), controlnets_attached(pipe, units):
        pipe.step_hook = job.on_step
        try:
            if not img2img:
                results = pipe.text2img(prompt, **kw)
            elif mask is None:
                results = pipe.img2img(init, prompt, strength=req.denoising_strength, **kw)
            else:
                results = pipe.inpaint(init, mask, prompt, strength=req.denoising_strength, **kw)
        finally:
            pipe.step_hook = None
    return respond(req, results, name, pipe, out, job)


def respond(req: Txt2ImgRequest, results: list, name: str, pipe, out: Path, job) -> dict:
    """The A1111 response: base64 PNGs (with their settings chunks), the request, `info` as JSON text."""
    from ldmkit import __version__
    from ldmkit.io.files import atomic_write
    from ldmkit.io.images import png_bytes, reserve_numbered
    from ldmkit.io.infotext import a1111_sampler, infotext

    datas = [png_bytes(r.image, r.metadata) for r in results]
    files = []
    if req.save_images:
        paths, _ = reserve_numbered(out, [r.metadata["seed"] for r in results])
        for path, data in zip(paths, datas):
            atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
        files = [p.name for p in paths]
    first = results[0].metadata
    sampler, schedule = a1111_sampler(first["sampler"])
    w, h = (int(v) for v in first["size"].split("x"))
    info = {"prompt": first.get("prompt", ""), "all_prompts": [r.metadata.get("prompt", "") for r in results],
            "negative_prompt": first.get("negative_prompt", ""),
            "all_negative_prompts": [r.metadata.get("negative_prompt", "") for r in results],
            "seed": first["seed"], "all_seeds": [r.metadata["seed"] for r in results], "subseed": -1,
            "all_subseeds": [-1] * len(results), "width": w, "height": h, "sampler_name": sampler,
            "scheduler": schedule or "Automatic", "cfg_scale": first.get("guidance", 1.0), "steps": first["steps"],
            "batch_size": req.batch_size, "sd_model_name": name, "sd_model_hash": pipe.model_hash,
            "denoising_strength": first.get("strength"), "index_of_first_image": 0,
            "infotexts": [infotext(r.metadata) for r in results], "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or time.time())),
            "version": f"ldmkit {__version__}", "task_id": job.id, "files": files,
            "ignored_fields": ignored_fields(req), "ldmkit": [r.metadata for r in results]}
    params = req.model_dump(exclude={"init_images", "mask"})
    if isinstance(req, Img2ImgRequest):
        params.update(init_images=None, mask=None)
    images = [base64.b64encode(d).decode("ascii") for d in datas] if req.send_images else []
    return {"images": images, "parameters": params, "info": json.dumps(info)}
