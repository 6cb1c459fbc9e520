"""Adapting a pretrained model with `ldm train`: full fine-tuning from a diffusers folder and a single
file (images encoded per step, text encoder trained), LoRA, textual inversion and DreamBooth with prior
preservation; what trains and what stays frozen, exact resume, the files each writes and that diffusers
loads them with the same images. The base is a tiny random Stable Diffusion built with diffusers."""
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

from ldmkit.errors import UserError  # noqa: E402
from ldmkit.training import Trainer  # noqa: E402
from ldmkit.training.methods import FineTune, FineTuneConfig  # noqa: E402

SETTINGS = dict(height=16, width=16, num_inference_steps=4, guidance_scale=5.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """A diffusers SD folder, the same weights as a single file, and a folder of 6 captioned 20x24 images."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("finetune")
    pipe = im.build_pipeline("sd1", scheduler="ddim", workdir=root)
    pipe.save_pretrained(root / "sd1")
    save_file({k: v.contiguous() for k, v in im.to_original_checkpoint(pipe, "sd1").items()},
              str(root / "sd1.safetensors"))
    im.captioned_images(root / "data")
    return root


def config(base, tmp_path, **kw) -> FineTuneConfig:
    cfg = dict(init_from=str(base / "sd1"), data=str(base / "data"), out=str(tmp_path / "run"), steps=2,
               batch_size=2, lr=1e-3, sample_steps=2, sample_sampler="ddim", progress=False, device="cpu",
               checkpoint_every=2, sample_every=100, seed=1, resolution=16)
    cfg.update(kw)
    return FineTuneConfig(**cfg)


def trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def frozen(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def diffusers_pipe(path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, prompt, seed=5):
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **SETTINGS).images[0]
    return (out * 255).round().astype(np.uint8)


def our_image(pipe, prompt, seed=5):
    return pipe.text2img(prompt, seed=seed, sampler="ddim", steps=SETTINGS["num_inference_steps"],
                         guidance=SETTINGS["guidance_scale"], height=16, width=16, progress=False)[0].image


# ----------------------------------------------------------------------------------------- full fine-tuning
@pytest.mark.parametrize("source", ["diffusers", "single"])
def test_full_fine_tuning_from_a_pretrained_model(base, tmp_path, source):
    """--init-from a diffusers folder or an original single file, --data encoded per step (random crops
    and flips), --train-text-encoder: denoiser and CLIP train, the VAE stays; the exported model folder
    converts to a diffusers folder that gives ldmkit's image."""
    from ldmkit.io import load_model
    from ldmkit.io.diffusers_export import save_diffusers
    from ldmkit.pipelines import load

    init = base / ("sd1" if source == "diffusers" else "sd1.safetensors")
    cfg = config(base, tmp_path, init_from=str(init), train_text_encoder=True, random_crop=True, random_flip=True,
                 text_encoder_lr=5e-4, tokenizer="" if source == "diffusers" else str(base / "sd1" / "tokenizer"))
    trainer = Trainer(FineTune(cfg))
    names = set(trained(trainer))
    assert any(n.startswith("denoiser.") for n in names) and any(n.startswith("conditioner.model.") for n in names)
    assert not any(n.startswith("autoencoder") for n in names)
    lrs = sorted(g["lr"] for g in trainer.optimizers["main"].param_groups)
    assert lrs[0] == 5e-4 and lrs[-1] == 1e-3  # the text encoder at its own rate
    before = {**trained(trainer), **frozen(trainer)}
    folder = trainer.run()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in names if n.endswith("weight") and "norm" not in n
               and "embedding" not in n)
    assert (tmp_path / "run" / "samples").is_dir()
    index, comps = load_model(folder)
    assert index["objective"] == "eps" and index["training"]["method"] == "finetune"
    # its checkpoints hold what it trained, not the network: a fresh run cannot start from one alone
    from ldmkit.training import LDM, LDMConfig

    ckpt = tmp_path / "run" / "checkpoints" / "step-2.pt"
    with pytest.raises(UserError, match="fine-tuned .* start from its model"):
        Trainer(LDM(LDMConfig(init_from=str(ckpt), data=str(base / "data"), autoencoder=str(base / "none"),
                              out=str(tmp_path / "from-ckpt"), device="cpu", progress=False)))
    save_diffusers(tmp_path / "exported", index, comps)
    ours = load(folder, device="cpu", dtype=torch.float32)
    p = psnr(our_image(ours, "the red cat"), diffusers_image(diffusers_pipe(tmp_path / "exported"), "the red cat"))
    assert p >= 40, p


def test_gradient_checkpointing_gives_the_same_step(base, tmp_path):
    runs = []
    for gc in (False, True):
        trainer = Trainer(FineTune(config(base, tmp_path, out=str(tmp_path / f"gc{gc}"), gradient_checkpointing=gc)))
        logs = trainer.train_step(next(iter(trainer.method.batches(0))))
        runs.append((logs["loss"], trained(trainer)))
        trainer.lock.release()
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.allclose(v, runs[1][1][k], atol=1e-6), k


# ----------------------------------------------------------------------------------------- LoRA
def test_lora_training_writes_a_lora_that_diffusers_loads(base, tmp_path):
    """Only the LoRA factors train (base weights bit-identical afterwards); the file is a few kB, holds
    diffusers' names and, loaded by diffusers' load_lora_weights, gives ldmkit's image with it; a
    resumed run ends where an uninterrupted one does."""
    cfg = config(base, tmp_path, lora_rank=4, lora_alpha=8.0, lora_targets=("attn", "text"), lr=5e-2, steps=4)
    trainer = Trainer(FineTune(cfg))
    names = set(trained(trainer))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any(n.startswith("conditioner.model.") for n in names)
    base_weights = frozen(trainer)
    path = trainer.run()
    assert path.name == "pytorch_lora_weights.safetensors" and path.stat().st_size < 200_000
    for n, v in frozen(trainer).items():
        assert torch.equal(v, base_weights[n]), n
    # resuming from step 2 reproduces the uninterrupted run's LoRA
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "again", ignore=shutil.ignore_patterns(".lock"))
    again = Trainer(FineTune(config(base, tmp_path, lora_rank=4, lora_alpha=8.0, lora_targets=("attn", "text"),
                                    lr=5e-2, steps=4, out=str(tmp_path / "again"))),
                    resume=tmp_path / "again" / "checkpoints" / "step-2.pt")
    assert again.step == 2
    again.run()
    for n, v in trained(trainer).items():
        assert torch.equal(v, dict(again.model.named_parameters())[n].detach()), n
    # the file in diffusers
    from ldmkit.pipelines import load

    ref = diffusers_pipe(base / "sd1")
    plain = diffusers_image(ref, "the red cat")
    ref.load_lora_weights(str(path.parent), weight_name=path.name)
    with_lora = diffusers_image(ref, "the red cat")
    ours = load(base / "sd1", device="cpu", dtype=torch.float32)
    ours.load_lora(path)
    assert psnr(plain, with_lora) < 40  # it learned something
    assert psnr(our_image(ours, "the red cat"), with_lora) >= 40


def test_lora_kohya_output_and_extended_denoisers_keep_diffusers_paths(base, tmp_path):
    from ldmkit.io.adapter_files import read_lora

    path = Trainer(FineTune(config(base, tmp_path, lora_rank=2, lora_format="kohya", lora_targets=("attn", "conv"),
                                   out=str(tmp_path / "mystyle")))).run()
    assert path.name == "mystyle.safetensors"
    lora = read_lora(path)
    assert lora.metadata["ss_network_dim"] == "2" and lora.metadata["ss_network_module"] == "networks.lora"
    assert "conv_dim" in lora.metadata["ss_network_args"]
    assert all(k.startswith(("down_blocks_", "up_blocks_", "mid_block_")) for k in lora.layers["unet"])


# ----------------------------------------------------------------------------------------- textual inversion
def test_textual_inversion_learns_only_the_new_vectors(base, tmp_path):
    from safetensors.torch import load_file

    from ldmkit.pipelines import load

    cfg = config(base, tmp_path, data="", instance_data=str(base / "data"), textual_inversion=True, token="<cat-toy>",
                 init_word="cat", num_vectors=2, lr=0.05, steps=3)
    trainer = Trainer(FineTune(cfg))
    assert list(trained(trainer)) == ["conditioner.model.embeddings.token_embedding.extra"] or \
        list(trained(trainer)) == ["conditioner.model.text_model.embeddings.token_embedding.extra"]
    table = trainer.model.conditioner.model.get_input_embeddings()
    start = table.extra.detach().clone()
    cat = trainer.model.conditioner.tokenizer("cat", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(start[0], table.base.weight[cat])  # starts from the init word
    batch = next(iter(trainer.method.batches(0)))[0]
    assert all("<cat-toy>" in c for c in batch["conditions"])  # captions from the templates
    frozen_before = frozen(trainer)
    path = trainer.run()
    for n, v in frozen(trainer).items():
        assert torch.equal(v, frozen_before[n]), n
    assert not torch.equal(table.extra.detach(), start)
    diffusers_file, a1111_file = tmp_path / "run" / "learned_embeds.safetensors", tmp_path / "run" / "cat-toy.safetensors"
    assert path == diffusers_file and list(load_file(str(a1111_file))) == ["emb_params"]
    assert load_file(str(diffusers_file))["<cat-toy>"].shape == (2, 128)
    ref = diffusers_pipe(base / "sd1")
    ref.load_textual_inversion(str(diffusers_file))
    ours = load(base / "sd1", device="cpu", dtype=torch.float32)
    ours.load_embedding(a1111_file, "<cat-toy>")
    prompt = "a photo of a <cat-toy>"
    assert psnr(our_image(ours, prompt), diffusers_image(ref, prompt)) >= 40


# ----------------------------------------------------------------------------------------- DreamBooth
def test_dreambooth_prior_preservation(base, tmp_path):
    """The model makes the missing class images (and reuses them); batches alternate instance and
    class images; the loss is mean(instance) + W * mean(class)."""
    class_dir = tmp_path / "class"
    cfg = config(base, tmp_path, data="", instance_data=str(base / "data"), instance_prompt="a photo of sks cat",
                 class_prompt="a photo of a cat", class_data=str(class_dir), num_class_images=3, batch_size=4,
                 prior_loss_weight=0.5, steps=2)
    trainer = Trainer(FineTune(cfg))
    made = sorted(class_dir.glob("*.png"))
    assert len(made) == 3
    batch = next(iter(trainer.method.batches(0)))[0]
    assert batch["conditions"] == ["a photo of sks cat", "a photo of a cat"] * 2
    assert batch["weight"].tolist() == [2.0, 1.0, 2.0, 1.0]
    from ldmkit.diffusion import model_timestep, q_sample, training_loss

    m = trainer.method
    with torch.no_grad():
        z_t = q_sample(m.schedule, batch["z0"], batch["noise"], batch["t"])
        out = trainer.model(z_t, model_timestep(m.schedule, batch["t"]), batch["conditions"], batch["drop"])
        rows = training_loss(m.schedule, "eps", out, batch["z0"], batch["noise"], batch["t"])
        loss, _ = m.loss(trainer.model, batch, "main", 0)
    expected = rows[0::2].mean() + 0.5 * rows[1::2].mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    trainer.lock.release()
    stamp = [p.stat().st_mtime_ns for p in made]
    lora = Trainer(FineTune(config(base, tmp_path, data="", instance_data=str(base / "data"),
                                   instance_prompt="a photo of sks cat", class_prompt="a photo of a cat",
                                   class_data=str(class_dir), num_class_images=3, batch_size=2, lora_rank=2,
                                   out=str(tmp_path / "lora"))))
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamp  # reused, not remade
    assert lora.run().name == "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------- flags and errors
def test_finetune_flags_route_and_bad_settings(base, tmp_path):
    from ldmkit.training.commands import _method_in

    assert _method_in(["train", "--lora-rank", "4"]) == "finetune"
    assert _method_in(["train", "--textual-inversion"]) == "finetune"
    assert _method_in(["train", "--latents", "x"]) == "ldm"
    with pytest.raises(UserError, match="give --init-from MODEL"):
        FineTune(config(base, tmp_path, init_from=None))
    with pytest.raises(UserError, match="needs --token"):
        FineTune(config(base, tmp_path, textual_inversion=True))
    with pytest.raises(UserError, match="needs --instance-data"):
        FineTune(config(base, tmp_path, class_prompt="a cat"))
    with pytest.raises(UserError, match="must be even"):
        FineTune(config(base, tmp_path, data="", instance_data="x", class_prompt="a cat", batch_size=3))
    with pytest.raises(UserError, match="give one of"):
        FineTune(config(base, tmp_path, instance_data=str(base / "data")))
    with pytest.raises(UserError, match="match no Linear/Conv2d"):
        Trainer(FineTune(config(base, tmp_path, lora_rank=2, lora_targets=("nothing_here",))))
    with pytest.raises(UserError, match="give --instance-data DIR"):
        FineTune(config(base, tmp_path, instance_prompt="a sks cat"))
    # textual inversion on --data needs no captions (templates); a .pt that is not a checkpoint is refused
    (tmp_path / "bare").mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (16, 16), (i * 90, 20, 200)).save(tmp_path / "bare" / f"{i}.png")
    ti = Trainer(FineTune(config(base, tmp_path, data=str(tmp_path / "bare"), textual_inversion=True, token="<b>",
                                 init_word="cat", out=str(tmp_path / "ti"))))
    ti.lock.release()
    torch.save({"weights": torch.zeros(1)}, tmp_path / "model.pt")
    from ldmkit.training.loop import load_init

    with pytest.raises(UserError, match="not an `ldm train` checkpoint"):
        load_init(str(tmp_path / "model.pt"))
    with pytest.raises(UserError, match="read as a training checkpoint"):
        FineTune(config(base, tmp_path, init_from=str(tmp_path / "model.pt")))
    with pytest.raises(UserError, match="already in the tokenizer"):
        Trainer(FineTune(config(base, tmp_path, data="", instance_data=str(base / "data"), textual_inversion=True,
                                token="cat</w>", init_word="cat", out=str(tmp_path / "t2"))))


def test_ldm_train_command_line_lora(base, tmp_path, capsys):
    from ldmkit.cli import main

    rc = main(["train", "--init-from", str(base / "sd1"), "--data", str(base / "data"), "--lora-rank", "2",
               "--resolution", "16", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "cli"),
               "--sample-steps", "1", "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert "LoRA written to" in capsys.readouterr().out
    assert (tmp_path / "cli" / "pytorch_lora_weights.safetensors").is_file()
