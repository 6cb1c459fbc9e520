"""PNG metadata in AUTOMATIC1111's shape (io/infotext.py): the `parameters` text with A1111's names and
quoting, its parser on strings shaped like A1111's, the sampler names both ways, `ldm sample
--from-png`, random seeds and output names that are never reused (CPU, seconds)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldmkit.cli import main
from ldmkit.io.images import read_png_metadata, reserve_numbered, save_png
from ldmkit.io.infotext import (a1111_sampler, infotext, ldmkit_sampler, parse_infotext, png_settings, quote,
                                settings_from_infotext)

META = {"task": "text2img", "prompt": "a (red:1.2) circle, big", "negative_prompt": "blurry, low quality",
        "seed": 1234, "sampler": "dpmpp_2m_karras", "steps": 20, "guidance": 7.0, "size": "512x768",
        "model_hash": "fa33078044", "model": "demo-shapes", "lora_hashes": "a: 0123456789ab, b: ba9876543210",
        "version": "ldmkit 0.1.0"}


def test_infotext_names_and_quoting():
    text = infotext(META)
    prompt, negative, fields = text.split("\n")
    assert prompt == "a (red:1.2) circle, big" and negative == "Negative prompt: blurry, low quality"
    assert fields == ('Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, '
                      'Size: 512x768, Model hash: fa33078044, Model: demo-shapes, '
                      'Lora hashes: "a: 0123456789ab, b: ba9876543210", Version: ldmkit 0.1.0')
    assert quote("plain") == "plain" and quote('say "a, b"') == '"say \\"a, b\\""' and quote(7.5) == "7.5"
    assert "Schedule type: Uniform" in infotext({**META, "sampler": "dpmpp_2m"})  # A1111's Automatic is Karras
    assert "Schedule type" not in infotext({**META, "sampler": "euler_a"})
    assert infotext({"prompt": "x", "strength": 0.6}) == "x\nDenoising strength: 0.6"


A1111_TEXT = """girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish)
, detailed, intricate
Negative prompt: ugly, (((deformed))), [blurry],
bad anatomy
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 965400086, Size: 512x640, \
Model hash: 45dee52b, Model: v1-5-pruned, Denoising strength: 0.55, Lora hashes: "add_detail: 7c6bad76eb54, \
x: 1", TI hashes: "bad-hands: \\"q\\"", Version: v1.10.1"""


def test_parse_a1111_infotext():
    d = parse_infotext(A1111_TEXT)
    assert d["Prompt"] == ("girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), "
                           "(coquettish)\n, detailed, intricate")
    assert d["Negative prompt"] == "ugly, (((deformed))), [blurry],\nbad anatomy"
    assert (d["Steps"], d["Sampler"], d["CFG scale"], d["Seed"]) == ("20", "Euler a", "7", "965400086")
    assert (d["Size-1"], d["Size-2"], d["Model hash"], d["Model"]) == ("512", "640", "45dee52b", "v1-5-pruned")
    assert d["Lora hashes"] == "add_detail: 7c6bad76eb54, x: 1" and d["TI hashes"] == 'bad-hands: "q"'
    s = settings_from_infotext(d)
    assert (s["sampler"], s["steps"], s["guidance"], s["seed"], s["width"], s["height"], s["strength"]) == \
        ("euler_a", 20, 7.0, 965400086, 512, 640, 0.55)
    # fewer than three fields on the last line: it is part of the prompt
    assert parse_infotext("a cat\nSteps: 5") == {"Prompt": "a cat\nSteps: 5", "Negative prompt": ""}
    assert parse_infotext("just a prompt")["Prompt"] == "just a prompt"


def test_infotext_round_trip():
    s = settings_from_infotext(parse_infotext(infotext(META)))
    for key in ("prompt", "negative_prompt", "seed", "sampler", "steps", "guidance", "model_hash", "model"):
        assert s[key] == META[key], key
    assert (s["width"], s["height"]) == (512, 768)


@pytest.mark.parametrize("label,schedule,flow,name", [
    ("DPM++ 2M", "Karras", False, "dpmpp_2m_karras"), ("DPM++ 2M Karras", None, False, "dpmpp_2m_karras"),
    ("DPM++ 2M", "Automatic", False, "dpmpp_2m_karras"), ("DPM++ 2M", None, False, "dpmpp_2m"),
    ("DPM++ 2M", "Uniform", False, "dpmpp_2m"), ("Euler a", None, False, "euler_a"), ("euler", None, False, "euler"),
    ("Euler", "Automatic", True, "flow_euler"), ("Heun", None, True, "flow_heun"), ("DDIM", None, False, "ddim"),
    ("UniPC", None, False, "unipc"), ("DPM2", None, False, None), ("DPM++ 2M", "Exponential", False, "dpmpp_2m_exponential"),
    ("Euler a", None, True, None)])
def test_sampler_names_both_ways(label, schedule, flow, name):
    assert ldmkit_sampler(label, schedule, flow) == name
    if name is not None and (schedule or "Automatic") != "Automatic" and " Karras" not in label:
        assert a1111_sampler(name) == (label, schedule)


def test_png_chunks(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", META)
    with Image.open(path) as im:
        assert set(im.text) == {"ldmkit", "parameters"}  # no `prompt` chunk: ComfyUI would parse it as JSON
        assert im.text["parameters"] == infotext(META)
    assert read_png_metadata(path) == META
    settings, source = png_settings({"parameters": infotext(META)})
    assert source == "parameters" and settings["sampler"] == "dpmpp_2m_karras"
    assert png_settings({"Software": "x"}) == ({}, "")


def test_reserved_names_are_never_reused(tmp_path):
    (tmp_path / "00007-1.png").write_bytes(b"x")
    paths, grid = reserve_numbered(tmp_path, [5, 6], grid=True)
    assert [p.name for p in paths] == ["00008-5.png", "00009-6.png"] and grid.name == "grid-00010.png"
    got, lock = [], threading.Lock()

    def take():
        p, _ = reserve_numbered(tmp_path, [1, 2, 3])
        with lock:
            got.extend(p)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 24 and all(p.exists() for p in got)
    assert (tmp_path / "00007-1.png").read_bytes() == b"x"


def _ldm(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_random_seed_batches_and_from_png(tmp_path, capsys, one_thread):
    common = ["--model", "demo-shapes", "--steps", "3", "--no-progress", "--json"]
    rc, out, err = _ldm(capsys, "sample", *common, "--prompt", "a (red:1.2) circle, [blue] square", "--num", "2",
                        "--sampler", "dpmpp_2m_karras", "--out", tmp_path / "a")
    assert rc == 0, err
    records = json.loads(out)
    seed = records[0]["seed"]
    assert f"random seed {seed}" in err and records[1]["seed"] == seed + 1
    assert [r["file"].rsplit("/", 1)[1] for r in records] == [f"00000-{seed}.png", f"00001-{seed + 1}.png"]
    # --from-png with the ldmkit chunk: the same image again, under a new name
    rc, out, err = _ldm(capsys, "sample", "--model", "demo-shapes", "--from-png", records[1]["file"], "--out",
                        tmp_path / "a", "--json", "--no-progress")
    again = json.loads(out)[0]
    assert rc == 0 and again["seed"] == seed + 1 and again["file"].endswith(f"00002-{seed + 1}.png")
    a, b = (np.asarray(Image.open(r["file"])).astype(int) for r in (again, records[1]))
    assert np.abs(a - b).max() <= 1  # alone vs in a batch of 2: float summation order (generation.md)
    # an A1111 parameters chunk, with a flag that wins over the file
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a blue square\nNegative prompt: a red circle\nSteps: 4, Sampler: DPM++ 2M, "
                  "Schedule type: Karras, CFG scale: 2.5, Seed: 77, Size: 32x32, Model hash: 0123456789")
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=info)
    rc, out, err = _ldm(capsys, "sample", "--model", "demo-shapes", "--from-png", tmp_path / "a1111.png",
                        "--steps", "2", "--out", tmp_path / "b", "--json", "--no-progress")
    r = json.loads(out)[0]
    assert rc == 0 and (r["prompt"], r["negative_prompt"], r["seed"], r["sampler"], r["guidance"], r["steps"]) == \
        ("a blue square", "a red circle", 77, "dpmpp_2m_karras", 2.5, 2)
    assert "was made with model" in err  # another model's hash: a warning
    bad = PngImagePlugin.PngInfo()
    bad.add_text("parameters", "x\nSteps: 4, Sampler: DPM2, CFG scale: 7, Seed: 1, Size: 32x32")
    Image.new("RGB", (32, 32)).save(tmp_path / "dpm2.png", pnginfo=bad)
    Image.new("RGB", (32, 32)).save(tmp_path / "none.png")
    for name, message in (("dpm2.png", "sampler 'DPM2' has no ldmkit equivalent"),
                          ("none.png", "no ldmkit or A1111 `parameters` chunk"), ("missing.png", "does not exist")):
        rc, _, err = _ldm(capsys, "sample", "--model", "demo-shapes", "--from-png", tmp_path / name, "--out",
                          tmp_path / "c")
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
