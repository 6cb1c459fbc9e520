"""ControlNet: the module equals diffusers' ControlNetModel (same weights in, same residuals out); a new
ControlNet leaves the UNet unchanged; text-to-image with ControlNets equals diffusers'
StableDiffusionControlNetPipeline (PSNR >= 40 dB, latents within 1e-4) with one or two ControlNets,
guess mode and a start / end window, loaded from a ControlNet folder or a ControlNet pipeline folder.

The base model is the tiny random Stable Diffusion of tests/interop_models.py (VAE factor 2, 16 px
images); its ControlNet is diffusers' ControlNetModel.from_unet with every weight randomised (zero
convolutions included, so that a wrong wiring cannot hide behind zeros)."""
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

STEPS, GUIDANCE = 6, 7.5


def random_controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for name, p in cn.named_parameters():  # the zero convolutions strong enough to show in the image
            p.add_(torch.randn_like(p) * (0.5 if name.startswith("controlnet_") else 0.05))
    return cn.eval()


def control_image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    from diffusers import StableDiffusionControlNetPipeline

    root = tmp_path_factory.mktemp("controlnet")
    pipe = im.build_pipeline("sd1", scheduler="ddim", workdir=root)
    pipe.save_pretrained(root / "sd1")
    for k in (1, 2):
        random_controlnet(pipe.unet, seed=10 + k).save_pretrained(root / f"cn{k}")
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder",)}
    cpipe = StableDiffusionControlNetPipeline(**parts, controlnet=random_controlnet(pipe.unet, seed=11))
    cpipe.save_pretrained(root / "sd1-control")
    return root


def test_module_matches_diffusers_controlnet(base):
    from diffusers import ControlNetModel

    from ldmkit.io.controlnet_files import read_controlnet

    ref = ControlNetModel.from_pretrained(base / "cn1").eval()
    ours = read_controlnet(base / "cn1")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 128, generator=g)
    cond = torch.rand(2, 3, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    for scale, guess in ((1.0, False), (0.6, True)):
        with torch.no_grad():
            down, mid = ref(x, t, ctx, cond, conditioning_scale=scale, guess_mode=guess, return_dict=False)
            got = ours(x, t, cond, context=ctx, scale=scale, guess_mode=guess)
        assert len(got.down) == len(down)
        for a, b in zip(got.down, down):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.mid, mid, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="control image has shape"):
        ours(x, t, cond[..., :8, :8], context=ctx)


def test_a_new_controlnet_leaves_the_unet_unchanged(base):
    from ldmkit.denoisers.controlnet import ControlNet
    from ldmkit.pipelines import load

    unet = load(base / "sd1", device="cpu").denoiser
    net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    for k, v in net.state_dict().items():  # the copied half is the UNet's
        if not k.startswith("controlnet_"):
            assert torch.equal(v, unet.state_dict()[k]), k
    g = torch.Generator().manual_seed(1)
    x, ctx, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 128, generator=g), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        r = net(x, 500, cond, context=ctx)
        plain = unet(x, 500, context=ctx)
        controlled = unet(x, 500, context=ctx, down_residuals=r.down, mid_residual=r.mid)
    assert all(float(d.abs().max()) == 0 for d in r.down) and float(r.mid.abs().max()) == 0
    assert torch.equal(plain, controlled)  # zero convolutions: step 0 of training is the base model


def diffusers_run(base, cn_folders, images, scale, **kw):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(base / "sd1", safety_checker=None)
    nets = [ControlNetModel.from_pretrained(base / f) for f in cn_folders]
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in sd.components.items() if k != "image_encoder"},
                                             controlnet=nets if len(nets) > 1 else nets[0])
    pipe.set_progress_bar_config(disable=True)
    args = dict(image=images if len(nets) > 1 else images[0], controlnet_conditioning_scale=scale,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=16, width=16, **kw)
    img = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **args).images[0]
    lat = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="latent", **args).images
    return (img * 255).round().astype(np.uint8), lat


def ours_run(pipe, images, guess_mode=False):
    from ldmkit.pipelines import control

    kw = dict(sampler="ddim", steps=STEPS, guidance=GUIDANCE, height=16, width=16, progress=False)
    img = np.asarray(pipe.text2img(PROMPT, seed=7, control_image=images, guess_mode=guess_mode, **kw)[0].image)
    tensors, _ = control.prepare(pipe, images, 16, 16, guess_mode)
    lat = pipe.sample_latents(pipe.settings(**kw), [PROMPT], None, [7], control=tensors, guess_mode=guess_mode)
    return img, lat


CASES = {
    "one": dict(nets=["cn1"], scale=1.0),
    "scale, guess mode": dict(nets=["cn1"], scale=0.8, guess=True),
    "start/end window": dict(nets=["cn1"], scale=1.0, start=0.2, end=0.7),
    "two ControlNets": dict(nets=["cn1", "cn2"], scale=[0.7, 0.4]),
}


@pytest.mark.parametrize("case", CASES)
def test_text2img_matches_diffusers_controlnet_pipeline(base, case):
    from ldmkit.pipelines import load

    c = CASES[case]
    scales = c["scale"] if isinstance(c["scale"], list) else [c["scale"]]
    images = [control_image(k) for k in range(len(c["nets"]))]
    start, end = c.get("start", 0.0), c.get("end", 1.0)
    ref_img, ref_lat = diffusers_run(base, c["nets"], images, c["scale"], guess_mode=c.get("guess", False),
                                     control_guidance_start=start, control_guidance_end=end)
    pipe = load(base / "sd1", device="cpu", dtype=torch.float32)
    for folder, s in zip(c["nets"], scales):
        pipe.load_controlnet(base / folder, scale=s, start=start, end=end)
    img, lat = ours_run(pipe, images, c.get("guess", False))
    p, rel = psnr(img, ref_img), float((lat - ref_lat).abs().max() / ref_lat.abs().max())
    print(f"ControlNet ({case}): PSNR {p:.1f} dB, latents max relative difference {rel:.1e}")
    assert p >= 40 and rel <= 1e-4, (p, rel)
    plain = np.asarray(pipe.text2img(PROMPT, seed=7, sampler="ddim", steps=STEPS, guidance=GUIDANCE, height=16,
                                     width=16, progress=False, control_image=[control_image(5)] * len(images))[0].image)
    assert psnr(plain, img) < 40  # another control image: another picture (below the parity bound)


def test_controlnet_pipeline_folder_loads_with_its_controlnet(base):
    from diffusers import StableDiffusionControlNetPipeline

    from ldmkit.pipelines import load

    ref = StableDiffusionControlNetPipeline.from_pretrained(base / "sd1-control", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    image = control_image(0)
    out = ref(PROMPT, image=image, generator=torch.Generator().manual_seed(7), output_type="np",
              num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=16, width=16).images[0]
    pipe = load(base / "sd1-control", device="cpu", dtype=torch.float32)
    assert len(pipe.controlnets) == 1
    img, _ = ours_run(pipe, [image])
    assert psnr(img, (out * 255).round().astype(np.uint8)) >= 40
    meta = pipe.text2img(PROMPT, seed=1, steps=2, height=16, width=16, progress=False, control_image=image)[0].metadata
    assert meta["controlnets"].startswith("controlnet:1") and "controlnet_hashes" in meta


def test_bad_control_inputs(base, tmp_path):
    from PIL import Image

    from ldmkit.pipelines import load

    pipe = load(base / "sd1", device="cpu", dtype=torch.float32)
    kw = dict(steps=1, height=16, width=16, progress=False)
    with pytest.raises(UserError, match="no ControlNet is loaded"):
        pipe.text2img(PROMPT, control_image=control_image(0), **kw)
    pipe.load_controlnet(base / "cn1")
    with pytest.raises(UserError, match="no control image"):
        pipe.text2img(PROMPT, **kw)
    with pytest.raises(UserError, match="1 ControlNet\\(s\\) but 2 control image"):
        pipe.text2img(PROMPT, control_image=[control_image(0), control_image(1)], **kw)
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    with pytest.raises(UserError, match="transparent"):
        pipe.text2img(PROMPT, control_image=rgba, **kw)
    with pytest.raises(UserError, match="another aspect ratio"):
        pipe.text2img(PROMPT, control_image=Image.new("RGB", (32, 16)), control_fit="error", **kw)
    gray = Image.new("L", (32, 32), 128)  # grayscale edge maps are fine (read as RGB), and resized
    assert pipe.text2img(PROMPT, control_image=gray, **kw)[0].image.size == (16, 16)
    with pytest.raises(UserError, match="start"):
        pipe.load_controlnet(base / "cn1", start=0.8, end=0.2)
    with pytest.raises(UserError, match="not a diffusers ControlNet folder"):
        pipe.load_controlnet(tmp_path)
    # a ControlNet of another base: its cross-attention width differs
    from diffusers import ControlNetModel

    other = ControlNetModel(block_out_channels=(32, 32, 64), cross_attention_dim=64, norm_num_groups=32,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                            layers_per_block=2, conditioning_embedding_out_channels=(16, 32), attention_head_dim=8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="cross_attention_dim is 64"):
        pipe.load_controlnet(tmp_path / "other")


def test_cli_controlnet(base, tmp_path):
    import json
    import subprocess

    control_image(3).save(tmp_path / "edges.png")

    def ldm(*args):
        return subprocess.run([sys.executable, "-m", "ldmkit.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=600)

    common = ["--prompt", PROMPT, "--steps", "2", "--seed", "1", "--device", "cpu", "--no-progress"]
    done = ldm("sample", "--model", base / "sd1", "--controlnet", f"{base / 'cn1'}:0.8", "--control-image",
               tmp_path / "edges.png", "--control-end", "0.5", "--out", tmp_path / "a", "--json", *common)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)[0]
    assert record["controlnets"] == "cn1:0.8 [0-0.5]" and record["size"] == "16x16"
    done = ldm("img2img", "--model", base / "sd1-control", "--image", tmp_path / "edges.png", "--control-image",
               tmp_path / "edges.png", "--out", tmp_path / "b", *common)
    assert done.returncode == 0, done.stderr
    for bad, msg in (([f"{base / 'cn1'}", "--controlnet", f"{base / 'cn2'}"], "2 --controlnet but 1 --control-image"),
                     ([f"{base / 'cn1'}:9999"], "scale 9999 must be a number"),
                     ([str(tmp_path / "none")], "does not exist")):
        done = ldm("sample", "--model", base / "sd1", "--controlnet", *bad, "--control-image", tmp_path / "edges.png",
                   "--out", tmp_path / "c", *common)
        assert done.returncode == 2 and msg in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = ldm("sample", "--model", base / "sd1-control", "--out", tmp_path / "d", *common)
    assert done.returncode == 2 and "no control image given" in done.stderr, done.stderr


def test_control_image_command(tmp_path):
    import subprocess

    import cv2
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 48), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 30, 30), fill=(200, 30, 30))
    draw.rectangle((36, 12, 58, 40), fill=(30, 60, 200))
    image.save(tmp_path / "in.png")

    def ldm(*args):
        return subprocess.run([sys.executable, "-m", "ldmkit.cli", "control-image", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    for kind in ("canny", "scribble", "softedge", "segmentation"):
        done = ldm("--kind", kind, "--image", tmp_path / "in.png", "--out", tmp_path / f"{kind}.png")
        assert done.returncode == 0, done.stderr
    canny = np.asarray(Image.open(tmp_path / "canny.png"))
    assert canny.shape == (48, 64, 3) and np.array_equal(canny[..., 0], cv2.Canny(np.asarray(image), 100, 200))
    assert set(np.unique(canny)) == {0, 255} and (canny > 0).mean() > 0.02  # outlines of both shapes
    scribble, soft = np.asarray(Image.open(tmp_path / "scribble.png")), np.asarray(Image.open(tmp_path / "softedge.png"))
    assert (scribble > 0).any() and scribble[0, 0, 0] == 0 and soft.max() == 255 and soft[0, 0, 0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "segmentation.png")), np.asarray(image))
    done = ldm("--kind", "canny", "--image", tmp_path / "in.png", "--out", tmp_path / "r.png", "--resolution", "96")
    assert done.returncode == 0 and Image.open(tmp_path / "r.png").size == (128, 96)
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    for bad, msg in ((["--kind", "canny", "--image", tmp_path / "in.png", "--out", tmp_path / "canny.png"], "exists"),
                     (["--kind", "canny", "--image", tmp_path / "clear.png", "--out", tmp_path / "c.png"], "transparent"),
                     (["--kind", "canny", "--image", tmp_path / "in.png", "--out", tmp_path / "c.png", "--low", "300"],
                      "--low 300 and --high 200"),
                     (["--kind", "canny", "--image", tmp_path / "nope.png", "--out", tmp_path / "c.png"], "does not exist")):
        done = ldm(*bad)
        assert done.returncode == 2 and msg in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def to_original_controlnet(cn) -> dict:
    """A diffusers ControlNetModel's weights in the original single-file layout (control_model.*)."""
    from types import SimpleNamespace

    c = cn.config
    rows = im.ldm_unet_table(SimpleNamespace(block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                                             down_block_types=c.down_block_types,
                                             up_block_types=[t.replace("Down", "Up") for t in c.down_block_types[::-1]]))
    last = 2 * len(cn.controlnet_cond_embedding.blocks) + 2
    sd = {}
    for k, v in cn.state_dict().items():
        head, _, rest = k.partition(".")
        if head == "controlnet_cond_embedding":
            part, _, tail = rest.partition(".")
            if part == "blocks":
                j, _, tail = tail.partition(".")
                new = f"input_hint_block.{2 * int(j) + 2}.{tail}"
            else:
                new = f"input_hint_block.{0 if part == 'conv_in' else last}.{tail}"
        elif head == "controlnet_down_blocks":
            i, _, tail = rest.partition(".")
            new = f"zero_convs.{i}.0.{tail}"
        elif head == "controlnet_mid_block":
            new = f"middle_block_out.0.{rest}"
        else:
            new = im._rename(k, rows, im._resblock_rest)
        sd["control_model." + new] = v.clone()
    return sd


def test_original_single_file_controlnet(base, tmp_path):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import save_file

    from ldmkit.io.controlnet_files import read_controlnet
    from ldmkit.pipelines import load

    # the layout written here is the one diffusers' own converter reads (it knows only the standard
    # 16-32-96-256 embedder, whose conv_out is input_hint_block.14), and ours reads it too
    standard = ControlNetModel.from_unet(ControlNetModel.from_pretrained(base / "cn1"))  # default embedder
    original = to_original_controlnet(standard)
    back = convert_controlnet_checkpoint(original, dict(standard.config))
    assert set(back) == set(standard.state_dict())
    assert all(torch.equal(back[k], v) for k, v in standard.state_dict().items())
    save_file(original, str(tmp_path / "control_standard.safetensors"))
    net = read_controlnet(tmp_path / "control_standard.safetensors")
    assert net.config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in standard.state_dict().items())

    ref = ControlNetModel.from_pretrained(base / "cn1")
    original = to_original_controlnet(ref)
    save_file(original, str(tmp_path / "control_test.safetensors"))
    save_file({k.removeprefix("control_model."): v for k, v in original.items()}, str(tmp_path / "bare.safetensors"))
    for f in ("control_test.safetensors", "bare.safetensors"):
        net = read_controlnet(tmp_path / f)
        assert net.config.conditioning_embedding_out_channels == (16, 32)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in ref.state_dict().items())
    pipe = load(base / "sd1", device="cpu", dtype=torch.float32)
    pipe.load_controlnet(tmp_path / "control_test.safetensors")
    folder = load(base / "sd1", device="cpu", dtype=torch.float32)
    folder.load_controlnet(base / "cn1")
    a, b = ours_run(pipe, [control_image(0)]), ours_run(folder, [control_image(0)])
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(tmp_path / "not.safetensors"))
    with pytest.raises(UserError, match="not a ControlNet"):
        read_controlnet(tmp_path / "not.safetensors")
