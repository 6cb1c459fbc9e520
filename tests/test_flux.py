"""FLUX.1 end to end: diffusers FluxPipeline folders (dev: distilled guidance, dynamic shift; schnell: no guidance)
load into ldmkit and give diffusers' images for the same seed (random tiny models built with diffusers)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

PROMPT, SIZE = "a red cat", dict(height=32, width=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("flux")
    im.build_flux_pipeline(dev=True, workdir=root).save_pretrained(root / "dev")
    im.build_flux_pipeline(dev=False, seed=1, workdir=root).save_pretrained(root / "schnell")
    return root


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_text2img_matches_flux_pipeline(models, kind):
    from diffusers import FluxPipeline

    from ldmkit.pipelines import load

    ref = FluxPipeline.from_pretrained(models / kind)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32, **SIZE)

    def run(output_type):
        return ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type=output_type, **kw).images
    want, latents = (run("np")[0] * 255).round().astype(np.uint8), run("latent")
    pipe = load(models / kind, device="cpu", dtype=torch.float32, max_sequence_length=32)
    assert pipe.denoiser.guidance_mode == ("distilled" if kind == "dev" else "none")
    image = pipe.text2img(PROMPT, seed=3, steps=4, guidance=3.5, progress=False, **SIZE)[0].image
    z = pipe.sample_latents(pipe.settings(steps=4, guidance=3.5, progress=False, **SIZE), [PROMPT], None, [3])
    packed = ref._pack_latents(z, 1, 16, 16, 16)
    p, rel = psnr(image, want), float((packed - latents).abs().max() / latents.abs().max())
    print(f"FLUX ({kind}): PSNR {p:.1f} dB, latents {rel:.1e}")
    assert p >= 40 and rel <= 1e-3, (p, rel)


def test_flux_guidance_rules(models):
    from ldmkit.errors import UserError
    from ldmkit.pipelines import load

    dev = load(models / "dev", device="cpu", dtype=torch.float32, max_sequence_length=32)
    kw = dict(seed=1, steps=2, progress=False, **SIZE)
    a = dev.text2img(PROMPT, guidance=2.0, **kw)[0].image
    b = dev.text2img(PROMPT, guidance=5.0, **kw)[0].image
    assert psnr(a, b) < 60  # the distilled guidance is an input of the network
    with pytest.raises(UserError, match="not classifier-free guidance"):
        dev.text2img(PROMPT, negative_prompt="blurry", **kw)
    schnell = load(models / "schnell", device="cpu", dtype=torch.float32, max_sequence_length=32)
    assert schnell.settings(guidance=7.0).guidance == 1.0  # no guidance of any kind
    with pytest.raises(ValueError, match="multiple of"):
        schnell.settings(height=34, width=32)  # 2x2 packing: sides in multiples of 2 latent pixels (4 px here)


def test_img2img_matches_flux_img2img_pipeline(models):
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    from ldmkit.pipelines import load

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ref = FluxImg2ImgPipeline.from_pretrained(models / "dev")
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=3.5, max_sequence_length=32,
               generator=torch.Generator().manual_seed(3), output_type="np", **SIZE).images[0]
    pipe = load(models / "dev", device="cpu", dtype=torch.float32, max_sequence_length=32)
    got = pipe.img2img(init, PROMPT, strength=0.6, seed=3, steps=5, guidance=3.5, posterior="sample",
                       progress=False)[0].image
    p = psnr(got, (want * 255).round().astype(np.uint8))
    print(f"FLUX img2img: PSNR {p:.1f} dB")
    assert p >= 40, p


def test_ldm_convert_writes_a_folder_flux_pipeline_runs(models, tmp_path):
    from diffusers import FluxPipeline

    from ldmkit.cli import main
    from ldmkit.pipelines import load

    assert main(["convert", "--from", str(models / "dev"), "--to", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--from", str(tmp_path / "ours"), "--to", str(tmp_path / "back"), "--format",
                 "diffusers"]) == 0
    ref = FluxPipeline.from_pretrained(tmp_path / "back")
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", guidance_scale=3.5,
               max_sequence_length=32, num_inference_steps=3, **SIZE).images[0]
    got = load(models / "dev", device="cpu", dtype=torch.float32, max_sequence_length=32).text2img(
        PROMPT, seed=3, steps=3, guidance=3.5, progress=False, **SIZE)[0].image
    assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40
