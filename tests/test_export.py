"""Every model `ldm train` writes exports to diffusers where diffusers has a pipeline for it, and the
exported folder gives ldmkit's image for the same seed: text UNets with a CLIP text encoder
(StableDiffusionPipeline), unconditional UNets (LDMPipeline), class-conditional DiTs (DiTPipeline).
The others are refused with the reason (`ldm convert --format diffusers`: one line, exit 2)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_ldm import config, labelled_data, make_autoencoder, make_data, make_trainer  # noqa: E402

from ldmkit.errors import UserError  # noqa: E402
from ldmkit.io import load_model  # noqa: E402
from ldmkit.io.diffusers_export import save_diffusers  # noqa: E402


@pytest.fixture
def ae_dir(tmp_path):
    return make_autoencoder(tmp_path / "ae")


def trained_model(tmp_path, name, data, **kw) -> Path:
    cfg = config(tmp_path, out=str(tmp_path / name), steps=2, checkpoint_every=2, lr=1e-2, warmup_steps=0, **kw)
    return make_trainer(cfg, data).run()


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def exported(folder: Path, dest: Path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    from ldmkit.pipelines import load

    index, comps = load_model(folder)
    save_diffusers(dest, index, comps)
    pipe = DiffusionPipeline.from_pretrained(dest)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load(folder, device="cpu", dtype=torch.float32)


def test_text_model_with_a_clip_encoder_exports_as_stable_diffusion(tmp_path, ae_dir):
    folder = trained_model(tmp_path, "clip", make_data(), text_encoder="clip-tiny")
    pipe, ours = exported(folder, tmp_path / "sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    ref = pipe("a red circle", generator=torch.Generator().manual_seed(5), num_inference_steps=6, guidance_scale=3.0,
               output_type="np", height=32, width=32).images[0]
    img = ours.text2img("a red circle", seed=5, sampler="ddim", steps=6, guidance=3.0, height=32, width=32,
                        progress=False)[0].image
    assert psnr(img, (ref * 255).round()) >= 40


def test_unconditional_model_exports_as_ldm_pipeline(tmp_path, ae_dir):
    folder = trained_model(tmp_path, "uncond", make_data(), conditioning="none")
    pipe, ours = exported(folder, tmp_path / "ldm")
    assert (type(pipe).__name__, type(pipe.unet).__name__) == ("LDMPipeline", "UNet2DModel")
    ref = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), num_inference_steps=6,
               output_type="np").images[0]
    img = ours.text2img(seed=5, sampler="ddim", steps=6, progress=False)[0].image
    assert psnr(img, (ref * 255).round()) >= 40


def test_class_conditional_dit_exports_as_dit_pipeline(tmp_path, ae_dir):
    folder = trained_model(tmp_path, "dit", labelled_data(), conditioning="class", denoiser="dit",
                           sample_prompts=("1",))
    pipe, ours = exported(folder, tmp_path / "dit-out")
    assert type(pipe).__name__ == "DiTPipeline"
    ref = pipe(class_labels=[1], generator=torch.Generator().manual_seed(5), num_inference_steps=6, guidance_scale=3.0,
               output_type="np").images[0]
    img = ours.text2img(class_label=1, seed=5, sampler="ddim", steps=6, guidance=3.0, progress=False)[0].image
    assert psnr(img, (ref * 255).round()) >= 40


@pytest.mark.parametrize("kw,why", [
    (dict(text_encoder="tiny"), "needs a CLIP text encoder"),
    (dict(conditioning="class", data="labels", sample_prompts=("1",)), "no pipeline for a class-conditioned UNet"),
    (dict(objective="flow", sample_sampler=None), "rectified-flow"),
    (dict(context_adapter_layers=1), "ExtendedUNet"),
])
def test_models_without_a_diffusers_pipeline_are_refused_with_the_reason(tmp_path, ae_dir, kw, why, capsys):
    from ldmkit.cli import main

    data = labelled_data() if kw.pop("data", None) else make_data()
    folder = trained_model(tmp_path, "m", data, **kw)
    index, comps = load_model(folder)
    with pytest.raises(UserError, match=why):
        save_diffusers(tmp_path / "nope", index, comps)
    assert main(["convert", "--from", str(folder), "--to", str(tmp_path / "nope2"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why.split()[0] in err[0]
