"""`ldm serve` against a real uvicorn server on 127.0.0.1 (a free port, started once for the module and
always stopped): the A1111 API with an HTTP client -- txt2img, img2img with a mask, progress with a
preview, interrupt, a queue of 8 concurrent requests, LoRAs and ControlNets by name, 20+ malformed
bodies -- and the guards (API key, host, origin) (CPU, demo-shapes, about 20 s)."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TIMEOUT = 60  # seconds any one request may take


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`ldm serve ARGS` on a free port; returns (process, base URL) once the page answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "ldmkit.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ldm serve exited with {proc.returncode}: {log.read_text()}")
        try:
            if requests.get(url + "/", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"ldm serve did not answer within 120 s: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def demo(one_thread):
    from ldmkit.pipelines import load

    return load("demo-shapes", device="cpu", dtype=torch.float32)


def _adapters(root: Path, pipe) -> tuple[Path, Path]:
    """A random LoRA and a random ControlNet that fit demo-shapes, in the folders the server lists."""
    from ldmkit.adapters.lora import LoRA, LoRALayer
    from ldmkit.denoisers.controlnet import ControlNet
    from ldmkit.io.adapter_files import write_lora
    from ldmkit.io.controlnet_files import write_controlnet

    g = torch.Generator().manual_seed(0)
    unet = pipe.denoiser.unet
    layers = {name: LoRALayer(torch.randn(2, m.weight.shape[1], generator=g) * 0.5,
                              torch.randn(m.weight.shape[0], 2, generator=g) * 0.5)
              for name, m in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))}
    lora_dir, cn_dir = root / "loras", root / "controlnets"
    write_lora(lora_dir / "tiny.safetensors", LoRA({"unet": layers}), "diffusers")
    net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96))  # 4x: the demo's factor
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    write_controlnet(cn_dir / "tiny-cn", net)
    return lora_dir, cn_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo):
    root = tmp_path_factory.mktemp("serve")
    lora_dir, cn_dir = _adapters(root, demo)
    second = root / "shapes-copy"  # a second model to switch to (the same weights under another name)
    import shutil

    from ldmkit.io import resolve_model_path

    shutil.copytree(resolve_model_path("demo-shapes"), second)
    proc, url = start_server(["--model", "demo-shapes", "--model", str(second), "--out", str(root / "out"),
                              "--lora-dir", str(lora_dir), "--controlnet-dir", str(cn_dir), "--device", "cpu",
                              "--max-size", "512", "--max-steps", "150", "--max-images", "8"], root / "server.log")
    try:
        yield {"url": url, "out": root / "out", "log": root / "server.log", "proc": proc}
    finally:
        stop_server(proc)


def post(server, path: str, body, **kw):
    return requests.post(server["url"] + path, json=body, timeout=kw.pop("timeout", TIMEOUT), **kw)


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ----------------------------------------------------------------------------- generation
def test_a1111_client_call_gets_images(server):
    # as AUTOMATIC1111's API wiki shows it
    response = requests.post(url=server["url"] + "/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 5},
                             timeout=TIMEOUT)
    r = response.json()
    assert response.status_code == 200, r
    image = image_of(r["images"][0])
    assert image.size == (32, 32) and "Steps: 5, Sampler: DPM++ 2M" in image.text["parameters"]
    info = json.loads(r["info"])
    assert info["steps"] == 5 and info["sd_model_name"] == "demo-shapes" and info["all_seeds"] == [info["seed"]]
    assert (server["out"] / info["files"][0]).is_file() and r["parameters"]["prompt"] == "a red circle"


def test_txt2img_matches_the_python_api_and_batches_seeds(server, demo):
    body = {"prompt": "a (blue:1.2) square BREAK a red circle", "negative_prompt": "a green triangle", "seed": 41,
            "steps": 4, "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "cfg_scale": 4, "restore_faces": False, "outpath_samples": "/tmp/elsewhere"}
    r = post(server, "/sdapi/v1/txt2img", body).json()
    info = json.loads(r["info"])
    assert info["all_seeds"] == [41, 42, 43, 44] and len(r["images"]) == 4 and len(set(info["files"])) == 4
    assert info["ignored_fields"] == ["outpath_samples", "restore_faces"] and not Path("/tmp/elsewhere").exists()
    assert info["ldmkit"][0]["sampler"] == "dpmpp_2m_karras"
    ours = demo.text2img(body["prompt"], negative_prompt=body["negative_prompt"], num=4, seed=41, steps=4,
                         sampler="dpmpp_2m_karras", guidance=4.0, batch_size=2, progress=False)
    for b64, result in zip(r["images"], ours):  # the API and the Python API: the same pixels (the server's
        # thread count may differ from this process's, and with it the float summation order: <= 2 grey levels)
        a = np.asarray(image_of(b64).convert("RGB")).astype(int)
        assert np.abs(a - np.asarray(result.image).astype(int)).max() <= 2
    again = json.loads(post(server, "/sdapi/v1/txt2img", body).json()["info"])
    assert not set(again["files"]) & set(info["files"])  # new names, nothing overwritten


def test_img2img_and_inpaint_with_a_mask(server):
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {"prompt": "a blue square", "init_images": [png_b64(init)], "denoising_strength": 0.6, "steps": 5,
            "seed": 3}
    r = post(server, "/sdapi/v1/img2img", body)
    assert r.status_code == 200, r.text
    meta = json.loads(r.json()["info"])["ldmkit"][0]
    assert meta["task"] == "img2img" and meta["strength"] == 0.6 and r.json()["parameters"]["init_images"] is None
    r = post(server, "/sdapi/v1/img2img", {**body, "mask": "data:image/png;base64," + png_b64(mask)})
    assert r.status_code == 200, r.text
    meta = json.loads(r.json()["info"])["ldmkit"][0]
    assert meta["task"] == "inpaint" and meta["inpaint_mode"] == "blend"
    assert image_of(r.json()["images"][0]).size == (32, 32)


def test_lora_and_controlnet_by_name(server):
    plain = {"prompt": "a red circle", "seed": 5, "steps": 4}
    base = post(server, "/sdapi/v1/txt2img", plain).json()["images"][0]
    r = post(server, "/sdapi/v1/txt2img", {**plain, "prompt": "a red circle <lora:tiny:1.5>"}).json()
    meta = json.loads(r["info"])["ldmkit"][0]
    assert meta["loras"] == "tiny:1.5" and meta["prompt"] == "a red circle" and r["images"][0] != base
    assert post(server, "/sdapi/v1/txt2img", plain).json()["images"][0] == base  # the weights came back
    control = Image.new("RGB", (32, 32), 0)
    control.paste((255, 255, 255), (4, 4, 28, 12))
    unit = {"model": "tiny-cn [0123abcd]", "module": "canny", "weight": 1.0, "image": png_b64(control)}
    r = post(server, "/sdapi/v1/txt2img", {**plain, "alwayson_scripts": {"controlnet": {"args": [unit]}}}).json()
    assert json.loads(r["info"])["ldmkit"][0]["controlnets"] == "tiny-cn:1" and r["images"][0] != base
    assert post(server, "/sdapi/v1/txt2img", plain).json()["images"][0] == base
    names = requests.get(server["url"] + "/ldmkit/v1/info", timeout=TIMEOUT).json()
    assert names["loras"] == ["tiny"] and names["controlnets"] == ["tiny-cn"]


def test_models_options_samplers_and_png_info(server):
    url = server["url"]
    models = requests.get(url + "/sdapi/v1/sd-models", timeout=TIMEOUT).json()
    assert [m["model_name"] for m in models] == ["demo-shapes", "shapes-copy"]
    assert {"DPM++ 2M", "Euler a", "DDIM"} <= {s["name"] for s in requests.get(url + "/sdapi/v1/samplers").json()}
    assert post(server, "/sdapi/v1/options", {"sd_model_checkpoint": models[1]["title"]}).status_code == 200
    try:
        assert requests.get(url + "/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("shapes-copy")
        r = post(server, "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 2})
        assert json.loads(r.json()["info"])["sd_model_name"] == "shapes-copy"
        assert post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"}).status_code == 422
    finally:
        post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "demo-shapes"})
    assert requests.get(url + "/docs", timeout=TIMEOUT).status_code == 200
    assert "/sdapi/v1/txt2img" in requests.get(url + "/openapi.json", timeout=TIMEOUT).json()["paths"]
    png = post(server, "/sdapi/v1/txt2img", {"prompt": "a (red:1.1) circle", "steps": 2, "seed": 9}).json()["images"][0]
    info = post(server, "/sdapi/v1/png-info", {"image": png}).json()
    assert info["parameters"]["Prompt"] == "a (red:1.1) circle" and info["parameters"]["Seed"] == "9"
    assert info["ldmkit"]["seed"] == 9 and info["source"] == "ldmkit"


# ----------------------------------------------------------------------------- the queue
def _long(task_id: str, steps: int = 150) -> dict:
    return {"prompt": "a red circle", "steps": steps, "width": 256, "height": 256, "seed": 1,
            "force_task_id": task_id}


def _wait_running(server, task_id: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = requests.get(f"{server['url']}/ldmkit/v1/jobs/{task_id}", timeout=TIMEOUT)
        if s.status_code == 200 and s.json()["state"] == "running" and s.json()["step"] > 0:
            return s.json()
        time.sleep(0.05)
    raise AssertionError(f"job {task_id} did not start")


def test_progress_with_preview_and_interrupt(server):
    with ThreadPoolExecutor(1) as pool:
        started = time.time()
        future = pool.submit(post, server, "/sdapi/v1/txt2img", _long("long-1"))
        _wait_running(server, "long-1")
        p = requests.get(server["url"] + "/sdapi/v1/progress", timeout=TIMEOUT).json()
        assert 0 < p["progress"] < 1 and p["state"]["job"] == "long-1" and p["state"]["sampling_steps"] == 150
        assert image_of(p["current_image"]).size == (256, 256)  # the decoded x0 prediction
        assert requests.post(server["url"] + "/sdapi/v1/interrupt", timeout=TIMEOUT).json()["interrupted"] == "long-1"
        r = future.result(timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]
    assert time.time() - started < 30
    assert requests.get(server["url"] + "/ldmkit/v1/jobs/long-1").json()["state"] == "cancelled"


def test_a_queue_of_8_concurrent_requests(server):
    with ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(post, server, "/sdapi/v1/txt2img", _long("blocker"))
        _wait_running(server, "blocker")
        futures = [pool.submit(post, server, "/sdapi/v1/txt2img",
                               {"prompt": f"a red circle {i}", "steps": 3, "seed": i, "force_task_id": f"q{i}"})
                   for i in range(8)]
        deadline = time.time() + 10
        while any(requests.get(f"{server['url']}/ldmkit/v1/jobs/q{i}").status_code == 404 for i in range(8)):
            assert time.time() < deadline, "the 8 requests did not all reach the queue"
            time.sleep(0.05)
        waiting = [requests.get(f"{server['url']}/ldmkit/v1/jobs/q{i}", timeout=TIMEOUT).json() for i in range(8)]
        assert all(w["state"] == "queued" and w["position"] >= 1 for w in waiting), waiting
        assert sorted(w["position"] for w in waiting) == list(range(1, 9))  # each sees its place
        assert requests.post(f"{server['url']}/ldmkit/v1/jobs/q3/cancel").json()["state"] == "cancelled"
        requests.post(f"{server['url']}/ldmkit/v1/jobs/blocker/cancel", timeout=TIMEOUT)
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert all(r.status_code == 200 for r in results)
    seeds = [json.loads(r.json()["info"]).get("all_seeds") for r in results]
    assert seeds == [[i] for i in range(3)] + [None] + [[i] for i in range(4, 8)]  # q3 was cancelled
    assert blocker.result().json()["images"] == []


def test_a_client_that_goes_away_cancels_its_job(server):
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(server, "/sdapi/v1/txt2img", _long("gone"), timeout=1.0)
    deadline = time.time() + 15
    while requests.get(server["url"] + "/ldmkit/v1/jobs/gone").json()["state"] != "cancelled":
        assert time.time() < deadline, "the job of a client that left was not cancelled"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- bad input
def _bomb() -> str:
    """A PNG whose header claims 30000 x 30000 pixels (a few hundred bytes)."""
    buf = io.BytesIO()
    Image.new("L", (30000, 30000 // 1000)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[20:24] = (30000).to_bytes(4, "big")  # IHDR height
    import zlib

    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return base64.b64encode(bytes(raw)).decode()


IMG = png_b64(Image.new("RGB", (32, 32)))
MALFORMED = [  # (path, body or raw bytes, the field the 422 must name or None)
    ("txt2img", b"{not json", None),
    ("txt2img", [1, 2, 3], None),
    ("txt2img", {"prompt": 123}, "prompt"),
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"steps": 100000}, "steps"),
    ("txt2img", {"width": 100000}, "width"),
    ("txt2img", {"height": 30}, None),
    ("txt2img", {"batch_size": 1000}, "batch_size"),
    ("txt2img", b"{\"cfg_scale\": 1e400}", "cfg_scale"),
    ("txt2img", {"seed": -5}, "seed"),
    ("txt2img", {"seed": 2**70}, "seed"),
    ("txt2img", {"sampler_name": "DPM2"}, "sampler_name"),
    ("txt2img", {"prompt": "x" * 30000}, "prompt"),
    ("txt2img", {"prompt": "a <lora:../../etc/passwd:1>"}, "prompt"),
    ("txt2img", {"force_task_id": "../../x"}, "force_task_id"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, None),
    ("txt2img", {"alwayson_scripts": {"controlnet": {"args": [{"model": "../x", "image": IMG}]}}},
     "alwayson_scripts"),
    ("txt2img", {"alwayson_scripts": {"controlnet": {"args": [{"model": "tiny-cn", "image": "!!"}]}}},
     "alwayson_scripts"),
    ("txt2img", b"[" * 100000 + b"]" * 100000, None),
    ("img2img", {"prompt": "x"}, "init_images"),
    ("img2img", {"init_images": []}, "init_images"),
    ("img2img", {"init_images": ["not base64!!"]}, "init_images"),
    ("img2img", {"init_images": [base64.b64encode(b"hello").decode()]}, "init_images"),
    ("img2img", {"init_images": [_bomb()]}, "init_images"),
    ("img2img", {"init_images": [IMG], "mask": "%%%"}, "mask"),
    ("img2img", {"init_images": [IMG], "denoising_strength": 2}, "denoising_strength"),
    ("png-info", {"image": "nope"}, "image"),
]


def test_malformed_bodies_get_4xx_and_the_server_keeps_serving(server):
    url = server["url"] + "/sdapi/v1/"
    for path, body, field in MALFORMED:
        if isinstance(body, bytes):
            r = requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        else:
            r = requests.post(url + path, json=body, timeout=TIMEOUT)
        assert 400 <= r.status_code < 500, (path, str(body)[:80], r.status_code, r.text[:300])
        if field is not None:
            locs = [".".join(str(p) for p in e["loc"]) for e in r.json()["detail"]]
            assert any(field in loc for loc in locs), (field, r.json())
    big = b'{"prompt": "' + b"a" * (50 << 20) + b'"}'  # 50 MB
    r = requests.post(url + "txt2img", data=big, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 413
    assert post(server, "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 2}).status_code == 200
    assert server["proc"].poll() is None


def test_guards_host_origin_and_key(server):
    url = server["url"] + "/sdapi/v1/txt2img"
    r = requests.post(url, json={"steps": 1}, headers={"Origin": "http://evil.example"}, timeout=TIMEOUT)
    assert r.status_code == 403
    r = requests.get(server["url"] + "/sdapi/v1/samplers", headers={"Host": "evil.example:80"}, timeout=TIMEOUT)
    assert r.status_code == 421  # DNS rebinding: only loopback host names on a loopback bind
    from starlette.requests import Request

    from ldmkit.serve.guards import check_request, key_matches

    def request(host: str, method: str = "GET", origin: str | None = None):
        headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin else [])
        return Request({"type": "http", "method": method, "path": "/sdapi/v1/txt2img", "headers": headers})

    assert check_request(request("[::1]:7860"), None, True) is None
    assert check_request(request("proxy.example"), None, True)[0] == 421
    assert check_request(request("proxy.example", "POST", "https://proxy.example"), None, True,
                         ("proxy.example",)) is None
    assert check_request(request("proxy.example", "POST", "null"), None, True, ("proxy.example",))[0] == 403
    assert check_request(request("10.0.0.5:7860"), "k" * 8, False)[0] == 401

    key = "s3cret-key"
    assert key_matches({"authorization": f"Bearer {key}"}, key)
    assert key_matches({"x-api-key": key}, key)
    assert key_matches({"authorization": "Basic " + base64.b64encode(f"user:{key}".encode()).decode()}, key)
    assert not key_matches({"authorization": "Bearer nope"}, key) and not key_matches({}, key)
    assert not key_matches({"authorization": "Basic %%%"}, key)


def test_non_loopback_bind_needs_a_key(tmp_path, capsys):
    from ldmkit.cli import main

    env = {k: v for k, v in os.environ.items() if k != "LDM_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "ldmkit.cli", "serve", "--model", "demo-shapes", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--api-key" in r.stderr
    assert main(["serve", "--model", "demo-shapes", "--api-key", "short"]) == 2
    assert "at least 8 characters" in capsys.readouterr().err


def test_api_key_on_a_real_server(tmp_path):
    key = "a-long-test-key"
    proc, url = start_server(["--model", "demo-shapes", "--out", str(tmp_path / "out")], tmp_path / "log",
                             env={"LDM_API_KEY": key})
    try:
        assert requests.get(url + "/", timeout=TIMEOUT).status_code == 200  # the page itself is open
        assert requests.get(url + "/sdapi/v1/sd-models", timeout=TIMEOUT).status_code == 401
        assert requests.get(url + "/docs", timeout=TIMEOUT).status_code == 401
        r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2}, auth=("me", key),
                          timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert requests.get(url + "/openapi.json", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        stop_server(proc)
