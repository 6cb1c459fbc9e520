"""`ldm serve` (registered by ldmkit.cli): load the models once, then answer HTTP until Ctrl-C.

    ldm serve --model demo-shapes [--model M2 ...] [--host 127.0.0.1] [--port 7860] [--out outputs]
              [--lora-dir DIR] [--controlnet-dir DIR] [--api-key KEY | env LDM_API_KEY]

Binding anything but the loopback needs an API key: the command refuses to start without one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub, argv: list[str] | None = None) -> None:
    p = sub.add_parser("serve", help="HTTP API (AUTOMATIC1111-compatible) and a web page over loaded models")
    p.add_argument("--model", action="append", required=True, metavar="PATH",
                   help="a model to load and keep loaded (folder, single file or bundled name); repeat for several; "
                   "the first is the default")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "any other needs --api-key)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as AUTOMATIC1111)")
    p.add_argument("--api-key", default=None, help="key every API request must carry (default: env LDM_API_KEY)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name a loopback bind answers to besides localhost (a reverse proxy's); repeat")
    p.add_argument("--out", default="outputs", help="folder the generated PNGs are written to (NNNNN-SEED.png)")
    p.add_argument("--lora-dir", default=None, help="folder of LoRA files requests may name (<lora:name:weight>)")
    p.add_argument("--controlnet-dir", default=None, help="folder of ControlNets (diffusers folders or single "
                   "files) requests may name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on CUDA)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument("--max-size", type=int, default=2048, help="largest width / height in pixels (default 2048)")
    p.add_argument("--max-steps", type=int, default=150, help="most sampler steps per request (default 150)")
    p.add_argument("--max-images", type=int, default=16, help="most images per request, batch_size x n_iter "
                   "(default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting (default 64; more: HTTP 503)")
    p.set_defaults(func=run)


def check_args(args) -> str | None:
    """Checks before anything loads; returns the API key (None: none needed and none given)."""
    from ldmkit.errors import UserError
    from ldmkit.serve.guards import is_loopback

    key = args.api_key if args.api_key is not None else os.environ.get("LDM_API_KEY") or None
    if key is not None and (len(key) < 8 or any(c.isspace() for c in key)):
        raise UserError("--api-key must be at least 8 characters without spaces")
    if not is_loopback(args.host) and key is None:
        raise UserError(f"--host {args.host} is reachable from other machines; give --api-key KEY (or set "
                        "LDM_API_KEY), or bind 127.0.0.1")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is outside [1, 65535]")
    for name in args.allowed_host:
        if not name or any(c in name for c in "/:@ \t"):
            raise UserError(f"--allowed-host {name!r} must be a bare host name (no scheme, port or path)")
    for flag in ("lora_dir", "controlnet_dir"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"--{flag.replace('_', '-')} {folder} is not a folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    for flag, lo in (("max_size", 8), ("max_steps", 1), ("max_images", 1), ("max_queue", 1)):
        if getattr(args, flag) < lo:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= {lo}")
    if not 0 < args.max_body_mb <= 4096:
        raise UserError(f"--max-body-mb {args.max_body_mb} is outside (0, 4096]")
    return key


def run(args) -> int:
    import uvicorn

    from ldmkit.serve.app import create_app
    from ldmkit.serve.guards import BodyLimit, is_loopback
    from ldmkit.serve.jobs import JobQueue
    from ldmkit.serve.models import ModelSet
    from ldmkit.serve.requests import Limits

    key = check_args(args)
    models = ModelSet(args.model, args.device, args.dtype, args.lora_dir, args.controlnet_dir,
                      log=lambda line: print(line, file=sys.stderr))
    limits = Limits(args.max_size, args.max_steps, args.max_images, int(args.max_body_mb * (1 << 20)))
    queue = JobQueue(args.max_queue)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    app = create_app(models, queue, Path(args.out), limits, key, loopback=is_loopback(args.host),
                     hosts=tuple(args.allowed_host))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"ldm serve: http://{host}:{args.port}/ (API docs: /docs){' -- API key required' if key else ''}",
          file=sys.stderr)
    try:
        uvicorn.run(BodyLimit(app, limits.max_body), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        queue.close()
    return 0
