"""Stable Diffusion interop: diffusers folders and original single files load into ldmkit and
give diffusers' numbers (components within 1e-5, whole images within PSNR >= 40 dB).

Models are tiny and random, built locally by tests/interop_models.py (no downloads).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

from ldmkit.io import load_model  # noqa: E402
from ldmkit.io import single_file as sf  # noqa: E402

PROMPT = "the red cat on a street"
STYLES = ("sd1", "sd2")


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """style -> dict(pipe, diffusers folder, single file, tokenizer folder)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("interop")
    out = {}
    for style in STYLES:
        pipe = im.build_pipeline(style, workdir=root)
        folder = root / f"{style}-diffusers"
        pipe.save_pretrained(folder)
        ckpt = im.to_original_checkpoint(pipe, style)
        if style == "sd1":
            single = root / "sd1.safetensors"
            save_file({k: v.contiguous() for k, v in ckpt.items()}, str(single))
        else:  # a .ckpt, as SD 2.x was released: a Lightning dict with a state_dict inside
            single = root / "sd2.ckpt"
            torch.save({"state_dict": ckpt, "global_step": 1234, "epoch": 3}, single)
        out[style] = dict(pipe=pipe, folder=folder, single=single, ckpt=ckpt, tokenizer=folder / "tokenizer")
    return out


def _load_single(m, style, **kw):
    opts = dict(tokenizer=m["tokenizer"])
    if style == "sd2":
        opts["prediction_type"] = "v"
    opts.update(kw)
    return load_model(m["single"], **opts)


_CACHE: dict = {}


def _load(models, style, source):
    """Loaded (index, components), once per module: the tests only read them."""
    key = (id(models), style, source)
    if key not in _CACHE:
        m = models[style]
        _CACHE[key] = load_model(m["folder"]) if source == "diffusers" else _load_single(m, style)
    return _CACHE[key]


# ----------------------------------------------------------------------------- the test's own LDM table
@pytest.mark.parametrize("style", STYLES)
def test_ldm_layout_table_matches_diffusers_converters(models, style):
    """The hand-written LDM table of interop_models agrees with diffusers' own LDM->diffusers converters,
    so the single files the other tests load are genuine original-layout checkpoints."""
    from diffusers.loaders import single_file_utils as su

    m = models[style]
    pipe, ckpt = m["pipe"], m["ckpt"]
    for converted, module in ((su.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)), pipe.unet),
                              (su.convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)), pipe.vae)):
        ref = module.state_dict()
        assert set(converted) == set(ref)
        assert all(torch.equal(converted[k], ref[k]) for k in ref)
    text_ref = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()
                if not k.endswith("position_ids")}
    if style == "sd1":
        text = su.convert_ldm_clip_checkpoint(ckpt)
    else:
        text = su.convert_open_clip_checkpoint(pipe.text_encoder, ckpt)
    text = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
    for k, v in text_ref.items():  # diffusers' OpenCLIP converter also keeps the extra last block; ignore it
        assert torch.equal(text[k], v), k


# ----------------------------------------------------------------------------- components
@pytest.mark.parametrize("source", ["diffusers", "single"])
@pytest.mark.parametrize("style", STYLES)
def test_components_match_diffusers(models, style, source):
    pipe = models[style]["pipe"]
    index, comps = _load(models, style, source)
    assert index["objective"] == ("v" if style == "sd2" else "eps")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 781.0])
    ctx = torch.randn(2, 77, 128, generator=g)
    img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        ours = comps["denoiser"](x, t, context=ctx)
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        assert (ours - ref).abs().max() <= 1e-5
        ae = comps["autoencoder"]
        assert (ae.decode(x) - pipe.vae.decode(x).sample).abs().max() <= 1e-5
        assert (ae.encode(img).mean - pipe.vae.encode(img).latent_dist.mean).abs().max() <= 1e-5
        assert ae.config.scaling_factor == pipe.vae.config.scaling_factor
        prompts = [PROMPT, ""]
        ours = comps["conditioner"].encode(prompts).context
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        ref = pipe.text_encoder(ids)[0]
        assert ours.shape == ref.shape == (2, 77, 128)
        assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("style", STYLES)
def test_single_file_config_inference(models, style):
    """Configs inferred from tensor shapes equal the configs the model was built with."""
    pipe = models[style]["pipe"]
    parts = sf.single_file_to_parts(models[style]["single"], tokenizer=models[style]["tokenizer"],
                                    prediction_type="v" if style == "sd2" else None)
    for k in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
              "up_block_types", "cross_attention_dim", "use_linear_projection", "upcast_attention",
              "transformer_layers_per_block", "mid_block_type"):
        assert _plain(parts.unet_config[k]) == _plain(pipe.unet.config[k]), k
    assert _plain(parts.unet_config["attention_head_dim"]) == _plain(pipe.unet.config.attention_head_dim)
    for k in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor", "in_channels"):
        assert _plain(parts.vae_config[k]) == _plain(pipe.vae.config[k]), k
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "max_position_embeddings", "hidden_act"):
        assert parts.text_config[k] == getattr(pipe.text_encoder.config, k), k
    sched = parts.scheduler_config
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert sched["prediction_type"] == ("v_prediction" if style == "sd2" else "epsilon")
    if style == "sd2":
        assert any("penultimate" in n for n in parts.notes)


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# ----------------------------------------------------------------------------- whole images
def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("style,source", [("sd1", "diffusers"), ("sd2", "diffusers"), ("sd1", "single"),
                                          ("sd2", "single")])
def test_text2img_matches_diffusers_pipeline(models, style, source, sampler):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ldmkit.pipelines import load

    m = models[style]
    pipe = m["pipe"]
    cls = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **({"algorithm_type": "dpmsolver++", "solver_order": 2}
                                                              if sampler != "ddim" else {}))
    seed, steps = 7, 8
    kw = dict(height=16, width=16, num_inference_steps=steps, guidance_scale=7.5)
    ref = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images[0]
    ref = (ref * 255).round().astype(np.uint8)
    ref_latents = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images
    if source == "diffusers":
        ours = load(m["folder"], device="cpu", dtype=torch.float32)
    else:
        ours = _single_pipeline(models, style)
    settings = dict(seed=seed, sampler=sampler, steps=steps, guidance=7.5, height=16, width=16, progress=False)
    result = ours.text2img(PROMPT, **settings)[0]
    psnr = _psnr(np.asarray(result.image), ref)
    print(f"{style}/{source}/{sampler}: PSNR {psnr:.1f} dB vs diffusers")
    assert psnr >= 40.0, f"{style}/{source}/{sampler}: PSNR {psnr:.1f} dB vs diffusers"
    # the decoded tiny random VAE hides small differences; the latents do not
    s = ours.settings(sampler=sampler, steps=steps, guidance=7.5, height=16, width=16, progress=False)
    latents = ours.sample_latents(s, [PROMPT], None, [seed])
    rel = float((latents - ref_latents).abs().max() / ref_latents.abs().max())
    print(f"{style}/{source}/{sampler}: latents max relative difference {rel:.1e}")
    assert rel <= 1e-4


# a diffusers folder's own scheduler (issue 23): the default sampler runs it, or `ldm sample` says what runs
FOLDER_SCHEDULERS = [  # (diffusers class, its options, the sampler ldmkit runs it with)
    ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}, "pndm"),  # SD 1.5's own
    ("LMSDiscreteScheduler", {}, "lms"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler_karras"),
    ("UniPCMultistepScheduler", {}, "unipc"),
    ("DEISMultistepScheduler", {}, "deis"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ("LCMScheduler", {}, "lcm"),
]


def _folder_with(models, tmp_path, style, scheduler, options):
    import shutil

    import diffusers

    m = models[style]
    original = json.loads((m["folder"] / "scheduler" / "scheduler_config.json").read_text())
    m["pipe"].scheduler = getattr(diffusers, scheduler).from_config(original, **options)
    folder = tmp_path / f"{style}-{scheduler}"
    shutil.copytree(m["folder"], folder)
    m["pipe"].scheduler.save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("style", STYLES)  # sd1: eps prediction, sd2: v
@pytest.mark.parametrize("scheduler,options,sampler", FOLDER_SCHEDULERS, ids=[f[0] for f in FOLDER_SCHEDULERS])
def test_a_folder_runs_its_own_scheduler(models, tmp_path, scheduler, options, sampler, style):
    """SD 1.5 ships PNDM: its folder used to run as DDIM (6 % latent difference); each scheduler ldmkit has
    now runs as diffusers' pipeline runs it, stochastic ones included (same seed, same generator order)."""
    from ldmkit.pipelines import load

    folder = _folder_with(models, tmp_path, style, scheduler, options)
    seed, steps, kw = 3, 8, dict(height=16, width=16, num_inference_steps=8, guidance_scale=7.5)
    ref = models[style]["pipe"](PROMPT, generator=torch.Generator().manual_seed(seed), output_type="latent",
                                **kw).images
    ours = load(folder, device="cpu", dtype=torch.float32)
    assert ours.defaults["sampler"] == sampler
    s = ours.settings(steps=steps, guidance=7.5, height=16, width=16, progress=False)
    latents = ours.sample_latents(s, [PROMPT], None, [seed])
    rel = float((latents - ref).abs().max() / ref.abs().max())
    print(f"{style}/{scheduler}: latents max relative difference {rel:.1e}")
    assert rel <= 1e-4, f"{scheduler} as {sampler}: {rel:.2e}"


def test_ldm_sample_says_once_what_runs_instead_of_the_folders_scheduler(models, tmp_path, capsys):
    from ldmkit.cli import main

    folder = _folder_with(models, tmp_path, "sd1", "DPMSolverMultistepScheduler",
                          {"algorithm_type": "sde-dpmsolver++", "solver_order": 3})
    argv = ["sample", "--model", str(folder), "--prompt", PROMPT, "--steps", "2", "--height", "16", "--width", "16",
            "--no-progress", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1, notes
    assert notes[0].startswith("ldm sample: note: scheduler DPMSolverMultistepScheduler runs as dpmpp_3m_sde: "
                               "diffusers' third-order SDE update carries its D2 term with the wrong sign")
    assert main(argv[:-1] + [str(tmp_path / "p"), "--sampler", "DPM++ 2M Karras"]) == 0  # not the folder's: silent
    assert "note:" not in capsys.readouterr().err


def _single_pipeline(models, style):
    from ldmkit.diffusion.schedules import schedule_from_dict
    from ldmkit.pipelines import Pipeline

    index, comps = _load(models, style, "single")
    return Pipeline(comps["autoencoder"], comps["denoiser"], schedule_from_dict(index["schedule"]),
                    comps["conditioner"], prediction=index["objective"], conditioning="text", defaults=index["defaults"],
                    latent_size=index["latent_size"])


# ----------------------------------------------------------------------------- real Stable Diffusion shapes
SD_UNETS = {  # diffusers' published unet/config.json values for SD 1.5 and SD 2.1 (768-v)
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 use_linear_projection=False, upcast_attention=False),
    "sd21": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True),
}
SD_TEXT = {  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 without its last block, as in diffusers' SD folders
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu"),
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu"),
}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_layout_infers_the_published_configs(name, tmp_path):
    """Full-size SD 1.5 / 2.1 key layouts (tensors on the meta device: shapes only, no memory) give
    diffusers' published configs and ldmkit's own presets."""
    import types

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmkit.denoisers.unet import PRESETS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_UNETS[name])
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **SD_TEXT[name]))
    pipe = types.SimpleNamespace(unet=unet, vae=vae, text_encoder=text)
    style = "sd1" if name == "sd15" else "sd2"
    ckpt = im.to_original_checkpoint(pipe, style)
    family = sf.detect_family(ckpt)
    ucfg, ustate = sf.unet_to_diffusers(sf._strip(ckpt, sf.UNET_PREFIX), family)
    assert set(ustate) == set(unet.state_dict())
    for k, v in {**SD_UNETS[name], "layers_per_block": 2, "in_channels": 4, "out_channels": 4,
                 "down_block_types": unet.config.down_block_types, "up_block_types": unet.config.up_block_types,
                 "transformer_layers_per_block": 1}.items():
        assert _plain(ucfg[k]) == _plain(v), k
    preset = PRESETS[name]
    for k in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
              "down_block_types", "up_block_types", "layers_per_block"):
        assert _plain(ucfg[k]) == _plain(getattr(preset, k)), k
    vcfg, vstate = sf.vae_to_diffusers(sf._strip(ckpt, sf.VAE_PREFIX))
    assert set(vstate) == set(vae.state_dict())
    assert (vcfg["block_out_channels"], vcfg["layers_per_block"], vcfg["latent_channels"]) == ([128, 256, 512, 512], 2, 4)
    convert = sf.clip_to_transformers if style == "sd1" else sf.openclip_to_transformers
    tcfg, tstate, _ = convert(sf._strip(ckpt, sf.CLIP_PREFIX if style == "sd1" else sf.OPENCLIP_PREFIX))
    for k, v in SD_TEXT[name].items():
        assert tcfg[k] == v, k
    assert tcfg["vocab_size"] == 49408
