"""Method "ldm" with spatial (concat) conditioning: inpainting, super-resolution, semantic maps.

Each kind trains a few steps on a tiny cache, exports a model folder, and that folder runs in the
matching task; the spatial input the method builds equals the one the pipeline feeds the denoiser."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ldmkit.conditioning.spatial import centre_mask, low_res_input
from ldmkit.errors import UserError
from ldmkit.training import LDM, LDMConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.data.latents import encode_dataset
    from ldmkit.data.shapes import SEGMENTATION_CLASSES, ShapesDataset
    from ldmkit.io.format import save_component

    root = tmp_path_factory.mktemp("spatial")
    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["tiny-kl-f4"])
    save_component(ae, root / "ae")
    ds = ShapesDataset("train", size=32, length=8, seed=0, segmentation=True)
    encode_dataset(ae, ds, root / "full", progress=False, store_images=True, store_segmentation=True,
                   segmentation_classes=list(SEGMENTATION_CLASSES))
    encode_dataset(ae, ds, root / "plain", progress=False)
    return root


def config(root, tmp_path, **kw) -> LDMConfig:
    base = dict(latents=str(root / "full"), autoencoder=str(root / "ae"), out=str(tmp_path / "run"), preset="tiny",
                text_encoder="tiny", steps=3, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=3,
                sample_every=3, sample_steps=2, sample_sampler="ddim", sample_seeds=(0,), progress=False, seed=2,
                device="cpu")
    base.update(kw)
    return LDMConfig(**base)


def make_trainer(cfg, **kw) -> Trainer:
    return Trainer(LDM(cfg, **kw))


def step(trainer) -> dict:
    return trainer.train_step(next(iter(trainer.method.batches(trainer.step))))


def _image(trainer, i=0):
    from ldmkit.data.latents import uint8_to_image

    return uint8_to_image(trainer.method.data.images[i])


def _capture_inputs(pipe):
    """Record (x, class_labels) of every denoiser call."""
    seen = []
    pipe.denoiser.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].detach().clone(), kwargs.get("class_labels"))),
        with_kwargs=True)
    return seen


def test_inpaint_trains_exports_and_matches_the_pipeline_input(root, tmp_path):
    from ldmkit import pipelines

    trainer = make_trainer(config(root, tmp_path, spatial="inpaint", conditioning="text"))
    assert trainer.model.denoiser.config.in_channels == 4 + 1 + 4
    assert math.isfinite(step(trainer)["loss"])
    folder = trainer.run()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["concat"] == "inpaint" and "spatial" in index["components"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["spatial"] == "inpaint" and saved["spatial"]["kind"] == "inpaint"
    assert (tmp_path / "run" / "samples" / "step_0000003.png").is_file()

    pipe = pipelines.load(folder, device="cpu")
    assert pipe.tasks == ["inpaint"]
    seen = _capture_inputs(pipe)
    image, mask = _image(trainer), centre_mask(32, 32)
    out = pipe.inpaint(image, mask, "a red circle", steps=2, guidance=1.0, progress=False)
    assert out[0].image.size == (32, 32) and out[0].metadata["inpaint_mode"] == "concat"
    # the pipeline's [mask, masked-image latents] is exactly what the method concatenates
    concat, labels = trainer.method.spatial_input(torch.tensor([0]), {"mask": mask}, torch.tensor([0]))
    assert labels is None and concat.shape == (1, 5, 8, 8)
    torch.testing.assert_close(seen[0][0][:, 4:], concat, rtol=0, atol=1e-5)


def test_inpaint_pipeline_keeps_the_unmasked_latents(root, tmp_path):
    """With blending on, the latents outside the mask are the input's (the pipeline contract for
    concat models, whose default is to let the model fill the hole from the concat input)."""
    from ldmkit import pipelines
    from ldmkit.pipelines.base import latent_mask

    trainer = make_trainer(config(root, tmp_path, spatial="inpaint", conditioning="none", steps=2, sample_every=10))
    pipe = pipelines.load(trainer.run(), device="cpu")
    decoded = []
    real_decode = pipe.decode
    pipe.decode = lambda z, s: (decoded.append(z.clone()), real_decode(z, s))[1]
    image, mask = _image(trainer, 1), centre_mask(32, 32)
    pipe.inpaint(image, mask, blend=True, steps=2, progress=False)
    keep = latent_mask(mask, 4) == 0
    z_in = pipe.encode(image[None])
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(decoded[0].expand_as(z_in)[keep.expand_as(z_in)], z_in[keep.expand_as(z_in)])
    pipe.inpaint(image, mask, steps=2, progress=False)  # default for a concat model: no blending
    assert not torch.allclose(decoded[1][keep.expand_as(z_in)], z_in[keep.expand_as(z_in)])


def test_upscale_with_noise_level_matches_ldm_upscale(root, tmp_path):
    from ldmkit import pipelines
    from ldmkit.conditioning.spatial import NOISE_LEVELS

    trainer = make_trainer(config(root, tmp_path, spatial="upscale", conditioning="none", noise_level_max=100))
    assert trainer.model.denoiser.config.in_channels == 4 + 3
    assert trainer.model.denoiser.config.num_class_embeds == NOISE_LEVELS
    draws = trainer.method.draw(0)
    assert draws["level"].min() >= 0 and draws["level"].max() <= 100
    assert math.isfinite(step(trainer)["loss"])
    folder = trainer.run()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["concat"] == "upscale" and index["defaults"]["noise_level"] == 20

    pipe = pipelines.load(folder, device="cpu")
    seen = _capture_inputs(pipe)
    low = low_res_input(_image(trainer)[None], (8, 8))[0]
    out = pipe.upscale(low, seed=5, steps=2, progress=False)
    assert out[0].image.size == (32, 32) and out[0].metadata["noise_level"] == 20
    # same low-res input, noise level and augmentation noise -> the same concat and label
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    concat, labels = trainer.method.spatial_input(torch.tensor([0]), {"level": torch.tensor([20]), "lr_noise": noise},
                                                  torch.tensor([0]))
    torch.testing.assert_close(seen[0][0][:, 4:], concat, rtol=0, atol=1e-5)
    assert seen[0][1].tolist() == [20] and labels.tolist() == [20]


@pytest.mark.parametrize("denoiser,conditioning", [("dit", "text"), ("unet", "class")])
def test_upscale_without_noise_labels(root, tmp_path, denoiser, conditioning):
    """DiTs and class-conditional UNets get no noise-level input (what `ldm upscale` assumes of them)."""
    from ldmkit import pipelines

    cfg = config(root, tmp_path, spatial="upscale", denoiser=denoiser, conditioning=conditioning, steps=2,
                 sample_every=10)
    trainer = make_trainer(cfg)
    assert not trainer.method.noise_labels and "level" not in trainer.method.draw(0)
    pipe = pipelines.load(trainer.run(), device="cpu")
    kw = {"class_label": 1} if conditioning == "class" else {"prompt": "a red circle"}
    out = pipe.upscale(low_res_input(_image(trainer)[None], (8, 8))[0], steps=2, progress=False, **kw)
    assert out[0].image.size == (32, 32) and "noise_level" not in out[0].metadata


@pytest.mark.parametrize("denoiser,conditioning", [("unet", "text"), ("dit", "none")])
def test_semantic_trains_and_samples_from_maps(root, tmp_path, denoiser, conditioning):
    from ldmkit import pipelines
    from ldmkit.io.images import pil_to_tensor

    trainer = make_trainer(config(root, tmp_path, spatial="semantic", denoiser=denoiser, conditioning=conditioning))
    assert trainer.method.spatial.channels == 4 and trainer.model.denoiser.config.in_channels == 4 + 4
    assert math.isfinite(step(trainer)["loss"])
    folder = trainer.run()
    assert (tmp_path / "run" / "samples" / "step_0000003.png").is_file()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["concat"] == "semantic" and "spatial" in index["components"]
    # the folder samples through the pipeline's semantic2img (what replaced training.ldm.sample_semantic)
    pipe = pipelines.load(folder, device="cpu")
    assert pipe.tasks == ["semantic2img"] and pipe.num_classes == 4 and pipe.spatial.config.num_classes == 4
    seg = trainer.method.data.segmentation[:2].long()
    conds = ["a red circle", "a blue square"] if conditioning == "text" else None

    def sample(maps):
        res = pipe.semantic2img(maps, conds, num=2, seed=1, steps=2, batch_size=2, progress=False)
        return torch.stack([pil_to_tensor(r.image) for r in res])

    x = sample(seg)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    assert torch.equal(x, sample(seg))
    # the map drives the sample: another map, another image
    assert not torch.equal(x, sample(seg.flip(-1)))
    # the grid the run made went through the same task: a row of coloured maps, a row of samples
    from PIL import Image

    assert Image.open(tmp_path / "run" / "samples" / "step_0000003.png").size[1] > 2 * 32


def test_semantic_input_is_the_resized_one_hot_map(root, tmp_path):
    trainer = make_trainer(config(root, tmp_path, spatial="semantic", conditioning="none"))
    seg = trainer.method.data.segmentation[:2]
    concat, labels = trainer.method.spatial_input(torch.arange(2), {}, torch.arange(2))
    assert labels is None and concat.shape == (2, 4, 8, 8)
    assert torch.equal(concat.sum(1), torch.ones(2, 8, 8))  # one class per cell
    assert torch.equal(concat.argmax(1), seg[:, ::4, ::4].long())  # torch nearest: first pixel of a cell


def test_condition_dropout_keeps_the_spatial_input(root, tmp_path):
    from ldmkit.conditioning.base import Conditioning

    trainer = make_trainer(config(root, tmp_path, spatial="semantic", conditioning="text"))
    model = trainer.model.eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    concat = torch.rand(2, 4, 8, 8)

    def denoise(cond):
        return model.denoiser(cond.denoiser_input(x), t, **cond.denoiser_kwargs())

    with torch.no_grad():
        dropped = model(x, t, ["a red circle", "a blue square"], torch.tensor([True, True]), concat=concat)
        want = denoise(model.conditioner.null(2).merge(Conditioning(concat=concat)))
        zeros = denoise(model.conditioner.null(2).merge(Conditioning(concat=torch.zeros_like(concat))))
    torch.testing.assert_close(dropped, want)
    assert not torch.allclose(dropped, zeros)


def test_random_masks_mix_full_empty_and_partial():
    from ldmkit.conditioning.spatial import MASK_FULL, MASK_NONE, random_masks

    m = random_masks(400, 32, 24, torch.Generator().manual_seed(0))
    assert m.shape == (400, 1, 32, 24) and set(m.unique().tolist()) <= {0.0, 1.0}
    cover = m.mean((1, 2, 3))
    full, empty = (cover == 1).float().mean(), (cover == 0).float().mean()
    assert abs(full - MASK_FULL) < 0.07 and abs(empty - MASK_NONE) < 0.05
    partial = cover[(cover > 0) & (cover < 1)]
    assert len(partial) > 200 and 0.05 < float(partial.mean()) < 0.7
    assert torch.equal(m, random_masks(400, 32, 24, torch.Generator().manual_seed(0)))


def test_resume_is_exact_with_spatial_inpaint(root, tmp_path):
    def weights(tr):
        return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}

    cfg = config(root, tmp_path, spatial="inpaint", conditioning="text", steps=4, sample_every=100,
                 checkpoint_every=100)
    full = make_trainer(cfg)
    for _ in range(4):
        step(full)
    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "run2"))
    first = make_trainer(cfg2)
    for _ in range(2):
        step(first)
    ckpt = first.save_checkpoint()
    first.lock.release()
    second = Trainer(LDM(cfg2), resume=ckpt)
    assert second.step == 2
    for _ in range(2):
        step(second)
    a, b = weights(full), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resume must not switch the spatial input
    second.lock.release()
    with pytest.raises(UserError, match=r"other \['spatial'\]"):
        Trainer(LDM(dataclasses.replace(cfg2, spatial="upscale")), resume=ckpt)


def test_missing_cache_inputs_name_the_fix(root, tmp_path):
    from ldmkit.training.config import check

    plain = str(root / "plain")
    with pytest.raises(UserError, match=r"ldm cache-latents --store-images"):
        make_trainer(config(root, tmp_path, latents=plain, spatial="upscale"))
    with pytest.raises(UserError, match=r"ldm cache-latents --segmentation"):
        make_trainer(config(root, tmp_path, latents=plain, spatial="semantic"))
    with pytest.raises(UserError, match=r"spatial='depth' must be one of \['inpaint', 'upscale', 'semantic'\]"):
        check(config(root, tmp_path, spatial="depth"))
    with pytest.raises(UserError, match=r"noise_level_max=1000 is outside the allowed range \[0, 999\]"):
        make_trainer(config(root, tmp_path, noise_level_max=1000))
    # a plain (format 1 style) cache still trains without spatial input (the failed starts left the folder free)
    trainer = make_trainer(config(root, tmp_path, latents=plain, conditioning="text"))
    assert trainer.method.data.images is None and math.isfinite(step(trainer)["loss"])


def test_image_size_must_fit_the_latents(root, tmp_path):
    from ldmkit.data.latents import LatentData

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 4, 8, 8, generator=g)
    wrong = LatentData(mean, captions=["a red circle"] * 4,
                       images=torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"16x16 images/maps but 8x8 latents.*must be 32x32"):
        make_trainer(config(root, tmp_path, latents="memory", spatial="inpaint"), data=wrong)
    with pytest.raises(ValueError, match="images must be uint8"):
        LatentData(mean, images=torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match="segmentation maps must be integer"):
        LatentData(mean, segmentation=torch.zeros(4, 32, 32))


def test_cli_spatial_training_and_errors(root, tmp_path, capsys):
    from ldmkit.cli import main

    args = ["train", "--autoencoder", str(root / "ae"), "--preset", "tiny", "--batch-size", "4", "--steps", "2",
            "--sample-every", "100", "--sample-steps", "2", "--sampler", "ddim", "--no-progress", "--device", "cpu",
            "--conditioning", "none"]
    assert main([*args, "--latents", str(root / "plain"), "--out", str(tmp_path / "bad"),
                 "--spatial", "inpaint"]) == 2
    assert "ldm cache-latents --store-images" in capsys.readouterr().err
    out = tmp_path / "ok"
    assert main([*args, "--latents", str(root / "full"), "--out", str(out), "--spatial", "upscale",
                 "--noise-level-max", "50"]) == 0
    assert "ldm upscale --image LOWRES --model" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["spatial"] == "upscale" and saved["noise_level_max"] == 50
    assert main([*args[:1], "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert main([*args[:1], "--out", str(out), "--resume", "--spatial", "inpaint"]) == 2
    assert "['spatial']" in capsys.readouterr().err


@pytest.mark.slow  # two Python start-ups + torchrun: about 18 s on 2 shared cores
def test_two_gloo_processes_match_one_with_inpaint_masks(root, tmp_path):
    """Masks are drawn for the global batch and each rank takes its rows: 2 DDP processes make the
    same update as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    ae = str(root / "ae")
    single = subprocess.run([sys.executable, str(worker), ae, str(tmp_path / "single"), "inpaint"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
                            str(worker), ae, str(tmp_path / "ddp"), "inpaint"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "ddp-rank0.pt", weights_only=True)
    assert r0["world_size"] == 2
    assert torch.allclose(r0["losses"], one["losses"], rtol=1e-4, atol=1e-5), (r0["losses"], one["losses"])
    for k, v in one["weights"].items():
        assert torch.allclose(r0["weights"][k], v, rtol=1e-3, atol=1e-5), k
