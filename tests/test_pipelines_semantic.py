"""Semantic synthesis (`"concat": "semantic"`) through the normal pipeline and CLI, on a model folder
written by a 2-step `ldm train --spatial semantic` run here (CPU, seconds): output size, the denoiser
input equals what training feeds, CFG keeps the map in both branches (as condition dropout does), the
run's sample grid is what `semantic2img` gives, PNG maps, `ldm semantic`, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import pipelines
from ldmkit.cli import main
from ldmkit.io.images import pil_to_tensor, read_png_metadata
from ldmkit.training import LDM, LDMConfig, Trainer
from ldmkit.training.methods.ldm import Stage2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """(trainer, exported folder, root with the autoencoder and the cache) of a text-conditioned semantic UNet."""
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.data.latents import encode_dataset
    from ldmkit.data.shapes import SEGMENTATION_CLASSES, ShapesDataset
    from ldmkit.io.format import save_component

    root = tmp_path_factory.mktemp("semantic")
    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["tiny-kl-f4"])
    save_component(ae, root / "ae")
    ds = ShapesDataset("train", size=32, length=8, seed=0, segmentation=True)
    encode_dataset(ae, ds, root / "cache", progress=False, store_segmentation=True,
                   segmentation_classes=list(SEGMENTATION_CLASSES))
    cfg = LDMConfig(latents=str(root / "cache"), autoencoder=str(root / "ae"), out=str(root / "run"),
                    preset="tiny", text_encoder="tiny", conditioning="text", spatial="semantic", steps=2,
                    batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=100, sample_every=100,
                    sample_steps=2, sample_sampler="ddim", sample_seeds=(0,), progress=False, seed=2, device="cpu")
    trainer = Trainer(LDM(cfg))
    folder = trainer.run()
    return trainer, folder, root


@pytest.fixture()
def pipe(run):
    return pipelines.load(run[1], device="cpu")


def _maps(run, n=2):
    return run[0].method.data.segmentation[:n].long()


def _capture(pipe):
    """(x, context, t) of every denoiser call."""
    seen = []
    pipe.denoiser.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].detach().clone(), kwargs.get("context"), args[1])),
        with_kwargs=True)
    return seen


def test_load_and_sample_gives_the_map_size_and_metadata(run, pipe):
    index = json.loads((run[1] / "model_index.json").read_text())
    assert index["concat"] == "semantic"
    assert pipe.concat == "semantic" and pipe.num_classes == 4 and pipe.tasks == ["semantic2img"]
    assert pipe.spatial.config.kind == "semantic"
    seg = _maps(run)
    res = pipe.semantic2img(seg, "a red circle", seed=3, steps=2, batch_size=1, progress=False)
    assert len(res) == 2  # one image per map of the batch
    assert [r.image.size for r in res] == [(32, 32)] * 2
    meta = res[0].metadata
    assert (meta["task"], meta["prompt"], meta["seed"], meta["steps"], meta["size"]) == \
        ("semantic2img", "a red circle", 3, 2, "32x32")
    assert meta["map_classes"] == ",".join(str(c) for c in torch.unique(seg[0]).tolist())
    assert res[1].metadata["seed"] == 4 and "map" not in meta  # no file: no map name
    # the output size is the map's, any multiple of f (the UNet is convolutional)
    wide = torch.zeros(24, 40, dtype=torch.long)
    wide[4:20, 8:24] = 2
    out = pipe.semantic2img(wide, "a red circle", steps=2, progress=False)
    assert out[0].image.size == (40, 24) and out[0].metadata["size"] == "40x24"
    # the same seed gives the same image; image i uses map i % B and seed + i
    again = pipe.semantic2img(seg[1], "a red circle", seed=4, steps=2, progress=False)
    assert np.array_equal(np.asarray(again[0].image), np.asarray(res[1].image))
    # the map drives the image
    other = pipe.semantic2img(seg[1].flip(-1), "a red circle", seed=4, steps=2, progress=False)
    assert not np.array_equal(np.asarray(other[0].image), np.asarray(res[1].image))


def test_denoiser_input_is_what_training_feeds(run, pipe):
    method = run[0].method
    seg = _maps(run, 3)
    seen = _capture(pipe)
    pipe.semantic2img(seg, ["a red circle", "a blue square", "a green triangle"], steps=2, guidance=1.0,
                      progress=False)
    concat, labels = method.spatial_input(torch.arange(3), {}, torch.arange(3))
    assert labels is None and concat.shape == (3, 4, 8, 8)
    assert len(seen) == 2 and seen[0][0].shape == (3, 8, 8, 8)  # guidance 1: no unconditional branch
    for x, _, _ in seen:
        torch.testing.assert_close(x[:, 4:], concat, rtol=0, atol=0)


def test_cfg_keeps_the_map_in_both_branches_like_condition_dropout(run, pipe):
    """The unconditional branch is training's dropped condition: null text, the same map."""
    method = run[0].method
    seg = _maps(run)
    prompts = ["a red circle", "a blue square"]
    seen = _capture(pipe)
    outs = []
    pipe.denoiser.register_forward_hook(lambda mod, args, out: outs.append(out.detach().clone()))
    pipe.semantic2img(seg, prompts, steps=2, guidance=3.0, progress=False)
    concat, _ = method.spatial_input(torch.arange(2), {}, torch.arange(2))
    x, context, t = seen[0]
    assert x.shape == (4, 8, 8, 8)  # [uncond; cond]
    torch.testing.assert_close(x[:2, 4:], concat, rtol=0, atol=0)
    torch.testing.assert_close(x[2:, 4:], concat, rtol=0, atol=0)
    assert not torch.allclose(context[:2], context[2:])  # only the text differs between the branches
    # training's forward with every condition dropped == the pipeline's unconditional branch
    model = Stage2(pipe.denoiser, pipe.conditioner).eval()
    with torch.no_grad():
        dropped = model(x[:2, :4], t[:2], prompts, torch.tensor([True, True]), concat=concat)
        kept = model(x[2:, :4], t[2:], prompts, torch.tensor([False, False]), concat=concat)
    torch.testing.assert_close(outs[0][:2], dropped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][2:], kept, rtol=1e-5, atol=1e-5)


def test_png_maps_grey_palette_and_grey_rgb_agree(run, pipe, tmp_path):
    seg = _maps(run, 1)[0]
    arr = seg.numpy().astype(np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "grey.png")
    pal = Image.fromarray(arr, mode="P")
    pal.putpalette([255, 255, 255, 230, 30, 30, 40, 70, 220, 30, 170, 50] + [0] * 744)
    pal.save(tmp_path / "palette.png")
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "rgb.png")
    ref = pipe.semantic2img(seg, "a red circle", seed=2, steps=2, progress=False)[0]
    for name in ("grey.png", "palette.png", "rgb.png"):
        got = pipe.semantic2img(tmp_path / name, "a red circle", seed=2, steps=2, progress=False)[0]
        assert np.array_equal(np.asarray(got.image), np.asarray(ref.image)), name
        assert got.metadata["map"] == str(tmp_path / name)


def test_cli_semantic_round_trip(run, tmp_path, capsys):
    seg = _maps(run, 1)[0]
    Image.fromarray(seg.numpy().astype(np.uint8), mode="L").save(tmp_path / "map.png")
    rc = main(["semantic", "--model", str(run[1]), "--map", str(tmp_path / "map.png"), "--prompt", "a red circle",
               "--num", "2", "--seed", "7", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "o.png"),
               "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    records = json.loads(out)
    assert [r["file"] for r in records] == [str(tmp_path / "o-0000.png"), str(tmp_path / "o-0001.png")]
    for k, r in enumerate(records):
        meta = read_png_metadata(r["file"])
        assert meta == {key: v for key, v in r.items() if key != "file"}
        assert (meta["task"], meta["prompt"], meta["seed"], meta["map"], meta["size"]) == \
            ("semantic2img", "a red circle", 7 + k, str(tmp_path / "map.png"), "32x32")
        assert meta["guidance"] == 4.0  # the model's default (LDMConfig.guidance)
        assert Image.open(r["file"]).size == (32, 32)
    # the CLI gives what the Python call gives
    pipe = pipelines.load(run[1], device="cpu")
    ref = pipe.semantic2img(seg, "a red circle", num=2, seed=7, steps=2, progress=False)
    for r, want in zip(records, ref):
        assert np.array_equal(np.asarray(Image.open(r["file"]).convert("RGB")), np.asarray(want.image))


def test_bad_maps_and_tasks_are_clear_errors(run, pipe, tmp_path):
    seg = _maps(run, 1)[0]
    with pytest.raises(ValueError, match=r"class map size 30x30 must be a positive multiple of 4"):
        pipe.semantic2img(seg[:30, :30], "x", steps=2, progress=False)
    bad = seg.clone()
    bad[0, 0] = 4
    with pytest.raises(ValueError, match=r"class id 4; this model knows 4 classes \(ids 0-3\)"):
        pipe.semantic2img(bad, "x", steps=2, progress=False)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="class id -1"):
        pipe.semantic2img(bad, "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="dtype torch.float32; a class map holds integer class ids"):
        pipe.semantic2img(seg.float(), "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="dtype float64"):
        pipe.semantic2img(seg.numpy().astype(np.float64), "x", steps=2, progress=False)
    with pytest.raises(ValueError, match=r"shape \(1, 1, 32, 32\); expected \[H, W\]"):
        pipe.semantic2img(seg[None, None], "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="one size"):
        pipe.semantic2img([seg, seg[:16, :16]], "x", steps=2, progress=False)
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="RGB colour image; a class map holds one class id per pixel"):
        pipe.semantic2img(tmp_path / "colour.png", "x", steps=2, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.semantic2img(tmp_path / "missing.png", "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="takes the output size from the class map; do not pass height"):
        pipe.semantic2img(seg, "x", height=64, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"supports semantic2img, not text2img \(.*ldm semantic --map"):
        pipe.text2img("x", steps=2, progress=False)
    with pytest.raises(ValueError, match="supports semantic2img, not inpaint"):
        pipe.inpaint(torch.zeros(3, 32, 32), torch.zeros(1, 32, 32), "x")


def test_models_that_do_not_fit_semantic_are_refused(run, pipe, tmp_path):
    from ldmkit.conditioning import SpatialConditioner, SpatialConfig
    from ldmkit.pipelines import Pipeline

    with pytest.raises(ValueError, match="concat='semantic' needs one extra input channel per map class"):
        Pipeline(pipe.autoencoder, _plain_unet(), pipe.schedule, pipe.conditioner, concat="semantic")
    with pytest.raises(ValueError, match=r"spatial component \('semantic', 3 classes\) does not fit"):
        Pipeline(pipe.autoencoder, pipe.denoiser, pipe.schedule, pipe.conditioner, concat="semantic",
                 spatial=SpatialConditioner(SpatialConfig("semantic", num_classes=3)))
    plain = Pipeline(pipe.autoencoder, _plain_unet(), pipe.schedule, None, conditioning="none")
    with pytest.raises(ValueError, match="supports text2img, img2img, inpaint, not semantic2img"):
        plain.semantic2img(_maps(run, 1)[0])
    from ldmkit.io.format import save_model

    save_model(tmp_path / "plain", {"autoencoder": pipe.autoencoder, "denoiser": plain.denoiser},
               {"schedule": pipe.schedule.to_dict(), "objective": "eps", "conditioning": "none", "concat": None,
                "latent_size": [8, 8]})
    with pytest.raises(ValueError, match="supports text2img, img2img, inpaint, not semantic2img"):
        pipelines.load(tmp_path / "plain", device="cpu").semantic2img(_maps(run, 1)[0])


def _plain_unet():
    import dataclasses

    from ldmkit.denoisers.unet import PRESETS, UNet

    cfg = dataclasses.replace(PRESETS["tiny"], in_channels=4, cross_attention_dim=None,
                              down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                              mid_block_type="UNetMidBlock2D")
    torch.manual_seed(1)
    return UNet(cfg).eval()


ERRORS = [
    (["semantic", "--map", "{t}/missing.png"], "does not exist"),
    (["semantic", "--map", "{t}/bad.png"], "class id 9; this model knows 4 classes"),
    (["semantic", "--map", "{t}/odd.png"], "class map size 30x30 must be a positive multiple of 4"),
    (["sample", "--prompt", "x"], "supports semantic2img, not text2img"),
]


@pytest.mark.parametrize("argv,message", ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_cli_errors_are_one_line_and_exit_code_2(run, tmp_path, capsys, argv, message):
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "bad.png")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "odd.png")
    argv = [a.format(t=tmp_path) for a in argv]
    rc = main([argv[0], "--model", str(run[1]), *argv[1:], "--device", "cpu", "--steps", "2",
               "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm {argv[0]}: error:"), err
    assert message in lines[0]


def test_the_runs_sample_grid_is_semantic2img(run, pipe):
    """The grid the run drew (first row the coloured maps, then a row per seed) holds what the exported
    model gives through `semantic2img` (what replaced training.ldm.sample_semantic)."""
    from ldmkit.conditioning.spatial import segmentation_colours
    from ldmkit.io.images import tensor_to_pil

    trainer, folder, root = run
    grid = Image.open(root / "run" / "samples" / "step_0000002.png").convert("RGB")
    cfg = trainer.config
    n = 4
    seg = _maps(run, n)
    prompts = json.loads(read_png_metadata(root / "run" / "samples" / "step_0000002.png")["prompts"])
    assert prompts == trainer.method.data.captions[:n]
    res = pipe.semantic2img(seg, prompts, num=n, seed=cfg.sample_seeds[0], batch_size=n, sampler=cfg.sampler,
                            steps=cfg.sample_steps, guidance=cfg.guidance, progress=False)

    def tile(row, col):
        return np.asarray(grid.crop((2 + col * 34, 2 + row * 34, 2 + col * 34 + 32, 2 + row * 34 + 32)))

    colours = segmentation_colours(seg)
    for k in range(n):
        assert np.array_equal(tile(0, k), np.asarray(tensor_to_pil(colours[k]))), k
        assert np.array_equal(tile(1, k), np.asarray(res[k].image)), k


def test_class_conditional_map_model_trains_grids_and_samples(run, tmp_path):
    """A class-conditional semantic run: its sample grid and the loaded folder go through semantic2img
    with class labels; the label is dropped in the unconditional branch, the map is not."""
    trainer, _, root = run
    cfg = LDMConfig(latents=str(root / "cache"), autoencoder=str(root / "ae"), out=str(tmp_path / "cls"),
                    preset="tiny", conditioning="class", spatial="semantic", steps=2, batch_size=4, lr=1e-3,
                    warmup_steps=1, checkpoint_every=100, sample_every=2, sample_steps=2, sample_sampler="ddim",
                    sample_seeds=(0,), progress=False, seed=2, device="cpu")
    folder = Trainer(LDM(cfg)).run()
    assert (tmp_path / "cls" / "samples" / "step_0000002.png").is_file()
    pipe = pipelines.load(folder, device="cpu")
    assert pipe.conditioning == "class" and pipe.tasks == ["semantic2img"]
    seg = _maps(run)
    labels = trainer.method.data.labels[:2].tolist()
    seen = []
    pipe.denoiser.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].clone(), kwargs["class_labels"].clone())), with_kwargs=True)
    res = pipe.semantic2img(seg, class_label=labels, steps=2, guidance=2.0, batch_size=2, progress=False)
    assert [r.metadata["class"] for r in res] == labels
    x, cls = seen[0]
    null = pipe.conditioner.config.num_classes
    assert cls.tolist() == [null, null, *labels]  # [uncond; cond]: only the label is dropped
    torch.testing.assert_close(x[:2, 4:], x[2:, 4:], rtol=0, atol=0)
    again = pipe.semantic2img(seg, class_label=labels, steps=2, guidance=2.0, batch_size=2, progress=False)
    assert torch.equal(torch.stack([pil_to_tensor(r.image) for r in again]),
                       torch.stack([pil_to_tensor(r.image) for r in res]))
    with pytest.raises(ValueError, match="class-conditional; pass a class"):
        pipe.semantic2img(seg, "a red circle", steps=2, progress=False)
