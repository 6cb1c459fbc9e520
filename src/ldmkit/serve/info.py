"""The routes that describe the server: samplers, models, options, LoRAs, ControlNets, PNG settings."""
from __future__ import annotations

import io

from fastapi import FastAPI

from ldmkit.serve.generate import MODULES, decode_base64, decode_image
from ldmkit.serve.requests import OptionsRequest, PngInfoRequest

SCHEDULERS = (("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
              ("beta", "Beta"))


def samplers(pipe) -> list[dict]:
    """A1111's sampler list for a model: one entry per A1111 name, ldmkit's names as aliases."""
    from ldmkit.diffusion.samplers import sampler_names
    from ldmkit.io.infotext import a1111_sampler

    out: dict[str, dict] = {}
    for name in sampler_names(pipe.schedule):
        label, schedule = a1111_sampler(name)
        out.setdefault(label, {"name": label, "aliases": [], "options": {}})["aliases"].append(name)
    return list(out.values())


def _defaults(pipe) -> dict:
    from ldmkit.io.infotext import a1111_sampler

    s = pipe.settings()
    label, schedule = a1111_sampler(s.sampler)
    return {"sampler": s.sampler, "sampler_name": label, "scheduler": schedule or "Automatic", "steps": s.steps,
            "cfg_scale": s.guidance, "width": s.width, "height": s.height}


def png_info(raw: bytes) -> dict:
    """A PNG's text chunks: A1111's `parameters` text, parsed, and ldmkit's settings."""
    from PIL import Image

    from ldmkit.io.infotext import parse_infotext, png_settings

    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        text = {str(k): str(v) for k, v in (getattr(img, "text", None) or {}).items()}
    settings, source = png_settings(text)
    info = text.get("parameters", "")
    return {"info": info, "items": {k: v for k, v in text.items() if k not in ("parameters", "ldmkit")},
            "parameters": parse_infotext(info) if info else {}, "ldmkit": settings, "source": source}


def add_info_routes(app: FastAPI) -> None:
    state = app.state

    @app.get("/sdapi/v1/samplers", tags=["info"])
    def get_samplers():
        return samplers(state.models.pipes[state.models.current])

    @app.get("/sdapi/v1/schedulers", tags=["info"])
    def get_schedulers():
        return [{"name": n, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for n, label in SCHEDULERS]

    @app.get("/sdapi/v1/sd-models", tags=["info"])
    def sd_models():
        return state.models.listing()

    @app.get("/sdapi/v1/loras", tags=["info"])
    def loras():
        return [{"name": n, "alias": n, "path": None, "metadata": {}} for n in state.models.loras()]

    @app.get("/sdapi/v1/options", tags=["info"])
    def get_options():
        m = state.models
        pipe = m.pipes[m.current]
        return {"sd_model_checkpoint": f"{m.current} [{pipe.model_hash}]", "sd_checkpoint_hash": pipe.model_hash,
                "samples_format": "png", "samples_save": True}

    @app.post("/sdapi/v1/options", tags=["info"])
    def set_options(req: OptionsRequest):
        """Only sd_model_checkpoint is read: the model requests use when they name none."""
        if req.sd_model_checkpoint is not None:
            state.models.current = state.models.find(req.sd_model_checkpoint)
        return {"sd_model_checkpoint": state.models.current, "ignored_fields": sorted((req.model_extra or {}).keys())}

    @app.post("/sdapi/v1/png-info", tags=["info"])
    def post_png_info(req: PngInfoRequest):
        decode_image(req.image, "image", state.limits, mode=None)  # a bad or huge image: 422 naming the field
        return png_info(decode_base64(req.image, "image"))

    @app.get("/ldmkit/v1/info", tags=["info"])
    def info():
        """Everything the page shows: models, the current model's samplers and defaults, LoRAs, ControlNets."""
        from ldmkit import __version__

        m = state.models
        pipe = m.pipes[m.current]
        lim = state.limits
        return {"version": __version__, "models": m.listing(), "current": m.current,
                "conditioning": pipe.conditioning, "tasks": pipe.tasks, "samplers": samplers(pipe),
                "schedulers": [label for _, label in SCHEDULERS], "defaults": _defaults(pipe),
                "size_multiple": pipe.size_multiple, "loras": sorted(m.loras()),
                "controlnets": sorted(m.controlnet_paths()), "controlnet_modules": list(MODULES),
                "limits": {"max_size": lim.max_size, "max_steps": lim.max_steps, "max_images": lim.max_images,
                           "max_body": lim.max_body}, "queue": state.queue.waiting}

    @app.get("/ldmkit/v1/health", tags=["info"])
    def health():
        return {"ok": True}
