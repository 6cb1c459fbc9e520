"""Training SDXL-shaped models: from scratch (`--preset sdxl-small`: pooled text + size / crop ids into the
time embedding, the ids drawn from each image's true size and crop as the SDXL paper trains), and
fine-tuning a loaded SDXL (a LoRA that diffusers' SDXL pipeline loads to ldmkit's image)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402
from test_pipelines import make_autoencoder  # noqa: E402

from ldmkit.training import Trainer  # noqa: E402
from ldmkit.training.methods import LDM, FineTune, FineTuneConfig, LDMConfig  # noqa: E402

SIZES = [(20, 24), (32, 16), (16, 16), (40, 24), (24, 20), (16, 48)]  # (w, h) of the training images


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    from PIL import Image

    from ldmkit.io.format import save_component

    root = tmp_path_factory.mktemp("sdxl-train")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text("a red cat" if i % 2 else "a cat on the street")
    save_component(make_autoencoder(), root / "ae")
    im.build_sdxl_pipeline(workdir=root).save_pretrained(root / "sdxl")
    return root


def test_an_sdxl_shaped_unet_trains_from_scratch_on_true_sizes_and_crops(world, tmp_path):
    from ldmkit.pipelines import load

    cfg = LDMConfig(data=str(world / "data"), autoencoder=str(world / "ae"), out=str(tmp_path / "run"),
                    preset="sdxl-small", text_encoder="tiny", resolution=16, random_crop=True, steps=2, batch_size=3,
                    sample_steps=2, progress=False, device="cpu", checkpoint_every=2, sample_every=100)
    trainer = Trainer(LDM(cfg))
    unet = trainer.model.denoiser
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.projection_class_embeddings_input_dim == unet.config.cross_attention_dim + 6 * 32
    m = trainer.method
    idx = m.step_items(0)[:3]
    batch = m.micro_batch(idx, torch.arange(3), m.draw(0), 0)
    items = m.data.items(idx, m.draw(0)["aug"][:3].tolist())
    for row, i, item in zip(batch["time_ids"].tolist(), idx, items):
        w, h = SIZES[int(Path(m.data.parts[0].folder.files[i]).stem)]
        assert row[:2] == [h, w] and row[4:] == [16, 16]  # the true size, the training size
        assert tuple(row[2:4]) == item["crop_top_left"] and min(row[2:4]) >= 0
    assert any(r[2] > 0 or r[3] > 0 for r in batch["time_ids"].tolist())  # random crops move the corner
    folder = trainer.run()
    pipe = load(folder, device="cpu", dtype=torch.float32)
    a = pipe.text2img("a red cat", seed=0, steps=2, progress=False)[0]
    b = pipe.text2img("a red cat", seed=0, steps=2, progress=False, micro={"original_size": (64, 64)})[0]
    assert a.image.size == (16, 16) and not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def test_fine_tuning_a_loaded_sdxl_writes_a_lora_diffusers_loads(world, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ldmkit.pipelines import load

    cfg = FineTuneConfig(init_from=str(world / "sdxl"), data=str(world / "data"), out=str(tmp_path / "lora"),
                         lora_rank=4, lr=5e-2, steps=3, batch_size=2, resolution=16, progress=False, device="cpu",
                         checkpoint_every=3, sample_every=100, sample_steps=2, sample_sampler="euler")
    trainer = Trainer(FineTune(cfg))
    assert trainer.method.text_time
    path = trainer.run()
    ref = StableDiffusionXLPipeline.from_pretrained(world / "sdxl")
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)

    def theirs():
        out = ref("a red cat", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                  generator=torch.Generator().manual_seed(1), output_type="np").images[0]
        return (out * 255).round().astype(np.uint8)

    plain = theirs()
    ref.load_lora_weights(str(path.parent), weight_name=path.name)
    tuned = theirs()
    ours = load(world / "sdxl", device="cpu", dtype=torch.float32)
    ours.load_lora(path)
    mine = ours.text2img("a red cat", seed=1, sampler="euler", steps=3, guidance=5.0, height=16, width=16,
                         progress=False)[0].image
    assert psnr(plain, tuned) < 40 and psnr(mine, tuned) >= 40
    # full fine-tuning runs on SDXL too (the UNet trains, both text encoders stay frozen)
    full = Trainer(FineTune(FineTuneConfig(init_from=str(world / "sdxl"), data=str(world / "data"),
                                           out=str(tmp_path / "full"), steps=1, batch_size=2, resolution=16,
                                           progress=False, device="cpu", sample_every=100, sample_steps=1)))
    assert not any(n.startswith("conditioner.") for n, p in full.model.named_parameters() if p.requires_grad)
    assert (full.run() / "model_index.json").is_file()
