"""`ldm train --method controlnet`: a ControlNet for a frozen model from pairs of images and control images.
Step 0 is the base model exactly; only the ControlNet trains; the exported folder is a diffusers
ControlNetModel that diffusers' ControlNet pipeline runs to ldmkit's image; bad data is refused up front.
ControlNets also run on the extended UNet of the bundled demo model. The base is a tiny random SD."""
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

from ldmkit.errors import UserError  # noqa: E402
from ldmkit.training import Trainer  # noqa: E402
from ldmkit.training.methods import LDM, ControlNetMethod, ControlTrainConfig  # noqa: E402
from ldmkit.training.methods.ldm_parts import Stage2  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """A diffusers SD folder and control data: 6 captioned 16x16 images whose control image is a box mask."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cn-train")
    im.build_pipeline("sd1", scheduler="ddim", workdir=root).save_pretrained(root / "sd1")
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "data" / "images").mkdir(parents=True, exist_ok=True)
        (root / "data" / "conditioning").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / "data" / "images" / f"{i}.png")
        (root / "data" / "images" / f"{i}.txt").write_text("a red cat" if i % 2 else "a cat on a street")
        mask = np.zeros((16, 16, 3), np.uint8)
        mask[2 * i:2 * i + 6, 3:12] = 255
        Image.fromarray(mask).save(root / "data" / "conditioning" / f"{i}.png")
    return root


def config(base, tmp_path, **kw) -> ControlTrainConfig:
    cfg = dict(init_from=str(base / "sd1"), control_data=str(base / "data"), out=str(tmp_path / "run"), steps=2,
               batch_size=2, lr=1e-3, sample_steps=2, sample_sampler="ddim", progress=False, device="cpu",
               checkpoint_every=2, sample_every=100, seed=1, resolution=16)
    cfg.update(kw)
    return ControlTrainConfig(**cfg)


def test_step_zero_is_the_base_model_and_only_the_controlnet_trains(base, tmp_path):
    """The new ControlNet copies the UNet's encoder; through its zero convolutions the loss of the first
    batch is the frozen model's own to the last bit, and training moves the ControlNet alone."""
    trainer = Trainer(ControlNetMethod(config(base, tmp_path)))
    model = trainer.model
    unet = model.denoiser.state_dict()
    net = model.controlnet.state_dict()
    assert all(torch.equal(v, unet[k]) for k, v in net.items() if not k.startswith("controlnet_"))
    assert model.controlnet.factor == 2  # the tiny VAE's factor: control images at the output resolution
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"controlnet"}
    batch = next(iter(trainer.method.batches(0)))[0]
    with torch.no_grad():
        ours, _ = trainer.method.loss(model, batch, "main", 0)
        base_model = Stage2(model.denoiser, model.conditioner)  # the same frozen modules, no ControlNet
        plain, _ = LDM.loss(trainer.method, base_model, {**batch, "concat": None, "labels": None}, "main", 0)
    assert torch.equal(ours, plain)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.controlnet.named_parameters()}
    folder = trainer.run()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    moved = [n for n, p in model.controlnet.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("controlnet_down_blocks") for n in moved)
    assert folder.name == "controlnet" and (folder / "config.json").is_file()
    assert (tmp_path / "run" / "samples").is_dir()


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_exported_controlnet_runs_in_diffusers_to_our_image(base, tmp_path):
    """The trained ControlNet's folder loads in diffusers' ControlNet pipeline and in `ldm sample
    --controlnet`; same seed, same image."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from ldmkit.pipelines import load

    folder = Trainer(ControlNetMethod(config(base, tmp_path, steps=3, lr=2e-3))).run()
    control = Image.open(base / "data" / "conditioning" / "2.png")
    cn = ControlNetModel.from_pretrained(folder)
    assert float(cn.controlnet_down_blocks[0].weight.detach().abs().sum()) > 0  # trained: no longer zero
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base / "sd1", controlnet=cn, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red cat", image=control, height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    ours = load(base / "sd1", device="cpu", dtype=torch.float32)
    ours.load_controlnet(folder)
    image = ours.text2img("a red cat", control_image=control, seed=3, sampler="ddim", steps=4, guidance=5.0,
                          height=16, width=16, progress=False)[0].image
    assert psnr(image, (theirs * 255).round().astype(np.uint8)) >= 40


def test_resume_continues_exactly(base, tmp_path):
    straight = Trainer(ControlNetMethod(config(base, tmp_path, steps=4, out=str(tmp_path / "a"))))
    straight.run()
    first = Trainer(ControlNetMethod(config(base, tmp_path, steps=2, checkpoint_every=2, out=str(tmp_path / "b"))))
    first.run()
    resumed = Trainer(ControlNetMethod(config(base, tmp_path, steps=4, out=str(tmp_path / "b"))),
                      resume=tmp_path / "b" / "checkpoints" / "step-2.pt")
    resumed.run()
    a, b = straight.model.controlnet.state_dict(), resumed.model.controlnet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_control_data_is_refused_before_training(base, tmp_path):
    import shutil

    from PIL import Image

    from ldmkit.training.commands import _method_in

    assert _method_in(["train", "--control-data", "x"]) == "controlnet"
    with pytest.raises(UserError, match="give --init-from MODEL"):
        ControlNetMethod(config(base, tmp_path, init_from=None))
    with pytest.raises(UserError, match="give --control-data DIR"):
        ControlNetMethod(config(base, tmp_path, control_data=""))
    with pytest.raises(UserError, match="drop --data"):
        ControlNetMethod(config(base, tmp_path, data=str(base / "data")))
    bad = tmp_path / "bad"
    shutil.copytree(base / "data", bad)
    shutil.rmtree(bad / "conditioning")
    with pytest.raises(UserError, match="no conditioning/ folder"):
        Trainer(ControlNetMethod(config(base, tmp_path, control_data=str(bad), out=str(tmp_path / "r1"))))
    shutil.copytree(base / "data" / "conditioning", bad / "conditioning")
    (bad / "conditioning" / "4.png").unlink()
    with pytest.raises(UserError, match="4.png has no control image"):
        Trainer(ControlNetMethod(config(base, tmp_path, control_data=str(bad), out=str(tmp_path / "r2"))))
    Image.new("RGB", (8, 8)).save(bad / "conditioning" / "4.png")
    with pytest.raises(UserError, match="4.png is 8x8, its image .* 16x16"):
        Trainer(ControlNetMethod(config(base, tmp_path, control_data=str(bad), out=str(tmp_path / "r3"))))
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(bad / "conditioning" / "4.png")
    with pytest.raises(UserError, match="4.png has an alpha channel"):
        Trainer(ControlNetMethod(config(base, tmp_path, control_data=str(bad), out=str(tmp_path / "r4"))))
    # a control image that cannot be decoded is skipped with its image, as an unreadable image is
    (bad / "conditioning" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UserError):  # the header is damaged too: refused up front
        Trainer(ControlNetMethod(config(base, tmp_path, control_data=str(bad), out=str(tmp_path / "r5"))))


def test_cli_trains_a_controlnet(base, tmp_path, capsys):
    from ldmkit.cli import main

    rc = main(["train", "--init-from", str(base / "sd1"), "--control-data", str(base / "data"), "--steps", "1",
               "--batch-size", "2", "--resolution", "16", "--out", str(tmp_path / "cli"), "--sample-steps", "1",
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert "ControlNet written to" in capsys.readouterr().out
    assert (tmp_path / "cli" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    rc = main(["sample", "--model", str(base / "sd1"), "--controlnet", str(tmp_path / "cli" / "controlnet"),
               "--control-image", str(base / "data" / "conditioning" / "1.png"), "--prompt", "a red cat",
               "--steps", "2", "--height", "16", "--width", "16", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0


def test_controlnet_on_the_extended_unet_of_the_demo_model():
    """The bundled demo's UNet has a context adapter and position features: a ControlNet copies its plain
    UNet, reads the adapted context, and a new one leaves the images unchanged."""
    from ldmkit.denoisers.controlnet import ControlNet
    from ldmkit.pipelines import load
    from ldmkit.pipelines.control import Attached
    from ldmkit.training.methods.controlnet import embedding_stages

    pipe = load("demo-shapes", device="cpu", dtype=torch.float32)
    kw = dict(prompt="a red circle", seed=0, steps=4, progress=False)
    plain = np.asarray(pipe.text2img(**kw)[0].image)
    net = ControlNet.from_unet(pipe.denoiser, conditioning_embedding_out_channels=embedding_stages(4)).eval()
    pipe.controlnets = [Attached(net, "new")]
    control = torch.zeros(1, 3, 32, 32)
    assert np.array_equal(np.asarray(pipe.text2img(**kw, control_image=control)[0].image), plain)
    seen = []
    net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["context"]), with_kwargs=True)
    pipe.text2img(**kw, control_image=control, guidance=1.0)
    cond = pipe.conditioner.encode(["a red circle"])
    adapted = pipe.denoiser.adapt_context(cond.context, cond.mask)
    assert torch.allclose(seen[0], adapted[:, :seen[0].shape[1]], atol=1e-5)
