"""AUTOMATIC1111's "infotext": the `parameters` PNG chunk that image tools read, written and parsed.

    a red circle, (blue:1.2) square
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: ...

The first lines are the prompt, the lines from "Negative prompt:" on the negative prompt, and the
last line "Label: value" fields (read as such when it holds at least three). A value with a comma,
a colon or a new line is written as a JSON string (A1111's `quote`). ldmkit's own settings travel
in the `ldmkit` chunk as JSON; `png_settings` reads either back as ldmkit's metadata keys.
"""
from __future__ import annotations

import json
import re

from ldmkit.diffusion.samplers import SAMPLERS

# ldmkit metadata key -> A1111 label, in the order A1111 writes its fields ("Schedule type" follows
# "Sampler"); keys of ldmkit's own (class, adapters ...) follow A1111's naming style
LABELS = (("steps", "Steps"), ("sampler", "Sampler"), ("guidance", "CFG scale"), ("seed", "Seed"),
          ("size", "Size"), ("model_hash", "Model hash"), ("model", "Model"), ("strength", "Denoising strength"),
          ("class", "Class"), ("guidance_rescale", "CFG rescale"), ("noise_level", "Noise level"),
          ("inpaint_mode", "Inpaint mode"), ("lora_hashes", "Lora hashes"), ("ti_hashes", "TI hashes"),
          ("controlnets", "ControlNets"), ("controlnet_hashes", "ControlNet hashes"), ("ip_adapter", "IP-Adapter"),
          ("ip_adapter_hash", "IP-Adapter hash"), ("cache_interval", "Cache interval"), ("cache_branch", "Cache branch"),
          ("decoder", "Decoder"),
          ("version", "Version"))
KARRAS, UNIFORM, AUTOMATIC = "Karras", "Uniform", "Automatic"
AUTOMATIC_KARRAS = ("DPM++ 2M", "DPM++ SDE")  # A1111 samplers whose "Automatic" schedule is Karras'
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # Label: value | "quoted"
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, a colon or a new line."""
    text = _text(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return str(json.loads(text))
        except ValueError:
            return text
    return text


def _text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # CFG scale: 7, not 7.0
    return str(value)


def a1111_sampler(name: str) -> tuple[str, str | None]:
    """ldmkit sampler -> (A1111 sampler, schedule type or None): dpmpp_2m_karras -> ("DPM++ 2M",
    "Karras"); dpmpp_2m -> ("DPM++ 2M", "Uniform"), since A1111's "Automatic" for it is Karras."""
    if name not in SAMPLERS:
        return name, None
    info = SAMPLERS[name]
    if info.schedule_type:  # Karras, Exponential, Beta: A1111's "Schedule type"
        return info.a1111, info.schedule_type
    return info.label, UNIFORM if info.label in AUTOMATIC_KARRAS else None


def ldmkit_sampler(label: str, schedule: str | None = None, flow: bool = False) -> str | None:
    """A1111 sampler (+ schedule type) -> the ldmkit sampler, None when ldmkit has none like it.
    Old names with the schedule inside ("DPM++ 2M Karras") are read too; a missing schedule type is
    the sampler's plain grid, "Automatic" the sampler's default (Karras for DPM++ 2M)."""
    label, schedule = label.strip(), (schedule or "").strip() or None
    if label.endswith(" " + KARRAS) and schedule in (None, AUTOMATIC):
        label, schedule = label[: -len(KARRAS) - 1], KARRAS
    if schedule == AUTOMATIC:
        schedule = KARRAS if label in AUTOMATIC_KARRAS else None
    for name, info in SAMPLERS.items():
        mine, grid = a1111_sampler(name)
        if info.flow == flow and mine.lower() == label.lower() and (schedule or UNIFORM) == (grid or UNIFORM):
            return name
    return None


def infotext(meta: dict) -> str:
    """The `parameters` text of an image's metadata (ldmkit's keys)."""
    fields = []
    for key, label in LABELS:
        value = meta.get(key)
        if value in (None, ""):
            continue
        if key == "sampler":
            value, schedule = a1111_sampler(str(value))
            fields.append(f"Sampler: {quote(value)}")
            if schedule:
                fields.append(f"Schedule type: {schedule}")
            continue
        fields.append(f"{label}: {quote(value)}")
    negative = meta.get("negative_prompt")
    text = str(meta.get("prompt") or "") + (f"\nNegative prompt: {negative}" if negative else "")
    return f"{text}\n{', '.join(fields)}".strip()


def parse_infotext(text: str) -> dict:
    """An A1111 `parameters` text as {"Prompt", "Negative prompt", label: value ...}, with a size
    also as "Size-1" (width) and "Size-2" (height) -- A1111's `parse_generation_parameters` without
    the defaults it fills in for its own settings."""
    *lines, last = str(text).strip().split("\n")
    if len(_FIELD.findall(last)) < 3:  # no field line: everything is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for label, value in _FIELD.findall(last):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        size = _SIZE.match(value)
        if size:
            out[f"{label}-1"], out[f"{label}-2"] = size.group(1), size.group(2)
        out[label] = value
    return out


def settings_from_infotext(fields: dict, flow: bool = False) -> dict:
    """ldmkit metadata keys from parsed A1111 fields (`parse_infotext`); an A1111 sampler ldmkit does
    not have comes back as "a1111_sampler" (label, schedule type) instead of "sampler"."""
    out: dict = {"prompt": fields.get("Prompt", ""), "negative_prompt": fields.get("Negative prompt", "")}
    numbers = (("Steps", "steps", int), ("Seed", "seed", int), ("CFG scale", "guidance", float),
               ("Denoising strength", "strength", float), ("CFG rescale", "guidance_rescale", float),
               ("Cache interval", "cache_interval", int), ("Cache branch", "cache_branch", int))
    for label, key, kind in numbers:
        if label in fields:
            try:
                out[key] = kind(float(fields[label])) if kind is int else kind(fields[label])
            except ValueError:
                raise ValueError(f"infotext field {label}: {fields[label]!r} is not a number") from None
    if "Size-1" in fields:
        out["width"], out["height"] = int(fields["Size-1"]), int(fields["Size-2"])
    for label, key in (("Model", "model"), ("Model hash", "model_hash"), ("Class", "class")):
        if fields.get(label):
            out[key] = fields[label]
    if fields.get("Sampler"):
        name = ldmkit_sampler(fields["Sampler"], fields.get("Schedule type"), flow)
        if name is None:
            out["a1111_sampler"] = (fields["Sampler"], fields.get("Schedule type"))
        else:
            out["sampler"] = name
    return out


def png_settings(text_chunks: dict, flow: bool = False) -> tuple[dict, str]:
    """(settings in ldmkit's metadata keys, which chunk they came from) of a PNG's text chunks:
    ldmkit's own `ldmkit` JSON chunk, else an A1111 `parameters` chunk; ({}, "") when neither."""
    if "ldmkit" in text_chunks:
        meta = json.loads(text_chunks["ldmkit"])
        if not isinstance(meta, dict):
            raise ValueError("the ldmkit chunk is not a JSON object")
        if isinstance(meta.get("size"), str) and _SIZE.match(meta["size"]):
            w, h = _SIZE.match(meta["size"]).groups()
            meta = {**meta, "width": int(w), "height": int(h)}
        return meta, "ldmkit"
    if "parameters" in text_chunks:
        return settings_from_infotext(parse_infotext(text_chunks["parameters"]), flow), "parameters"
    return {}, ""
