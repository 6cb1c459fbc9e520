"""`ldm sample / img2img / inpaint / upscale` on tiny model folders written here (CPU, seconds):
outputs, metadata, determinism, and every bad-input case giving one line and exit code 2."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.cli import main
from ldmkit.conditioning import ClassConditioner, ClassConfig, TransformerTextEncoder
from ldmkit.diffusion.schedules import make_schedule
from ldmkit.io.format import save_model
from ldmkit.io.images import read_png_metadata

sys.path.insert(0, str(Path(__file__).parent))
from test_pipelines import make_autoencoder, make_image, make_unet  # noqa: E402

CAPTIONS = ["a red square", "a blue circle", "a green triangle on grey"]
CLASSES = ("circle", "square", "triangle")


def _index(conditioning, concat=None, **defaults):
    return {"schedule": make_schedule("sd15").to_dict(), "objective": "eps", "conditioning": conditioning,
            "concat": concat, "latent_size": [8, 8],
            "defaults": {"sampler": "ddim", "steps": 3, "guidance": 3.0, **defaults}}


def _text_encoder():
    torch.manual_seed(3)
    return TransformerTextEncoder.from_captions(CAPTIONS, width=32, depth=1, heads=2, max_length=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("models")
    save_model(root / "text", {"autoencoder": make_autoencoder(), "denoiser": make_unet(),
                               "conditioner": _text_encoder()}, _index("text"))
    save_model(root / "inpaint", {"autoencoder": make_autoencoder(), "denoiser": make_unet(in_channels=9),
                                  "conditioner": _text_encoder()}, _index("text", "inpaint"))
    save_model(root / "upscale", {"autoencoder": make_autoencoder(),
                                  "denoiser": make_unet(in_channels=7, cross=None)}, _index("none", "upscale"))
    save_model(root / "class", {"autoencoder": make_autoencoder(),
                                "denoiser": make_unet(cross=None, num_class_embeds=4),  # 3 classes + null
                                "conditioner": ClassConditioner(ClassConfig(3, class_names=CLASSES))},
               _index("class"))
    save_model(root / "uncond", {"autoencoder": make_autoencoder(), "denoiser": make_unet(cross=None)},
               _index("none"))
    img = (make_image()[0].permute(1, 2, 0).add(1).mul(127.5).round().byte().numpy())
    Image.fromarray(img).save(root / "in.png")
    Image.fromarray(img[:12, :12]).save(root / "small.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:16, :16]).save(root / "mask16.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def ldm(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sample_writes_pngs_with_metadata_json_and_grid(models, tmp_path, capsys):
    rc, out, err = ldm(capsys, "sample", "--model", models / "text", "--prompt", "a red square", "--num", 2,
                       "--seed", 5, "--out", tmp_path / "a", "--json", "--grid", "--no-progress")
    assert rc == 0, err
    records = json.loads(out)
    assert [r["seed"] for r in records] == [5, 6]
    for r in records:
        # defaults come from model_index.json: ddim, 3 steps, guidance 3.0; size from latent_size x f
        assert (r["sampler"], r["steps"], r["guidance"], r["size"], r["prompt"]) == \
            ("ddim", 3, 3.0, "32x32", "a red square")
        meta = read_png_metadata(r["file"])
        assert meta == {k: v for k, v in r.items() if k != "file"}
    assert (tmp_path / "a" / "grid-00002.png").is_file()
    weights = (models / "text" / "denoiser" / "model.safetensors").read_bytes()
    assert records[0]["model_hash"] == hashlib.sha256(weights).hexdigest()[:10]

    rc, out, _ = ldm(capsys, "sample", "--model", models / "text", "--prompt", "a red square", "--num", 2,
                     "--seed", 5, "--out", tmp_path / "b", "--batch-size", 1, "--no-progress")
    assert rc == 0
    again = out.split()
    for r, path in zip(records, again):  # same seed + settings + device -> the same image
        assert np.array_equal(np.asarray(Image.open(r["file"])), np.asarray(Image.open(path)))


def test_a1111_sampler_names_and_sigmas(models, tmp_path, capsys):
    """--sampler takes AUTOMATIC1111's names; --sigmas puts a sigma-based sampler on other levels; the PNGs
    record the sampler (its A1111 label and schedule type in the parameters chunk)."""
    runs = [(["--sampler", "DPM++ 2M Karras"], "dpmpp_2m_karras"), (["--sampler", "euler a"], "euler_a"),
            (["--sampler", "UniPC", "--sigmas", "exponential"], "unipc_exponential"),
            (["--sampler", "PLMS"], "pndm"), (["--sampler", "dpmpp_sde", "--sigmas", "karras"], "dpmpp_sde_karras")]
    for k, (flags, name) in enumerate(runs):
        rc, out, err = ldm(capsys, "sample", "--model", models / "text", "--prompt", "a red square", "--seed", 1,
                           "--out", tmp_path / f"r{k}", "--json", "--no-progress", *flags)
        assert rc == 0, err
        record = json.loads(out)[0]
        assert record["sampler"] == name and read_png_metadata(record["file"])["sampler"] == name


def test_outputs_are_never_overwritten_and_seed_minus_one_is_random(models, tmp_path, capsys):
    """A folder gets new numbers after the files already there; an existing .png name is refused unless
    --overwrite; the default --seed -1 draws a seed, stored in the PNG (the old `ldm sample` wrote
    outputs/00000-0.png on every run)."""
    runs = []
    for _ in range(2):
        rc, out, err = ldm(capsys, "sample", "--model", models / "text", "--prompt", "a red square",
                           "--out", tmp_path / "o", "--json", "--no-progress")
        assert rc == 0, err
        runs.append(json.loads(out)[0])
    assert [Path(r["file"]).name.split("-")[0] for r in runs] == ["00000", "00001"]
    assert runs[0]["seed"] != runs[1]["seed"]  # drawn, and recorded
    assert read_png_metadata(runs[1]["file"])["seed"] == runs[1]["seed"]
    assert Path(runs[1]["file"]).name == f"00001-{runs[1]['seed']}.png"
    before = (tmp_path / "o" / Path(runs[0]["file"]).name).read_bytes()
    target = tmp_path / "o" / Path(runs[0]["file"]).name
    rc, _, err = ldm(capsys, "sample", "--model", models / "text", "--prompt", "x", "--out", target, "--no-progress")
    assert rc == 2 and "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert target.read_bytes() == before
    rc, _, err = ldm(capsys, "sample", "--model", models / "text", "--prompt", "x", "--seed", 3, "--out", target,
                     "--overwrite", "--no-progress")
    assert rc == 0, err and read_png_metadata(target)["seed"] == 3


def test_class_and_unconditional_models(models, tmp_path, capsys):
    files = []
    for i, cls in enumerate(("square", "1", "2")):
        rc, out, err = ldm(capsys, "sample", "--model", models / "class", "--class", cls, "--seed", 4,
                           "--out", tmp_path / f"c{i}.png", "--json", "--no-progress")
        assert rc == 0, err
        files.append(np.asarray(Image.open(json.loads(out)[0]["file"])))
    assert np.array_equal(files[0], files[1]) and not np.array_equal(files[0], files[2])
    rc, out, err = ldm(capsys, "sample", "--model", models / "class", "--out", tmp_path, "--no-progress")
    assert rc == 2 and "pass a class" in err

    rc, out, err = ldm(capsys, "sample", "--model", models / "uncond", "--num", 2, "--out", tmp_path / "u",
                       "--json", "--no-progress")
    assert rc == 0, err
    records = json.loads(out)
    assert "prompt" not in records[0] and "guidance" not in records[0] and len(records) == 2


def test_prompts_file_and_explicit_settings(models, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red square\n\na blue circle\n")
    rc, out, err = ldm(capsys, "sample", "--model", models / "text", "--prompts-file", pf, "--seed", 1,
                       "--sampler", "dpmpp_2m", "--steps", 2, "--guidance", 5, "--guidance-rescale", 0.5,
                       "--height", 48, "--width", 40, "--negative-prompt", "grey", "--out", tmp_path / "x.png",
                       "--json", "--no-progress")
    assert rc == 0, err
    records = json.loads(out)
    assert [(r["prompt"], r["seed"]) for r in records] == [("a red square", 1), ("a blue circle", 2)]
    assert records[0]["size"] == "40x48" and records[0]["guidance_rescale"] == 0.5
    assert records[0]["negative_prompt"] == "grey" and records[0]["file"].endswith("x-0000.png")
    assert Image.open(records[1]["file"]).size == (40, 48)


def test_img2img_inpaint_upscale(models, tmp_path, capsys):
    rc, out, err = ldm(capsys, "img2img", "--model", models / "text", "--image", models / "in.png",
                       "--prompt", "a blue circle", "--strength", 0.5, "--out", tmp_path / "i.png", "--json",
                       "--no-progress")
    assert rc == 0, err
    assert json.loads(out)[0]["strength"] == 0.5 and Image.open(tmp_path / "i.png").size == (32, 32)

    for model, mode in (("text", "blend"), ("inpaint", "concat")):
        rc, out, err = ldm(capsys, "inpaint", "--model", models / model, "--image", models / "in.png",
                           "--mask", models / "mask.png", "--prompt", "a red square",
                           "--out", tmp_path / f"{model}.png", "--json", "--no-progress")
        assert rc == 0, err
        assert json.loads(out)[0]["inpaint_mode"] == mode

    rc, out, err = ldm(capsys, "upscale", "--model", models / "upscale", "--image", models / "small.png",
                       "--out", tmp_path / "up.png", "--json", "--no-progress")
    assert rc == 0, err
    assert Image.open(tmp_path / "up.png").size == (48, 48)  # 12 px x f = 4


def test_long_prompt_is_truncated_with_a_warning(models, tmp_path, capsys):
    rc, _, err = ldm(capsys, "sample", "--model", models / "text", "--prompt", " ".join(["a red square"] * 5),
                     "--out", tmp_path, "--no-progress")
    assert rc == 0
    assert err.count("warning:") == 1 and "truncated" in err


def _broken_model(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models / "text", broken)
    (broken / "denoiser" / "model.safetensors").unlink()
    return broken


ERRORS = [
    (["sample", "--model", "{m}/text", "--height", "30"], "height=30 must be a positive multiple of 4"),
    (["sample", "--model", "{m}/text", "--width", "0"], "--width=0 must be a positive"),
    (["inpaint", "--model", "{m}/text", "--image", "{m}/in.png", "--mask", "{m}/mask16.png"],
     "mask size 16x16 does not match the image size 32x32"),
    (["sample", "--model", "{t}/broken"], "model.safetensors is missing"),
    (["sample", "--model", "{t}/nowhere"], "not found"),
    (["img2img", "--model", "{m}/text", "--image", "{m}/in.png", "--strength", "1.5"],
     "--strength=1.5 is outside the allowed range [0, 1]"),
    (["inpaint", "--model", "{m}/text", "--image", "{m}/in.png", "--mask", "{m}/mask.png", "--strength", "-0.1"],
     "outside the allowed range [0, 1]"),
    (["sample", "--model", "{m}/text", "--sampler", "dpm_fast"],
     "unknown sampler 'dpm_fast'; expected one of ddpm, ddim, pndm, euler, euler_a, heun, lms, dpmpp_2m"),
    (["sample", "--model", "{m}/text", "--sigmas", "karras"], "sampler 'ddim' takes no sigmas 'karras'"),
    (["sample", "--model", "{m}/text", "--sampler", "LCM", "--sigmas", "beta"], "sampler 'lcm' takes no sigmas"),
    (["sample", "--model", "{m}/text", "--sampler", "DPM++ 2M Karras", "--sigmas", "beta"],
     "already runs on karras sigmas"),
    (["sample", "--model", "{m}/text", "--sampler", "flow_euler"], "valid samplers: ddpm, ddim"),
    (["img2img", "--model", "{m}/text", "--image", "{m}/corrupt.png"], "cannot read image"),
    (["img2img", "--model", "{m}/text", "--image", "{m}/missing.png"], "does not exist"),
    (["upscale", "--model", "{m}/upscale", "--image", "{m}/small.png", "--prompt", "x"], "unconditional"),
    (["img2img", "--model", "{m}/upscale", "--image", "{m}/in.png"], "supports upscale, not img2img"),
    (["sample", "--model", "{m}/text", "--class", "3"], "text-conditional"),
    (["sample", "--model", "{m}/text", "--prompts-file", "{t}/none.txt"], "does not exist"),
    (["sample", "--model", "{m}/text", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["sample", "--model", "{m}/text", "--device", "tpu:x"], "device"),
]
if not torch.cuda.is_available():
    ERRORS.append((["sample", "--model", "{m}/text", "--device", "cuda"], "device 'cuda' is not available"))


@pytest.mark.parametrize("argv,message", ERRORS, ids=[f"{a[0]}:{m[:30]}" for a, m in ERRORS])
def test_bad_input_is_one_line_and_exit_code_2(models, tmp_path, capsys, argv, message):
    _broken_model(models, tmp_path)
    argv = [a.format(m=models, t=tmp_path) for a in argv] + ["--out", str(tmp_path / "o"), "--no-progress"]
    rc, out, err = ldm(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm {argv[0]}: error:"), err
    assert message in lines[0]


def test_error_from_the_installed_command_has_no_traceback(models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldmkit.cli", "sample", "--model", str(models / "text"),
                           "--height", "30", "--out", str(tmp_path)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
