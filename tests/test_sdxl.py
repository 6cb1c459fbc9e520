"""SDXL: the text_time UNet, two text encoders, micro-conditioning, the refiner (img2img and the ensemble of
experts), against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on random tiny
models built with diffusers (same seed: PSNR >= 40 dB, final latents within 1e-3 relative)."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

PROMPT, NEG = "a red cat", "the street"
SIZE = dict(height=16, width=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("sdxl")
    im.build_sdxl_pipeline(workdir=root).save_pretrained(root / "base")
    im.build_sdxl_pipeline(refiner=True, seed=1, workdir=root).save_pretrained(root / "refiner")
    return root


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def theirs(cls, folder, sampler, **kw):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder)
    sched = getattr(diffusers, SCHEDULERS[sampler])
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if sampler == "dpmpp_2m" else {}
    extra.update({"clip_sample": False} if sampler == "ddim" else {})  # DDIM's defaults otherwise, as ours
    pipe.scheduler = sched.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)

    def run(output_type, **more):
        return pipe(generator=torch.Generator().manual_seed(3), output_type=output_type, **kw, **more).images
    return run


def ours(folder):
    from ldmkit.pipelines import load

    return load(folder, device="cpu", dtype=torch.float32)


def test_unet_text_time_matches_diffusers_and_presets_have_sdxl_shapes():
    from diffusers import UNet2DConditionModel

    from ldmkit.denoisers.unet import PRESETS, UNet, UNetConfig

    cfg = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
               attention_head_dim=(2, 4), cross_attention_dim=48, use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg).eval()
    unet = UNet(UNetConfig(**cfg)).eval()
    unet.load_state_dict(ref.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 48)
    pooled, ids = torch.randn(2, 16), torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 16, 16]])
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        assert torch.allclose(unet(x, t, ctx, pooled=pooled, time_ids=ids), want, atol=1e-5)
    with pytest.raises(ValueError, match="micro-conditioning"):
        unet(x, t, ctx)
    for name, params in (("sdxl", 2_567_463_684), ("sdxl-refiner", 2_259_526_660)):
        c = PRESETS[name]
        with torch.device("meta"):
            mine = UNet(c)
            diff = UNet2DConditionModel(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)})
        assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in diff.state_dict().items()}
        assert sum(p.numel() for p in mine.parameters()) == params


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_text2img_matches_diffusers_sdxl(models, sampler):
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0, **SIZE)
    run = theirs("StableDiffusionXLPipeline", models / "base", sampler, **kw)
    pipe = ours(models / "base")
    s = pipe.settings(sampler=sampler, steps=4, guidance=5.0, progress=False, **SIZE)
    image = pipe.text2img(PROMPT, seed=3, sampler=sampler, steps=4, guidance=5.0, progress=False, **SIZE)[0].image
    p, r = psnr(image, (run("np")[0] * 255).round().astype(np.uint8)), rel(pipe.sample_latents(s, [PROMPT], None, [3]),
                                                                          run("latent"))
    print(f"SDXL {sampler}: PSNR {p:.1f} dB, latents {r:.1e}")
    assert p >= 40 and r <= 1e-3, (p, r)


def test_negative_prompt_and_micro_conditioning_match_diffusers(models):
    micro = dict(original_size=(64, 48), crops_coords_top_left=(8, 4), target_size=(32, 32),
                 negative_original_size=(16, 16), negative_target_size=(24, 24))
    kw = dict(prompt=PROMPT, negative_prompt=NEG, num_inference_steps=3, guidance_scale=6.0, **SIZE, **micro)
    run = theirs("StableDiffusionXLPipeline", models / "base", "euler", **kw)
    pipe = ours(models / "base")
    settings = dict(sampler="euler", steps=3, guidance=6.0, progress=False, micro=micro, **SIZE)
    result = pipe.text2img(PROMPT, negative_prompt=NEG, seed=3, **settings)[0]
    assert psnr(result.image, (run("np")[0] * 255).round().astype(np.uint8)) >= 40
    assert result.metadata["original_size"] == "64, 48" and result.metadata["crops_coords_top_left"] == "8, 4"
    plain = pipe.text2img(PROMPT, negative_prompt=NEG, seed=3, **{**settings, "micro": None})[0].image
    assert psnr(plain, result.image) < 40  # the ids change the picture
    # the empty negative prompt: zeros (force_zeros_for_empty_prompt), as diffusers
    cond = pipe.conditioner.null(2)
    assert float(cond.context.abs().sum()) == 0 and cond.context.shape == (2, 77, 192) and cond.pooled.shape == (2, 48)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_refiner_img2img_matches_diffusers(models, sampler):
    init = im_image()
    kw = dict(prompt=PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
              aesthetic_score=7.0, negative_aesthetic_score=2.0)
    run = theirs("StableDiffusionXLImg2ImgPipeline", models / "refiner", sampler, **kw)
    pipe = ours(models / "refiner")
    assert pipe.conditioner.config.requires_aesthetics_score and len(pipe.conditioner.encoders) == 1
    image = pipe.img2img(init, PROMPT, strength=0.6, seed=3, sampler=sampler, steps=5, guidance=5.0, progress=False,
                         posterior="sample",
                         micro=dict(aesthetic_score=7.0, negative_aesthetic_score=2.0))[0].image
    p = psnr(image, (run("np")[0] * 255).round().astype(np.uint8))
    print(f"SDXL refiner img2img {sampler}: PSNR {p:.1f} dB")
    assert p >= 40, p


def im_image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_base_and_refiner_ensemble_matches_diffusers(models, sampler):
    """diffusers' recipe: base(denoising_end=0.8, output_type="latent") -> refiner(denoising_start=0.8)."""
    base = theirs("StableDiffusionXLPipeline", models / "base", sampler, prompt=PROMPT, num_inference_steps=6,
                  guidance_scale=5.0, denoising_end=0.7, **SIZE)
    latents = base("latent")
    refine = theirs("StableDiffusionXLImg2ImgPipeline", models / "refiner", sampler, prompt=PROMPT, image=latents,
                    num_inference_steps=6, guidance_scale=5.0, denoising_start=0.7)
    want = (refine("np")[0] * 255).round().astype(np.uint8)
    pipe = ours(models / "base")
    pipe.load_refiner(models / "refiner", start=0.7)
    result = pipe.text2img(PROMPT, seed=3, sampler=sampler, steps=6, guidance=5.0, progress=False, **SIZE)[0]
    p = psnr(result.image, want)
    print(f"SDXL base + refiner {sampler}: PSNR {p:.1f} dB")
    assert p >= 40, p
    assert result.metadata["refiner"] == "refiner" and result.metadata["refiner_start"] == 0.7
    alone = pipe.__class__.text2img  # the base alone draws another picture
    pipe.refiner = None
    assert psnr(alone(pipe, PROMPT, seed=3, sampler=sampler, steps=6, guidance=5.0, progress=False, **SIZE)[0].image,
                result.image) < 40


def test_sdxl_saves_as_an_ldmkit_folder_and_loads_back(models, tmp_path):
    from ldmkit.io import load_model
    from ldmkit.io.format import save_model

    index, comps = load_model(models / "base", device="cpu", dtype=torch.float32)
    save_model(tmp_path / "m", comps, index)
    a, b = ours(models / "base"), ours(tmp_path / "m")
    kw = dict(seed=1, sampler="euler", steps=3, progress=False, **SIZE)
    assert np.array_equal(np.asarray(a.text2img("the cat", **kw)[0].image), np.asarray(b.text2img("the cat", **kw)[0].image))


def test_sdxl_command_line_and_bad_settings(models, tmp_path, capsys):
    from ldmkit.cli import main
    from ldmkit.errors import UserError

    out = tmp_path / "o"
    rc = main(["sample", "--model", str(models / "base"), "--prompt", PROMPT, "--steps", "2", "--height", "16",
               "--width", "16", "--original-size", "32", "32", "--crop", "2", "4", "--refiner", str(models / "refiner"),
               "--refiner-start", "0.6", "--aesthetic-score", "6.5", "--out", str(out), "--no-progress"])
    assert rc == 0
    from PIL import Image

    png = next(out.glob("*.png"))
    text = Image.open(png).text
    assert "refiner" in str(text) and "32, 32" in str(text)
    pipe = ours(models / "base")
    with pytest.raises(ValueError, match="only an SDXL refiner reads an aesthetic score"):
        pipe.settings(micro={"aesthetic_score": 6.0})
    with pytest.raises(ValueError, match="two integers"):
        pipe.settings(micro={"original_size": (0, 5)})
    with pytest.raises(UserError, match=r"in \(0, 1\)"):
        pipe.load_refiner(models / "refiner", start=1.0)
    capsys.readouterr()
    for bad in (["--refiner-start", "0"], ["--original-size", "16"], ["--crop", "-1", "0"]):
        try:
            rc = main(["sample", "--model", str(models / "base"), "--prompt", PROMPT, "--steps", "2", "--height",
                       "16", "--width", "16", "--refiner", str(models / "refiner"), "--out", str(tmp_path / "x"),
                       "--no-progress", *bad])
        except SystemExit as exc:  # argparse's own refusal
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and err.strip().count("\n") == 0, (bad, err)
    sd1 = tmp_path / "sd1"
    im.build_pipeline("sd1", workdir=tmp_path).save_pretrained(sd1)
    rc = main(["sample", "--model", str(sd1), "--prompt", PROMPT, "--steps", "2", "--original-size", "32", "32",
               "--out", str(tmp_path / "y"), "--no-progress"])
    assert rc == 2 and "micro-conditioning is for SDXL" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_single_files_load_and_convert_to_diffusers_folders(models, tmp_path, kind):
    """Stability's single-file layout (written from the diffusers weights by an independent table:
    interop_models.to_original_sdxl) loads to the folder's images; `ldm convert --format diffusers` of
    it writes a folder diffusers runs to the same image."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from ldmkit.cli import main
    from ldmkit.pipelines import load

    refiner = kind == "refiner"
    pipe = DiffusionPipeline.from_pretrained(models / kind)
    save_file(im.to_original_sdxl(pipe, refiner=refiner), str(tmp_path / "sdxl.safetensors"))
    single = load(tmp_path / "sdxl.safetensors", device="cpu", dtype=torch.float32, tokenizer=str(models / kind))
    folder = ours(models / kind)
    assert single.conditioner.config.projection == folder.conditioner.config.projection
    assert single.conditioner.config.requires_aesthetics_score == refiner
    kw = dict(seed=2, sampler="euler", steps=3, guidance=5.0, progress=False, **SIZE)

    def run(pipe):  # a refiner refines images; a base draws from text
        if refiner:
            return pipe.img2img(im_image(), PROMPT, strength=1.0, posterior="sample", **kw)[0].image
        return pipe.text2img(PROMPT, **kw)[0].image
    a, b = run(single), run(folder)
    assert psnr(a, b) >= 40
    assert main(["convert", "--from", str(tmp_path / "sdxl.safetensors"), "--to", str(tmp_path / "out"),
                 "--format", "diffusers", "--tokenizer", str(models / kind)]) == 0
    exported = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(exported).__name__ == type(pipe).__name__
    exported.set_progress_bar_config(disable=True)
    args = dict(image=im_image(), strength=1.0) if refiner else SIZE
    want = exported(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(2),
                    output_type="np", **args).images[0]
    got = b
    assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40


def test_sdxl_controlnet_matches_diffusers(models, tmp_path):
    """An SDXL ControlNet (text_time embedding as its UNet) against StableDiffusionXLControlNetPipeline."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(models / "base")
    torch.manual_seed(4)
    cn = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cn.save_pretrained(tmp_path / "cn")
    pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in base.components.items()
                                                  if k not in ("image_encoder", "feature_extractor")}, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    control = im_image()
    want = pipe(PROMPT, image=control, num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=0.8,
                generator=torch.Generator().manual_seed(3), output_type="np", **SIZE).images[0]
    ours_pipe = ours(models / "base")
    ours_pipe.load_controlnet(tmp_path / "cn", scale=0.8)
    got = ours_pipe.text2img(PROMPT, control_image=control, seed=3, sampler="euler", steps=4, guidance=5.0,
                             progress=False, **SIZE)[0].image
    p = psnr(got, (want * 255).round().astype(np.uint8))
    print(f"SDXL ControlNet: PSNR {p:.1f} dB")
    assert p >= 40, p


def test_fp16_variant_folder_and_inpainting(models, tmp_path):
    """`variant="fp16"` reads the *.fp16.safetensors files of both text encoders and the UNet; inpainting
    on SDXL (blend mode) keeps the unmasked latents and changes the masked ones."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from ldmkit.pipelines import load

    StableDiffusionXLPipeline.from_pretrained(models / "base").save_pretrained(tmp_path / "v", variant="fp16")
    assert list((tmp_path / "v" / "text_encoder_2").glob("*.fp16.safetensors"))
    pipe = load(tmp_path / "v", device="cpu", dtype=torch.float32, variant="fp16")
    image = im_image()
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    out = pipe.inpaint(image, mask, PROMPT, seed=1, steps=3, progress=False)[0]
    assert out.image.size == (16, 16) and out.metadata["task"] == "inpaint"
    z_in = pipe.encode(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    z_out = pipe.encode(torch.from_numpy(np.asarray(out.image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    assert float((z_out - z_in)[..., 4:].abs().mean()) < float((z_out - z_in)[..., :4].abs().mean())
