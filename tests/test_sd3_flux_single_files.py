"""Original single files of SD3 / SD3.5 (Stability's `model.diffusion_model.joint_blocks.*` + CompVis VAE +
`text_encoders.*`) and of FLUX.1 (Black Forest Labs' `double_blocks.*`): random tiny diffusers models written
into those layouts by interop_models' hand-written tables (checked here against diffusers' own converters),
saved with safetensors, load in ldmkit and give the images of the diffusers folders."""
from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

PROMPT = "a red cat"
SD3_KW = dict(seed=3, steps=4, guidance=5.0, progress=False, height=16, width=16)
FLUX_KW = dict(seed=3, steps=4, guidance=3.5, progress=False, height=32, width=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("single")
    sd3 = im.build_sd3_pipeline(single_file=True, workdir=root / "work")
    sd3.save_pretrained(root / "sd3")
    save_file(im.to_original_sd3(sd3), str(root / "sd3_incl_clips_t5.safetensors"))
    save_file(im.to_original_sd3(sd3, t5=False), str(root / "sd3_incl_clips.safetensors"))
    bare = im.to_original_sd3(sd3, t5=False, clips=False)  # the MM-DiT alone: the rest from base=
    save_file({k: v for k, v in bare.items() if not k.startswith("first_stage_model.")},
              str(root / "sd3_bare.safetensors"))
    sd35 = im.build_sd3_pipeline(single_file=True, t5=False, qk_norm="rms_norm", dual_attention_layers=(0,), seed=1,
                                 workdir=root / "work")
    sd35.save_pretrained(root / "sd35")
    save_file(im.to_original_sd3(sd35), str(root / "sd35.safetensors"))
    for kind, dev, prefix in (("dev", True, ""), ("schnell", False, "model.diffusion_model.")):
        flux = im.build_flux_pipeline(dev=dev, seed=int(not dev), workdir=root / "work")
        flux.save_pretrained(root / kind)
        save_file(im.to_original_flux(flux.transformer.state_dict(), prefix), str(root / f"flux1-{kind}.safetensors"))
    return {"root": root, "sd3": sd3, "sd35": sd35}


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _same(state: dict, ref: dict) -> None:
    assert set(state) == set(ref), sorted(set(state) ^ set(ref))[:6]
    assert all(torch.equal(state[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(state[k], ref[k])][:6]


# ----------------------------------------------------------------------------- the tables
@pytest.mark.parametrize("which", ["sd3", "sd35"])
def test_sd3_layout_table_matches_diffusers_converters(files, which):
    """interop_models' SD3 layout is what diffusers' SD3 converters read (so the files are genuine), and
    ldmkit's own reading of it gives diffusers' tensors back."""
    from diffusers.loaders import single_file_utils as su

    from ldmkit.io.ldm_layout import _strip
    from ldmkit.io.sd3_single_file import mmdit_to_diffusers, t5_from_file

    pipe = files[which]
    sd = im.to_original_sd3(pipe)
    ref = pipe.transformer.state_dict()
    _same(su.convert_sd3_transformer_checkpoint_to_diffusers(_strip(sd, "model.diffusion_model.")), ref)
    cfg, ours = mmdit_to_diffusers(_strip(sd, "model.diffusion_model."))
    _same(ours, ref)
    want = {k: v for k, v in pipe.transformer.config.items() if k in cfg and k != "sample_size"}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in want} == want
    _same(su.convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config)), pipe.vae.state_dict())
    clip_g = su.convert_ldm_clip_checkpoint(sd, "text_encoders.clip_g.transformer.")
    _same(clip_g, {k: v for k, v in pipe.text_encoder_2.state_dict().items() if not k.endswith("position_ids")})
    if pipe.text_encoder_3 is not None:
        t5 = su.convert_sd3_t5_checkpoint_to_diffusers(sd)
        t5["encoder.embed_tokens.weight"] = t5["shared.weight"]  # tied
        _same(t5, pipe.text_encoder_3.state_dict())
        t5_cfg, _ = t5_from_file(_strip(sd, "text_encoders.t5xxl.transformer."))
        assert {k: getattr(pipe.text_encoder_3.config, k) for k in t5_cfg} == t5_cfg


def test_flux_layout_table_matches_diffusers_converter(files):
    """The BFL layout against diffusers' converter, which has FLUX.1's width (3072) built in: every row count
    that is a multiple of the tiny width is widened to it (1-D random tensors; the converter only splits rows)."""
    from diffusers.loaders import single_file_utils as su

    from ldmkit.io.flux_single_file import flux_to_diffusers

    net = im.build_flux_pipeline(dev=True, workdir=files["root"] / "work").transformer
    ref, width = net.state_dict(), net.config.num_attention_heads * net.config.attention_head_dim
    g = torch.Generator().manual_seed(0)
    wide = {k: torch.randn(v.shape[0] * 3072 // width if v.shape[0] % width == 0 else v.shape[0], generator=g)
            for k, v in ref.items()}
    wide["x_embedder.weight"] = torch.randn(3072, 1, generator=g)  # ldmkit reads the width off img_in's rows
    _same(su.convert_flux_transformer_checkpoint_to_diffusers(im.to_original_flux(wide)), wide)
    cfg, ours = flux_to_diffusers(im.to_original_flux(ref))
    _same(ours, ref)
    want = {k: v for k, v in net.config.items() if k in cfg}
    assert cfg == {**want, "out_channels": want["out_channels"] or want["in_channels"]}


# ----------------------------------------------------------------------------- images
def _load(path, **kw):
    from ldmkit.pipelines import load

    return load(path, device="cpu", dtype=torch.float32, max_sequence_length=32, **kw)


@pytest.mark.parametrize("case", ["incl_clips_t5", "incl_clips+base_t5", "bare+base", "sd35"])
def test_sd3_single_file_gives_the_diffusers_folders_images(files, case):
    root = files["root"]
    folder = root / ("sd35" if case == "sd35" else "sd3")
    name = {"incl_clips_t5": "sd3_incl_clips_t5", "incl_clips+base_t5": "sd3_incl_clips", "bare+base": "sd3_bare",
            "sd35": "sd35"}[case]
    want = _load(folder).text2img(PROMPT, **SD3_KW)[0].image
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = _load(root / f"{name}.safetensors", base=folder)
    no_t5 = [str(w.message) for w in caught if "no T5-XXL" in str(w.message)]
    assert bool(no_t5) == (case == "sd35"), no_t5  # the SD3.5 folder has no T5 either: it runs without, warned
    assert (pipe.conditioner.t5 is None) == (case == "sd35")
    got = pipe.text2img(PROMPT, **SD3_KW)[0].image
    p = psnr(got, want)  # the same weights; bit-identical images but for float rounding that may follow alignment
    print(f"SD3 single file ({case}): PSNR {p:.1f} dB against the diffusers folder")
    assert p >= 40, p


def test_sd3_single_file_matches_stable_diffusion_3_pipeline(files):
    """The numbers for docs/interop.md: the single file against diffusers' own pipeline on the folder."""
    from diffusers import StableDiffusion3Pipeline

    root = files["root"]
    ref = StableDiffusion3Pipeline.from_pretrained(root / "sd3")
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, max_sequence_length=32, height=16, width=16)
    want = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images[0]
    latents = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    pipe = _load(root / "sd3_incl_clips_t5.safetensors", base=root / "sd3")
    got = pipe.text2img(PROMPT, **SD3_KW)[0].image
    z = pipe.sample_latents(pipe.settings(steps=4, guidance=5.0, progress=False, height=16, width=16), [PROMPT], None,
                            [3])
    p, rel = psnr(got, (want * 255).round().astype(np.uint8)), float((z - latents).abs().max() / latents.abs().max())
    print(f"SD3 single file vs StableDiffusion3Pipeline: PSNR {p:.1f} dB, latents {rel:.1e}")
    assert p >= 40 and rel <= 1e-3, (p, rel)


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_flux_single_file_gives_the_diffusers_folders_images(files, kind):
    from diffusers import FluxPipeline

    root = files["root"]
    pipe = _load(root / f"flux1-{kind}.safetensors", base=root / kind)
    assert pipe.denoiser.guidance_mode == ("distilled" if kind == "dev" else "none")
    got = pipe.text2img(PROMPT, **FLUX_KW)[0].image
    folder = psnr(got, _load(root / kind).text2img(PROMPT, **FLUX_KW)[0].image)
    ref = FluxPipeline.from_pretrained(root / kind)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=3.5, max_sequence_length=32, height=32, width=32)
    want = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images[0]
    latents = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    z = pipe.sample_latents(pipe.settings(steps=4, guidance=3.5, progress=False, height=32, width=32), [PROMPT], None,
                            [3])
    p = psnr(got, (want * 255).round().astype(np.uint8))
    rel = float((ref._pack_latents(z, 1, 16, 16, 16) - latents).abs().max() / latents.abs().max())
    print(f"FLUX.1-{kind} single file: PSNR {folder:.1f} dB against the diffusers folder in ldmkit, {p:.1f} dB and "
          f"latents {rel:.1e} against FluxPipeline")
    assert folder >= 40 and p >= 40 and rel <= 1e-3, (folder, p, rel)


def test_cli_sample_and_convert_take_base(files, tmp_path):
    """`ldm sample --base` and `ldm convert --base`: the converted folder samples the file's images."""
    from ldmkit.cli import main

    root = files["root"]
    args = ["--prompt", PROMPT, "--seed", "3", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
            "--no-progress"]
    assert main(["sample", "--model", str(root / "flux1-schnell.safetensors"), "--base", str(root / "schnell"),
                 "--out", str(tmp_path / "a.png"), *args]) == 0
    assert main(["convert", "--from", str(root / "flux1-schnell.safetensors"), "--base", str(root / "schnell"),
                 "--to", str(tmp_path / "m")]) == 0
    assert main(["sample", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b.png"), *args]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f).convert("RGB")) for f in ("a.png", "b.png"))
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- bad input
def test_bad_single_files_are_one_line_errors(files, tmp_path):
    from ldmkit.errors import UserError
    from ldmkit.io import load_model

    root = files["root"]
    cases = []
    raw = (root / "sd3_incl_clips_t5.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    cases.append(((tmp_path / "truncated.safetensors",), {}, "truncated|incomplete|not a|cannot|invalid"))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(root / "sd3_incl_clips.safetensors"))
    save_file({k: v for k, v in sd.items() if ".clip_g." not in k}, str(tmp_path / "no_clip_g.safetensors"))
    cases += [
        ((tmp_path / "no_clip_g.safetensors",), {}, r"no CLIP-G text encoder .*base=FOLDER"),
        ((root / "sd3_incl_clips_t5.safetensors",), {}, r"T5-XXL but no tokenizer .*base=FOLDER"),
        ((root / "flux1-dev.safetensors",), {}, r"FLUX.1's transformer only: pass base=FOLDER"),
        ((root / "flux1-dev.safetensors",), {"base": root / "sd3"}, r"not a diffusers FLUX.1 folder"),
        ((root / "sd3_bare.safetensors",), {"base": root / "dev"}, r"not a diffusers SD3 folder"),
        ((root / "sd3_bare.safetensors",), {"base": root / "sd3", "prediction_type": "v"},
         r"prediction_type: not an option of SD3 single files"),
        ((root / "sd3",), {"base": root / "sd3"}, r"base= completes SD3 / FLUX.1 single files"),
    ]
    for args, kw, pattern in cases:
        with pytest.raises((UserError, ValueError)) as info:
            load_model(*args, device="cpu", **kw)
        message = str(info.value)
        assert "\n" not in message and re.search(pattern, message), (args, kw, message)
