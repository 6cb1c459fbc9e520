"""The FastAPI app of `ldm serve`: AUTOMATIC1111's /sdapi/v1 routes, ldmkit's /ldmkit/v1 job routes, the page.

    POST /sdapi/v1/txt2img, /img2img     generate (queued; the call returns when the images are made)
    GET  /sdapi/v1/progress              the running job: progress, eta, a preview of its x0 prediction
    POST /sdapi/v1/interrupt             stop the running job
    GET  /sdapi/v1/samplers, /schedulers, /sd-models, /loras
    GET|POST /sdapi/v1/options           sd_model_checkpoint: the model requests use by default
    POST /sdapi/v1/png-info              the settings a PNG carries
    GET  /ldmkit/v1/info                 what the page needs: models, samplers, defaults, LoRAs, ControlNets
    GET  /ldmkit/v1/jobs/{id}            one job: queued (its position), running (progress, preview), done
    POST /ldmkit/v1/jobs/{id}/cancel
    GET  /                               the page; /docs the OpenAPI schema
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import traceback
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ldmkit.serve import guards
from ldmkit.serve.generate import run_request
from ldmkit.serve.jobs import JobQueue, QueueFull
from ldmkit.serve.requests import (FieldError, GenerationResponse, Img2ImgRequest, Limits, Txt2ImgRequest,
                                   check_limits)

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("ldmkit.serve")


def _detail(field: str | None, message: str) -> dict:
    return {"detail": [{"loc": ["body", *field.split(".")] if field else ["body"], "msg": message,
                        "type": "value_error"}]}


def create_app(models, queue: JobQueue, out: Path, limits: Limits = Limits(), api_key: str | None = None,
               loopback: bool = True, hosts: tuple = ()) -> FastAPI:
    """The app over loaded `models` and a `queue`; images go to `out`; `hosts`: Host names a loopback
    bind answers to besides the loopback's."""
    from ldmkit import __version__

    app = FastAPI(title="ldmkit serve", version=__version__,
                  description="AUTOMATIC1111-compatible API of ldmkit (docs/serve.md)")
    app.state.models, app.state.queue, app.state.out, app.state.limits = models, queue, Path(out), limits

    app.add_middleware(guards.Guard, api_key=api_key, loopback=loopback, hosts=tuple(hosts))
    _errors(app)
    _generation_routes(app)
    _info_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(FieldError)
    async def field_error(request, exc: FieldError):
        return JSONResponse(_detail(exc.field, str(exc)), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(RecursionError)
    async def too_deep(request, exc):
        return JSONResponse(_detail(None, "the request body is nested too deeply"), status_code=400)

    @app.exception_handler(KeyError)
    async def unknown_name(request, exc: KeyError):
        return JSONResponse(_detail(None, str(exc.args[0]) if exc.args else "unknown name"), status_code=422)


async def _wait(request: Request, job, queue: JobQueue) -> None:
    """Until the job is finished; a client that goes away cancels its job."""
    ticks = 0
    while not job.done.is_set():
        await asyncio.sleep(0.05)
        ticks += 1
        if ticks % 10 == 0 and await request.is_disconnected():
            queue.cancel(job)
            return


def _job_result(job, req) -> JSONResponse | dict:
    from ldmkit.errors import UserError

    if job.state == "done":
        return job.result
    if job.state == "cancelled":
        return {"images": [], "parameters": req.model_dump(exclude={"init_images", "mask"}),
                "info": json.dumps({"interrupted": True, "task_id": job.id})}
    err = job.error
    if isinstance(err, FieldError):
        return JSONResponse(_detail(err.field, str(err)), status_code=422)
    if isinstance(err, KeyError):
        return JSONResponse(_detail(None, str(err.args[0]) if err.args else "unknown name"), status_code=422)
    if isinstance(err, (UserError, ValueError, FileNotFoundError)):
        return JSONResponse(_detail(None, str(err)), status_code=422)
    log.error("job %s failed:\n%s", job.id, "".join(traceback.format_exception(err)))
    return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"}, status_code=500)


def _generation_routes(app: FastAPI) -> None:
    state = app.state

    async def generate(request: Request, req: Txt2ImgRequest):
        check_limits(req, state.limits)
        # the model is fixed now (an unknown one: 422 at once), whatever the current model is when the job runs
        name = state.models.find((req.override_settings or {}).get("sd_model_checkpoint"))
        try:
            job = state.queue.submit(lambda job: run_request(job, req, state.models, state.out, state.limits, name),
                                     req.force_task_id)
        except QueueFull as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        except ValueError as exc:
            return JSONResponse(_detail("force_task_id", str(exc)), status_code=409)
        await _wait(request, job, state.queue)
        return _job_result(job, req)

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse, tags=["generate"])
    async def txt2img(request: Request, req: Txt2ImgRequest):
        """Text to image. Unset fields take the model's defaults; unknown fields are listed in info."""
        return await generate(request, req)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse, tags=["generate"])
    async def img2img(request: Request, req: Img2ImgRequest):
        """Image to image (`init_images`, `denoising_strength`), inpainting with a `mask` (white = repaint)."""
        return await generate(request, req)

    @app.get("/sdapi/v1/progress", tags=["jobs"])
    def progress(skip_current_image: bool = False):
        job, queue = state.queue.current, state.queue
        image = None if job is None or skip_current_image else job.preview_png()
        return {"progress": job.progress if job else 0.0, "eta_relative": (job.eta or 0.0) if job else 0.0,
                "state": {"skipped": False, "interrupted": bool(job and job.cancel_requested),
                          "job": job.id if job else "", "job_count": queue.waiting + (job is not None),
                          "job_timestamp": "", "job_no": 0, "sampling_step": job.calls if job else 0,
                          "sampling_steps": job.steps * job.batches if job else 0},
                "current_image": base64.b64encode(image).decode() if image else None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt", tags=["jobs"])
    def interrupt():
        """Stop the running job at its next sampler step (its request answers with no images)."""
        job = state.queue.current
        if job is not None:
            state.queue.cancel(job)
        return {"interrupted": job.id if job else None}

    @app.get("/ldmkit/v1/jobs/{task_id}", tags=["jobs"])
    def job_status(task_id: str, preview: bool = False):
        job = state.queue.get(task_id)
        if job is None:
            return JSONResponse({"detail": f"no job {task_id!r}"}, status_code=404)
        image = job.preview_png() if preview and job.state == "running" else None
        error = None if job.error is None else str(job.error)
        return {"id": job.id, "state": job.state, "position": state.queue.position(job), "progress": job.progress,
                "eta": job.eta, "step": job.calls, "steps": job.steps * job.batches, "error": error,
                "preview": base64.b64encode(image).decode() if image else None}

    @app.post("/ldmkit/v1/jobs/{task_id}/cancel", tags=["jobs"])
    def cancel(task_id: str):
        job = state.queue.get(task_id)
        if job is None:
            return JSONResponse({"detail": f"no job {task_id!r}"}, status_code=404)
        state.queue.cancel(job)
        return {"id": job.id, "state": job.state}


def _info_routes(app: FastAPI) -> None:
    from ldmkit.serve.info import add_info_routes

    add_info_routes(app)
