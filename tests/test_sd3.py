"""Stable Diffusion 3: the MM-DiT (SD3 / SD3.5 variants), CLIP-L + CLIP-G + T5 conditioning, the 16-channel
autoencoder and flow matching with a shifted schedule, against diffusers' SD3Transformer2DModel and
StableDiffusion3Pipeline on random tiny models built with diffusers (same seed: PSNR >= 40 dB, final latents
within 1e-3 relative)."""
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

PROMPT, SIZE = "a red cat", dict(height=16, width=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("sd3")
    im.build_sd3_pipeline(workdir=root).save_pretrained(root / "sd3")
    im.build_sd3_pipeline(t5=False, qk_norm="rms_norm", seed=1, workdir=root).save_pretrained(root / "sd35-no-t5")
    return root


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("variant", [{}, {"qk_norm": "rms_norm"}, {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}])
def test_mmdit_matches_diffusers_and_presets_have_sd3_shapes(variant):
    from diffusers import SD3Transformer2DModel

    from ldmkit.denoisers.mmdit import PRESETS, MMDiT, MMDiTConfig

    cfg = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=40, caption_projection_dim=32, pooled_projection_dim=24, out_channels=16,
               pos_embed_max_size=12, **variant)
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = MMDiT(MMDiTConfig(**cfg)).eval()
    assert torch.allclose(ours.pos_embed.pos_embed, ref.pos_embed.pos_embed, atol=1e-6)  # the position table
    ours.load_state_dict(ref.state_dict())
    x, t, ctx, pooled = torch.randn(2, 16, 8, 6), torch.tensor([500.0, 120.0]), torch.randn(2, 7, 40), torch.randn(2, 24)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        assert torch.allclose(ours(x, t, ctx, pooled), want, atol=1e-5)
    counts = {"sd3-medium": 2_028_328_000, "sd3.5-large": 8_056_627_520, "sd3.5-medium": 2_243_171_520}
    for name, n in counts.items():
        with torch.device("meta"):
            mine, theirs = MMDiT(PRESETS[name]), SD3Transformer2DModel(**PRESETS[name].to_dict())
        assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
        assert sum(p.numel() for p in mine.parameters()) == n


def diffusers_run(folder, **kw):
    from diffusers import DiffusionPipeline

    no_t5 = not (Path(folder) / "text_encoder_3").is_dir()
    pipe = DiffusionPipeline.from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}))
    pipe.set_progress_bar_config(disable=True)

    def run(output_type):
        return pipe(PROMPT, generator=torch.Generator().manual_seed(3), output_type=output_type, guidance_scale=5.0,
                    max_sequence_length=32, **kw).images
    return (run("np")[0] * 255).round().astype(np.uint8), run("latent")


@pytest.mark.parametrize("case", ["sd3", "sd35-no-t5", "negative"])
def test_text2img_matches_stable_diffusion_3_pipeline(models, case):
    from ldmkit.pipelines import load

    folder = models / ("sd35-no-t5" if case == "sd35-no-t5" else "sd3")
    neg = "blurry" if case == "negative" else None
    want, latents = diffusers_run(folder, num_inference_steps=4, negative_prompt=neg, **SIZE)
    pipe = load(folder, device="cpu", dtype=torch.float32, max_sequence_length=32)
    assert (pipe.conditioner.t5 is None) == (case == "sd35-no-t5")
    image = pipe.text2img(PROMPT, negative_prompt=neg, seed=3, steps=4, guidance=5.0, progress=False, **SIZE)[0].image
    z = pipe.sample_latents(pipe.settings(steps=4, guidance=5.0, progress=False, **SIZE), [PROMPT],
                            [neg] if neg else None, [3])
    p, rel = psnr(image, want), float((z - latents).abs().max() / latents.abs().max())
    print(f"SD3 ({case}): PSNR {p:.1f} dB, latents {rel:.1e}")
    assert p >= 40 and rel <= 1e-3, (p, rel)


def test_without_t5_option_and_ldmkit_folder_round_trip(models, tmp_path):
    """load(..., without_t5=True) drops T5 (its tokens zeros, as diffusers without text_encoder_3); an
    ldmkit folder written from the model gives the same image."""
    from diffusers import StableDiffusion3Pipeline

    from ldmkit.io import load_model
    from ldmkit.io.format import save_model
    from ldmkit.pipelines import load

    ref = StableDiffusion3Pipeline.from_pretrained(models / "sd3", text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", guidance_scale=5.0,
               max_sequence_length=32, num_inference_steps=3, **SIZE).images[0]
    pipe = load(models / "sd3", device="cpu", dtype=torch.float32, without_t5=True, max_sequence_length=32)
    kw = dict(seed=3, steps=3, guidance=5.0, progress=False, **SIZE)
    got = pipe.text2img(PROMPT, **kw)[0].image
    assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40
    index, comps = load_model(models / "sd3", device="cpu", dtype=torch.float32, max_sequence_length=32)
    save_model(tmp_path / "m", comps, index)
    a = load(models / "sd3", device="cpu", dtype=torch.float32, max_sequence_length=32).text2img(PROMPT, **kw)[0].image
    b = load(tmp_path / "m", device="cpu", dtype=torch.float32).text2img(PROMPT, **kw)[0].image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_img2img_matches_sd3_img2img_pipeline(models):
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    from ldmkit.pipelines import load

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ref = StableDiffusion3Img2ImgPipeline.from_pretrained(models / "sd3")
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0, max_sequence_length=32,
               generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    pipe = load(models / "sd3", device="cpu", dtype=torch.float32, max_sequence_length=32)
    got = pipe.img2img(init, PROMPT, strength=0.6, seed=3, steps=5, guidance=5.0, posterior="sample",
                       progress=False)[0].image
    p = psnr(got, (want * 255).round().astype(np.uint8))
    print(f"SD3 img2img: PSNR {p:.1f} dB")
    assert p >= 40, p


def test_an_mmdit_trains_from_scratch_with_flow_matching(tmp_path):
    """`ldm train --denoiser mmdit --objective flow`: the text encoder's tokens and pooled vector feed the
    joint attention and the modulation; the model folder samples."""
    from PIL import Image

    from ldmkit.io.format import save_component
    from ldmkit.pipelines import load
    from ldmkit.training import Trainer
    from ldmkit.training.methods import LDM, LDMConfig

    from test_pipelines import make_autoencoder

    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for i in range(4):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text("a red circle" if i % 2 else "a blue square")
    save_component(make_autoencoder(), tmp_path / "ae")
    cfg = LDMConfig(data=str(tmp_path / "data"), autoencoder=str(tmp_path / "ae"), out=str(tmp_path / "run"),
                    denoiser="mmdit", preset="mmdit-tiny", objective="flow", text_encoder="tiny", resolution=32,
                    steps=2, batch_size=2, sample_steps=2, progress=False, device="cpu", checkpoint_every=2,
                    sample_every=100)
    trainer = Trainer(LDM(cfg))
    net = trainer.model.denoiser
    assert type(net).__name__ == "MMDiT" and net.config.in_channels == 4 and net.config.joint_attention_dim == 384
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folder = trainer.run()
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    image = load(folder, device="cpu", dtype=torch.float32).text2img("a red circle", steps=2, progress=False)[0].image
    assert image.size == (32, 32)


def test_ldm_convert_writes_a_folder_stable_diffusion_3_pipeline_runs(models, tmp_path):
    """diffusers -> ldmkit -> diffusers: StableDiffusion3Pipeline loads the written folder and gives the image
    ldmkit gives (with T5, and without: text_encoder_3 null)."""
    from diffusers import StableDiffusion3Pipeline

    from ldmkit.cli import main
    from ldmkit.pipelines import load

    for name in ("sd3", "sd35-no-t5"):
        assert main(["convert", "--from", str(models / name), "--to", str(tmp_path / f"{name}-ours")]) == 0
        assert main(["convert", "--from", str(tmp_path / f"{name}-ours"), "--to", str(tmp_path / f"{name}-back"),
                     "--format", "diffusers"]) == 0
        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd35-no-t5" else {}
        ref = StableDiffusion3Pipeline.from_pretrained(tmp_path / f"{name}-back", **no_t5)
        ref.set_progress_bar_config(disable=True)
        want = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", guidance_scale=5.0,
                   max_sequence_length=32, num_inference_steps=3, **SIZE).images[0]
        got = load(models / name, device="cpu", dtype=torch.float32, max_sequence_length=32).text2img(
            PROMPT, seed=3, steps=3, guidance=5.0, progress=False, **SIZE)[0].image
        assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40, name
