"""IP-Adapter: h94's single files (basic and Plus, .safetensors and .bin) with a CLIP image encoder give the
images diffusers gives with `load_ip_adapter` + `ip_adapter_image` (PSNR >= 40 dB, latents within 1e-4;
DDIM and Euler); scale 0 is the plain model, bit for bit; `ldm sample --ip-adapter --image-prompt` writes
PNGs that name the adapter; bad files, encoders, images and scales are one-line errors.

The base model is the tiny random Stable Diffusion of tests/interop_models.py (11 cross-attention
layers, context width 128); the image encoder a tiny random CLIPVisionModelWithProjection in
image_encoder/ beside the adapter files, as in h94/IP-Adapter's models/ folder."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402
from test_adapters import PROMPT, psnr  # noqa: E402

from ldmkit.errors import UserError  # noqa: E402

STEPS, GUIDANCE, SCALE = 6, 7.5, 0.6
WIDTH = 128  # the tiny UNet's context width


def random_encoder(seed: int = 3, projection_dim: int = 24):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=projection_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=8)).eval()


def layer_weights(unet, g, context=WIDTH) -> dict:
    """ip_adapter.{2k+1}.to_k_ip / to_v_ip for the k-th cross-attention layer in diffusers' order."""
    modules = dict(unet.named_modules())
    names = [n.removesuffix(".processor") for n in unet.attn_processors if ".attn2." in n]
    out = {}
    for k, name in enumerate(names):
        inner = modules[name].to_k.weight.shape[0]
        for proj in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * k + 1}.{proj}.weight"] = torch.randn(inner, context, generator=g) * 0.3
    return out


def basic_adapter(unet, seed: int = 5, embed: int = 24, context: int = WIDTH) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {"image_proj.proj.weight": torch.randn(4 * context, embed, generator=g) * 0.3,
             "image_proj.proj.bias": torch.randn(4 * context, generator=g) * 0.1,
             "image_proj.norm.weight": 1 + torch.randn(context, generator=g) * 0.1,
             "image_proj.norm.bias": torch.randn(context, generator=g) * 0.1}
    return state | layer_weights(unet, g, context)


def plus_adapter(unet, seed: int = 6, embed: int = 32, width: int = 64, tokens: int = 6) -> dict:
    """A Resampler in h94's names: 4 layers (diffusers builds 4), one 64-wide head, MLP ratio 4."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    state = {"image_proj.latents": r(1, tokens, width, s=1.0), "image_proj.proj_in.weight": r(width, embed),
             "image_proj.proj_in.bias": r(width), "image_proj.proj_out.weight": r(WIDTH, width),
             "image_proj.proj_out.bias": r(WIDTH), "image_proj.norm_out.weight": 1 + r(WIDTH),
             "image_proj.norm_out.bias": r(WIDTH)}
    for n in range(4):
        p = f"image_proj.layers.{n}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = 1 + r(width), r(width)
        state |= {p + "0.to_q.weight": r(64, width), p + "0.to_kv.weight": r(128, width),
                  p + "0.to_out.weight": r(width, 64), p + "1.1.weight": r(4 * width, width),
                  p + "1.3.weight": r(width, 4 * width)}
    return state | layer_weights(unet, g)


def image_prompt(seed: int = 0, size=(48, 40)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ip_adapter")
    pipe = im.build_pipeline("sd1", scheduler="ddim", workdir=root)
    pipe.save_pretrained(root / "sd1")
    models = root / "models"
    random_encoder().save_pretrained(models / "image_encoder")
    basic = basic_adapter(pipe.unet)
    save_file(basic, str(models / "ip-adapter_test.safetensors"))
    torch.save({"image_proj": {k.removeprefix("image_proj."): v for k, v in basic.items() if k.startswith("image_proj.")},
                "ip_adapter": {k.removeprefix("ip_adapter."): v for k, v in basic.items() if k.startswith("ip_adapter.")}},
               models / "ip-adapter_test.bin")
    save_file(plus_adapter(pipe.unet), str(models / "ip-adapter-plus_test.safetensors"))
    image_prompt(0).save(root / "prompt.png")
    return root


def diffusers_run(base, weight_name: str, sampler: str, scale: float = SCALE):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base / "sd1", safety_checker=None)
    if sampler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(base / "models"), subfolder="", weight_name=weight_name,
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(scale)
    kw = dict(ip_adapter_image=image_prompt(0), num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=16,
              width=16)
    img = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **kw).images[0]
    lat = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images
    return (img * 255).round().astype(np.uint8), lat


def ours(base, weight_name: str | None = None, scale: float = SCALE, **load_kw):
    from ldmkit.pipelines import load

    pipe = load(base / "sd1", device="cpu", dtype=torch.float32)
    if weight_name:
        pipe.load_ip_adapter(base / "models" / weight_name, scale=scale, **load_kw)
    return pipe


def ours_run(pipe, sampler: str, prompt_image=None):
    from ldmkit.pipelines import image_prompt as ip

    kw = dict(sampler=sampler, steps=STEPS, guidance=GUIDANCE, height=16, width=16, progress=False)
    prompt_image = image_prompt(0) if prompt_image is None and pipe.ip_adapter is not None else prompt_image
    result = pipe.text2img(PROMPT, seed=7, image_prompt=prompt_image, **kw)[0]
    tokens, _ = ip.prepare(pipe, prompt_image)
    lat = pipe.sample_latents(pipe.settings(**kw), [PROMPT], None, [7], image_tokens=tokens)
    return np.asarray(result.image), lat, result.metadata


@pytest.mark.parametrize("kind, sampler", [("basic", "ddim"), ("basic", "euler"), ("plus", "ddim")])
def test_text2img_matches_diffusers_ip_adapter(base, kind, sampler):
    weight = {"basic": "ip-adapter_test.safetensors", "plus": "ip-adapter-plus_test.safetensors"}[kind]
    ref_img, ref_lat = diffusers_run(base, weight, sampler)
    img, lat, meta = ours_run(ours(base, weight), sampler)
    p = psnr(img, ref_img)
    diff = float((lat - ref_lat).abs().max())
    rel = diff / float(ref_lat.abs().max())
    print(f"IP-Adapter {kind}, {sampler}: PSNR {p:.1f} dB, image max |diff| "
          f"{int(np.abs(img.astype(int) - ref_img.astype(int)).max())}/255, latents max |diff| {diff:.1e} (rel {rel:.1e})")
    assert p >= 40 and rel <= 1e-4, (p, rel)
    assert meta["ip_adapter"] == f"{Path(weight).stem}:0.6" and meta["ip_adapter_hash"].startswith(Path(weight).stem)
    plain, _, _ = ours_run(ours(base), sampler)
    assert psnr(plain, img) < 30  # the image prompt changes the picture


def test_scale_zero_and_unload_give_the_plain_model(base):
    plain_img, plain_lat, _ = ours_run(ours(base), "ddim")
    zero = ours(base, "ip-adapter_test.bin", scale=0.0)  # the .bin layout loads as well
    img, lat, _ = ours_run(zero, "ddim")
    assert np.array_equal(img, plain_img) and torch.equal(lat, plain_lat)
    zero.ip_adapter.adapter.set_scale(SCALE)
    changed, _, _ = ours_run(zero, "ddim")
    safetensors_img, _, _ = ours_run(ours(base, "ip-adapter_test.safetensors"), "ddim")
    assert np.array_equal(changed, safetensors_img) and not np.array_equal(changed, plain_img)
    zero.unload_ip_adapter()
    img, lat, _ = ours_run(zero, "ddim")
    assert np.array_equal(img, plain_img) and torch.equal(lat, plain_lat)
    assert "processor" not in "".join(zero.denoiser.state_dict())


def test_tokens_follow_the_batch_and_its_chunks(base):
    """Two images in one call (CFG batch 4) run in chunks of one row: each equals its own run."""
    pipe = ours(base, "ip-adapter-plus_test.safetensors")
    kw = dict(sampler="ddim", steps=3, guidance=GUIDANCE, height=16, width=16, progress=False, image_prompt=image_prompt(0))
    both = pipe.text2img([PROMPT, "a cat"], seed=7, max_model_batch=1, **kw)
    alone = pipe.text2img("a cat", seed=8, **kw)[0]
    assert np.array_equal(np.asarray(both[1].image), np.asarray(alone.image))


def test_image_processor_comes_from_the_encoder_folder_if_it_fits(base, tmp_path):
    from transformers import CLIPImageProcessor

    from ldmkit.io.ip_adapter_files import image_processor

    assert image_processor(base / "models" / "image_encoder", 32).image_mean == CLIPImageProcessor().image_mean
    CLIPImageProcessor(size=32, crop_size=32, image_mean=[0.5] * 3).save_pretrained(tmp_path / "fits")
    assert list(image_processor(tmp_path / "fits", 32).image_mean) == [0.5] * 3
    CLIPImageProcessor(size=224, crop_size=224, image_mean=[0.5] * 3).save_pretrained(tmp_path / "other")
    assert image_processor(tmp_path / "other", 32).crop_size == {"height": 32, "width": 32}  # diffusers' default


def test_img2img_and_inpaint_take_an_image_prompt(base):
    from PIL import Image

    pipe = ours(base, "ip-adapter_test.safetensors")
    start = image_prompt(4, (16, 16))
    kw = dict(seed=3, steps=4, progress=False)
    a = pipe.img2img(start, PROMPT, strength=0.8, image_prompt=image_prompt(0), **kw)[0]
    b = pipe.img2img(start, PROMPT, strength=0.8, image_prompt=image_prompt(1), **kw)[0]
    assert a.metadata["ip_adapter"] == "ip-adapter_test:0.6" and np.asarray(a.image).tolist() != np.asarray(b.image).tolist()
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    c = pipe.inpaint(start, mask, PROMPT, image_prompt=[image_prompt(0), image_prompt(1)], **kw)[0]
    assert c.metadata["ip_adapter"] == "ip-adapter_test:0.6"


def test_cli_ip_adapter(base, tmp_path, capsys):
    import json

    from PIL import Image

    from ldmkit.cli import main

    common = ["--model", str(base / "sd1"), "--prompt", PROMPT, "--steps", "2", "--seed", "1", "--device", "cpu",
              "--no-progress", "--height", "16", "--width", "16"]
    ip = ["--ip-adapter", str(base / "models" / "ip-adapter_test.safetensors"), "--image-prompt",
          str(base / "prompt.png"), "--ip-scale", "0.6"]
    assert main(["sample", *common, *ip, "--image-encoder", str(base / "models" / "image_encoder"),
                 "--out", str(tmp_path / "a.png"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["ip_adapter"] == "ip-adapter_test:0.6" and record["image_prompt"] == "prompt.png"
    from ldmkit.io.images import read_png_metadata

    stored = read_png_metadata(tmp_path / "a.png")  # the ldmkit chunk
    assert stored["ip_adapter"] == "ip-adapter_test:0.6" and "ip_adapter_hash" in stored
    Image.new("RGB", (16, 16), "gray").save(tmp_path / "start.png")
    assert main(["img2img", *common, *ip, "--image", str(tmp_path / "start.png"), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    (tmp_path / "not-an-image.png").write_text("hello")
    bad = [
        (["--image-prompt", str(base / "prompt.png")], "--image-prompt needs an IP-Adapter"),
        ([*ip[:2]], "--ip-adapter needs an image prompt"),
        ([*ip[:4], "--ip-scale", "3"], "--ip-scale 3"),
        ([*ip[:2], "--image-prompt", str(tmp_path / "not-an-image.png")], "cannot read --image-prompt"),
        ([*ip, "--image-encoder", str(tmp_path / "none")], "--image-encoder"),
        ([*ip[:4], "--image-encoder", str(base / "models")], "no config.json"),
    ]
    for args, message in bad:
        assert main(["sample", *common, *args, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["upscale", "--model", str(base / "sd1"), "--image", str(base / "prompt.png"), *ip,
                 "--out", str(tmp_path / "d")]) == 2
    assert "takes no IP-Adapter" in capsys.readouterr().err


def test_bad_ip_adapter_files(base, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from ldmkit.io.ip_adapter_files import read_ip_adapter

    good = (base / "models" / "ip-adapter_test.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_ip_adapter(tmp_path / "truncated.safetensors")
    unet = StableDiffusionPipeline.from_pretrained(base / "sd1", safety_checker=None).unet
    pipe = ours(base)
    models = tmp_path / "models"
    random_encoder().save_pretrained(models / "image_encoder")

    def refused(state, message, name="bad.safetensors", **kw):
        save_file(state, str(models / name))
        with pytest.raises(UserError, match=message) as info:
            pipe.load_ip_adapter(models / name, **kw)
        assert "\n" not in str(info.value)

    sdxl_width = basic_adapter(unet, context=2048)  # an SDXL-width adapter (2048-wide context) on SD 1
    refused(sdxl_width, r"ip_adapter.1.to_k_ip.weight is \(32, 2048\), this UNet's down_blocks.0.* takes \(32, 128\)")
    basic = basic_adapter(unet)
    refused({k: v for k, v in basic.items() if k not in ("ip_adapter.21.to_k_ip.weight", "ip_adapter.21.to_v_ip.weight")},
            "has 10 cross-attention layers, this UNet 11")
    refused({k: v for k, v in basic.items() if k.startswith("ip_adapter.")} | {"image_proj.proj.0.weight": torch.ones(2, 2),
            "image_proj.proj.3.weight": torch.ones(2)}, "Full-face")
    refused(basic | {"ip_adapter.1.to_k_lora.down.weight": torch.ones(2, 2)}, "FaceID's LoRA weights")
    refused({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, "not an IP-Adapter file")
    refused(basic | {"image_proj.proj.bias": torch.full((512,), float("nan"))}, "not finite")
    random_encoder(projection_dim=16).save_pretrained(tmp_path / "narrow")
    refused(basic, "takes image embeddings 24 wide, the image encoder gives 16", image_encoder=tmp_path / "narrow")
    (tmp_path / "lonely").mkdir()
    save_file(basic, str(tmp_path / "lonely" / "ip.safetensors"))
    with pytest.raises(UserError, match="needs a CLIP image encoder: pass --image-encoder"):
        pipe.load_ip_adapter(tmp_path / "lonely" / "ip.safetensors")
    refused(basic, r"scale 5.0 is outside \[0, 2\]", scale=5.0)
    with pytest.raises(UserError, match="no IP-Adapter is loaded"):
        pipe.text2img(PROMPT, image_prompt=image_prompt(0), steps=1, progress=False)
    pipe.load_ip_adapter(base / "models" / "ip-adapter_test.safetensors")
    with pytest.raises(UserError, match="no image prompt was given"):
        pipe.text2img(PROMPT, steps=1, progress=False)
    with pytest.raises(UserError, match="already loaded"):
        pipe.load_ip_adapter(base / "models" / "ip-adapter_test.safetensors")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image prompt"):
        pipe.text2img(PROMPT, image_prompt=tmp_path / "text.png", steps=1, progress=False)
