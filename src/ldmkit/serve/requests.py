"""The request bodies of /sdapi/v1/txt2img and /img2img: AUTOMATIC1111's fields that ldmkit supports.

A field left out takes the model's default (model_index.json "defaults", then ldmkit's), where
A1111 has fixed ones (512 x 512, 50 steps, CFG 7). Fields ldmkit does not know are accepted and
listed in the response's `info` ("ignored_fields"); values of the wrong type or out of range are
HTTP 422 naming the field. `Limits` are the server's caps (`ldm serve --max-*`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class Limits:
    max_size: int = 2048  # pixels a side
    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter
    max_body: int = 32 << 20  # bytes of one request body
    max_pixels: int = 4096 * 4096  # of an uploaded image


class ControlUnit(BaseModel):
    """One entry of `alwayson_scripts.controlnet.args` (the A1111 ControlNet extension's fields)."""

    model_config = ConfigDict(extra="allow")
    enabled: bool = True
    model: str = Field(..., description="a ControlNet of --controlnet-dir, by name (\"name [hash]\" is read too)")
    image: str | None = Field(None, description="the control image, base64 (PNG / JPEG)")
    input_image: str | None = Field(None, description="older name of `image`")
    module: str = Field("none", description="preprocessor: none, canny, scribble, softedge")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    threshold_a: float | None = Field(None, description="canny: low threshold; scribble: threshold")
    threshold_b: float | None = Field(None, description="canny: high threshold")


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="A1111 syntax: (word:1.2), [word], "
                        "BREAK, <lora:name:weight>")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(-1, ge=-1, le=2**63 - 1, description="-1: random; image i uses seed + i")
    sampler_name: str | None = Field(None, description="A1111 name (\"DPM++ 2M\", \"Euler a\") or ldmkit's "
                                     "(\"dpmpp_2m_karras\")")
    sampler_index: str | None = Field(None, description="older name of sampler_name")
    scheduler: str | None = Field(None, description="schedule type: Automatic, Uniform, Karras, Exponential, Beta")
    batch_size: int = Field(1, ge=1, description="images per sampler run")
    n_iter: int = Field(1, ge=1, description="sampler runs")
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0.0, le=100.0)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    override_settings: dict | None = Field(None, description="only sd_model_checkpoint is read")
    send_images: bool = True
    save_images: bool = Field(True, description="also write the PNGs to the server's --out folder "
                              "(A1111's API default is false)")
    force_task_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-()]{1,64}$",
                                      description="the job's id, for GET /ldmkit/v1/jobs/{id}")
    alwayson_scripts: dict | None = Field(None, description="only `controlnet` is read")


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, max_length=1, description="the input image, base64")
    mask: str | None = Field(None, description="inpainting mask, base64: white = repaint")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: black = repaint")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)


class PngInfoRequest(BaseModel):
    image: str = Field(..., description="a PNG, base64")


class OptionsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None


class GenerationResponse(BaseModel):
    images: list[str]
    parameters: dict
    info: str


def ignored_fields(req: BaseModel) -> list[str]:
    """The request's fields ldmkit does not read (every unknown one, and the parts of
    alwayson_scripts / override_settings it skips)."""
    out = sorted((req.model_extra or {}).keys())
    for key in sorted((getattr(req, "alwayson_scripts", None) or {}).keys()):
        if key.lower() != "controlnet":
            out.append(f"alwayson_scripts.{key}")
    for key in sorted((getattr(req, "override_settings", None) or {}).keys()):
        if key != "sd_model_checkpoint":
            out.append(f"override_settings.{key}")
    return out


def check_limits(req: Txt2ImgRequest, limits: Limits) -> None:
    """The server's caps; a ValueError naming the field (HTTP 422)."""
    for name in ("width", "height"):
        v = getattr(req, name)
        if v is not None and v > limits.max_size:
            raise FieldError(name, f"{name}={v} is larger than this server's limit of {limits.max_size} pixels")
    if req.steps is not None and req.steps > limits.max_steps:
        raise FieldError("steps", f"steps={req.steps} is more than this server's limit of {limits.max_steps}")
    n = req.batch_size * req.n_iter
    if n > limits.max_images:
        raise FieldError("batch_size", f"batch_size x n_iter = {n} images; this server makes at most "
                         f"{limits.max_images} per request")


class FieldError(ValueError):
    """A bad value of one request field: HTTP 422 with the field named."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
