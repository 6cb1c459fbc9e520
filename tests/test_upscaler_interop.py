"""diffusers' Stable Diffusion x4 upscaler (`StableDiffusionUpscalePipeline`) folders in ldmkit: a tiny random
upscaler built with diffusers loads as `concat: "upscale"` and gives diffusers' images for the same seed
(PSNR >= 40 dB, final latents within 1e-3 relative; DDIM and Euler, with and without guidance), the noise
level is checked against max_noise_level, bad model_index values are refused in one line, and the model
runs through `ldm upscale` and `ldm convert` (ldmkit and back to diffusers).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.errors import UserError  # noqa: E402

PROMPT = "a sharp photo of a red cat"
SEED, STEPS, LEVEL = 5, 4, 20


def build_upscaler(workdir: Path, seed: int = 0):
    """A tiny random StableDiffusionUpscalePipeline in the x4 upscaler's layout: UNet with 4 + 3 input channels,
    a 1000-row class table for the noise level, no attention at the first level and cross-attention only
    (only_cross_attention) at the next; a 3-level VAE (factor 4, scaling factor 0.08333); v-prediction DDIM;
    a scaled-linear DDPM low_res_scheduler."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    width = 64
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False), attention_head_dim=2, cross_attention_dim=width,
        use_linear_projection=True, num_class_embeds=1000, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.08333)
    tokenizer = im.make_tokenizer(workdir / "tok", "sd2")
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2,
        pad_token_id=1))
    with torch.no_grad():  # randomise norms and biases too, so that a mis-mapped tensor cannot hide
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            module.eval()
        unet.class_embedding.weight.mul_(0.1)  # keep the noise level one term among several in temb
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="leading")
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                            clip_sample=True, variance_type="fixed_small")
    return StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=sched, safety_checker=None,
                                          feature_extractor=None, watermarker=None, max_noise_level=350)


def low_res_image(size: int = 16) -> Image.Image:
    g = torch.Generator().manual_seed(11)
    base = torch.rand(3, size // 4, size // 4, generator=g)
    big = torch.nn.functional.interpolate(base[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def x4(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("x4")
    pipe = build_upscaler(root)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "x4")
    low_res_image().save(root / "low.png")
    return {"pipe": pipe, "folder": root / "x4", "low": root / "low.png", "root": root}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _ours(pipe, low, sampler, guidance, level=LEVEL):
    """ldmkit's image and final latents (caught on their way to the decoder)."""
    seen = []
    decode = pipe.decode
    pipe.decode = lambda z, s: (seen.append(z.clone()), decode(z, s))[1]
    try:
        result = pipe.upscale(low, PROMPT, seed=SEED, sampler=sampler, steps=STEPS, guidance=guidance,
                              noise_level=level, progress=False)[0]
    finally:
        pipe.decode = decode
    return np.asarray(result.image), seen[0], result


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_upscale_matches_diffusers_pipeline(x4, sampler, guidance):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from ldmkit.pipelines import load

    pipe = x4["pipe"]
    pipe.scheduler = (DDIMScheduler if sampler == "ddim" else EulerDiscreteScheduler).from_config(pipe.scheduler.config)
    low = Image.open(x4["low"]).convert("RGB")
    kw = dict(image=low, num_inference_steps=STEPS, noise_level=LEVEL, guidance_scale=guidance)
    ref = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **kw).images[0]
    ref = (ref * 255).round().astype(np.uint8)
    ref_latents = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="latent", **kw).images
    ours = load(x4["folder"], device="cpu", dtype=torch.float32)
    image, latents, result = _ours(ours, low, sampler, guidance)
    assert image.shape == ref.shape == (64, 64, 3)  # 16 px x 4
    assert result.metadata["noise_level"] == LEVEL and result.metadata["size"] == "64x64"
    psnr = _psnr(image, ref)
    rel = float((latents - ref_latents).abs().max() / ref_latents.abs().max())
    print(f"x4 {sampler} guidance {guidance}: PSNR {psnr:.1f} dB, latents max relative difference {rel:.1e}")
    assert psnr >= 40.0
    assert rel <= 1e-3


def test_upscaler_reads_as_upscale_model(x4):
    from ldmkit.io import load_model

    index, comps = load_model(x4["folder"])
    assert index["concat"] == "upscale" and index["objective"] == "v"
    d = index["defaults"]
    assert (d["noise_level"], d["max_noise_level"], d["steps"], d["guidance"]) == (20, 350, 75, 9.0)
    assert d["low_res_schedule"]["beta_schedule"] == "scaled_linear"  # not ldmkit's own linear augmentation
    assert comps["denoiser"].config.num_class_embeds == 1000 and comps["autoencoder"].downsample_factor == 4
    assert comps["autoencoder"].config.scaling_factor == 0.08333


def test_noise_level_above_max_is_refused(x4, tmp_path, capsys):
    from ldmkit.pipelines import load

    ours = load(x4["folder"], device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"noise_level=351 is above this upscaler's max_noise_level=350"):
        ours.upscale(x4["low"], PROMPT, steps=1, noise_level=351, progress=False)
    rc = main(["upscale", "--model", str(x4["folder"]), "--image", str(x4["low"]), "--prompt", PROMPT,
               "--noise-level", "351", "--steps", "1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "max_noise_level=350" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value,rule", [(-1, r"max_noise_level=-1 must be an integer in \[0, "),
                                        ("350", r"max_noise_level='350' must be an integer"),
                                        (1000, r"max_noise_level=1000 must be at most 999")])
def test_bad_max_noise_level_is_refused(x4, tmp_path, value, rule):
    import shutil

    from ldmkit.io import load_model

    folder = tmp_path / "x4"
    shutil.copytree(x4["folder"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "max_noise_level": value}))
    with pytest.raises(UserError, match=rule):
        load_model(folder)


def test_bad_low_res_scheduler_is_refused(x4, tmp_path):
    import shutil

    from ldmkit.io import load_model

    folder = tmp_path / "x4"
    shutil.copytree(x4["folder"], folder)
    cfg_file = folder / "low_res_scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(UserError, match=r"_class_name='EulerDiscreteScheduler' must be one of"):
        load_model(folder)
    cfg_file.unlink()
    with pytest.raises(FileNotFoundError, match="low_res_scheduler"):
        load_model(folder)


def test_cli_upscale_and_convert_round_trip(x4, tmp_path, capsys):
    """`ldm upscale` on the diffusers folder, on its ldmkit conversion and on that written back to diffusers:
    the same image; diffusers reads the written folder back and makes the image it made from the original."""
    from diffusers import StableDiffusionUpscalePipeline

    common = ["--image", str(x4["low"]), "--prompt", PROMPT, "--steps", "2", "--seed", "3", "--no-progress",
              "--json", "--device", "cpu"]
    images = []
    for k, model in enumerate([x4["folder"], tmp_path / "ours", tmp_path / "back"]):
        if k == 1:
            assert main(["convert", "--from", str(x4["folder"]), "--to", str(model)]) == 0
        if k == 2:
            assert main(["convert", "--from", str(tmp_path / "ours"), "--to", str(model), "--format", "diffusers"]) == 0
        capsys.readouterr()
        rc = main(["upscale", "--model", str(model), *common, "--out", str(tmp_path / f"out{k}")])
        out, err = capsys.readouterr()
        assert rc == 0, err
        record = json.loads(out)[0]
        assert record["size"] == "64x64" and record["noise_level"] == 20 and record["input_size"] == "16x16"
        images.append(np.asarray(Image.open(record["file"])))
    assert all((im_ == images[0]).all() for im_ in images[1:])
    index = json.loads((tmp_path / "back" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    assert "max_noise_level" not in index["_ldmkit"]["defaults"]  # the folder's own entry is the one read
    from ldmkit.io import load_model

    assert load_model(tmp_path / "back")[0]["defaults"] == load_model(tmp_path / "ours")[0]["defaults"]
    kw = dict(image=Image.open(x4["low"]).convert("RGB"), num_inference_steps=2, output_type="np")
    made = []
    for folder in (x4["folder"], tmp_path / "back"):
        pipe = StableDiffusionUpscalePipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        made.append(pipe(PROMPT, generator=torch.Generator().manual_seed(3), **kw).images)
    assert np.array_equal(made[0], made[1])


def test_export_refuses_upscalers_diffusers_would_run_differently(x4):
    """StableDiffusionUpscalePipeline always passes the noise level as a class label and decodes with scaling
    factor 0.08333: an upscaler without a class table, or with another factor, is refused by name."""
    import dataclasses

    from ldmkit.io import load_model
    from ldmkit.io.diffusers_export import diffusers_pipeline_of

    index, comps = load_model(x4["folder"])
    assert diffusers_pipeline_of(index, comps) == "sd"
    ae = comps["autoencoder"]
    ae.config = dataclasses.replace(ae.config, scaling_factor=0.18215)
    with pytest.raises(UserError, match=r"replaces the VAE's scaling_factor by 0.08333; .* scaling_factor=0.18215"):
        diffusers_pipeline_of(index, comps)
    ae.config = dataclasses.replace(ae.config, scaling_factor=0.08333)
    unet = comps["denoiser"]
    unet.config = dataclasses.replace(unet.config, num_class_embeds=None)
    with pytest.raises(UserError, match="has no class embedding"):
        diffusers_pipeline_of(index, comps)
