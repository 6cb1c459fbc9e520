"""Latent consistency models: LCM students (a UNet with a guidance input) and LCM-LoRAs made by diffusers run
as diffusers runs them, and `ldm distill --method lcm` trains both kinds from a teacher.

Models are tiny and random, built locally by tests/interop_models.py (no downloads)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

PROMPT = "the red cat on a street"
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory, one_thread):
    """A diffusers LatentConsistencyModelPipeline folder: a random UNet with a 32-wide guidance input."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("lcm")
    base = im.build_pipeline("sd1", workdir=root)
    torch.manual_seed(5)
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**{**config, "time_cond_proj_dim": 32}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pipe = LatentConsistencyModelPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet, scheduler=LCMScheduler.from_config(base.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "lcm")
    return pipe, root / "lcm"


def test_guidance_embedding_is_diffusers(lcm_folder):
    from ldmkit.nn.embeddings import guidance_embedding

    pipe, _ = lcm_folder
    w = torch.tensor([0.0, 1.5, 7.5, 14.0])
    for dim in (32, 33, 256):
        assert torch.equal(guidance_embedding(w, dim), pipe.get_guidance_scale_embedding(w, embedding_dim=dim))


@pytest.mark.parametrize("steps,guidance", [(1, 8.5), (4, 8.5), (4, 2.0)])
def test_an_lcm_pipeline_folder_gives_diffusers_latents(lcm_folder, steps, guidance):
    """One UNet call per step with the guidance scale as input (no CFG pair), LCM's multistep sampler."""
    from ldmkit.pipelines import load

    pipe, folder = lcm_folder
    ref = pipe(PROMPT, height=16, width=16, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = load(folder, device="cpu", dtype=torch.float32)
    assert ours.defaults["sampler"] == "lcm" and ours.denoiser.guidance_mode == "distilled"
    s = ours.settings(steps=steps, guidance=guidance, height=16, width=16, progress=False)
    latents = ours.sample_latents(s, [PROMPT], None, [3])
    rel = _rel(latents, ref)
    print(f"LCM folder, {steps} steps, guidance {guidance}: latents max relative difference {rel:.1e}")
    assert rel <= 1e-5
    with pytest.raises(Exception, match="negative prompt has nothing to act on"):
        ours.sample_latents(s, [PROMPT], ["blurry"], [3])


def test_an_lcm_lora_written_by_diffusers_runs_as_in_diffusers(tmp_path, one_thread):
    """diffusers' LCM-LoRA layout (attention, feed-forward, projections, resnet convs, time_emb_proj), saved by
    `save_lora_weights`: the LCM sampler with the LoRA merged gives the latents of diffusers' pipeline with
    LCMScheduler and `load_lora_weights`, with and without CFG."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ldmkit.pipelines import load

    base = im.build_pipeline("sd1", workdir=tmp_path)
    base.save_pretrained(tmp_path / "sd1")
    base.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LCM_LORA_TARGETS))
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(base.unet))
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "sd1", safety_checker=None)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(tmp_path / "lora"))
    ours = load(tmp_path / "sd1", device="cpu", dtype=torch.float32)
    layers = ours.load_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    wrapped = [n for n, m in base.unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert layers == len(wrapped) and any(n.endswith("time_emb_proj") for n in wrapped)  # every layer merged
    for guidance in (1.0, 1.5):
        want = ref(PROMPT, height=16, width=16, num_inference_steps=4, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(2), output_type="latent").images
        s = ours.settings(sampler="lcm", steps=4, guidance=guidance, height=16, width=16, progress=False)
        rel = _rel(ours.sample_latents(s, [PROMPT], None, [2]), want)
        print(f"LCM-LoRA, guidance {guidance}: latents max relative difference {rel:.1e}")
        assert rel <= 1e-4
    # the same LoRA in kohya's names (A1111 / ComfyUI, the layout of the released LCM-LoRA files) reads the same
    from ldmkit.io.adapter_files import read_lora, write_lora

    kohya = write_lora(tmp_path / "lcm-kohya.safetensors", read_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors"),
                       "kohya")
    again = load(tmp_path / "sd1", device="cpu", dtype=torch.float32)
    assert again.load_lora(kohya) == layers
    s = ours.settings(sampler="lcm", steps=4, guidance=1.0, height=16, width=16, progress=False)
    assert _rel(again.sample_latents(s, [PROMPT], None, [2]), ours.sample_latents(s, [PROMPT], None, [2])) <= 1e-6


# ------------------------------------------------------------------------------------------ distillation
@pytest.fixture(scope="module")
def teacher(tmp_path_factory, one_thread):
    """A diffusers SD folder (the teacher) and a folder of 6 captioned 20x24 images."""
    root = tmp_path_factory.mktemp("distill")
    pipe = im.build_pipeline("sd1", workdir=root)
    pipe.save_pretrained(root / "sd1")
    im.captioned_images(root / "data")
    return root


def distill_config(teacher, tmp_path, **kw):
    from ldmkit.training.methods import LCMConfig

    cfg = dict(init_from=str(teacher / "sd1"), data=str(teacher / "data"), out=str(tmp_path / "run"), steps=2,
               batch_size=2, lr=1e-3, sample_steps=2, progress=False, device="cpu", checkpoint_every=2,
               sample_every=100, seed=1, resolution=16, distill_guidance=(2.0, 9.0), guidance_input=32)
    cfg.update(kw)
    return LCMConfig(**cfg)


def reference_loss(folder: Path, batch: dict, guidance_input: int | None, cond_proj=None,
                   huber_c: float = 0.001) -> float:
    """The step's loss as diffusers' LCM scripts compute it (train_lcm_distill_sd_wds.py), written out here
    with diffusers' UNets and schedulers: the student is the teacher with a guidance input whose projection is
    `cond_proj`, the target network (the EMA) the same with a zero projection."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    teacher_unet = pipe.unet
    student = teacher_unet
    if guidance_input:
        config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
        student = UNet2DConditionModel(**{**config, "time_cond_proj_dim": guidance_input})
        student.load_state_dict(teacher_unet.state_dict(), strict=False)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    target_unet = student
    if cond_proj is not None:
        import copy

        student = copy.deepcopy(target_unet)
        student.time_embedding.cond_proj.weight.data.copy_(cond_proj)
    abar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    topk = 1000 // 50
    ddim_t = torch.arange(1, 51) * topk - 1
    ddim_prev = torch.cat([abar[:1], abar[ddim_t[:-1]]])
    index = batch["index"]
    start, prev_t = ddim_t[index], (ddim_t[index] - topk).clamp(min=0)

    def scalings(t):
        s = t.double() * 10.0
        return (0.25 / (s**2 + 0.25)).float().view(-1, 1, 1, 1), (s / (s**2 + 0.25).sqrt()).float().view(-1, 1, 1, 1)

    def x0_of(eps, t, x):
        a = abar[t].view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    z0, noise = batch["z0"], batch["noise"]
    a = abar[start].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
    w = batch["guidance"] - 1
    kw = {}
    if guidance_input:
        kw["timestep_cond"] = pipe.get_guidance_scale_embedding(w, embedding_dim=guidance_input)
    with torch.no_grad():
        prompt = pipe.encode_prompt(batch["conditions"], "cpu", 1, False)[0]
        empty = pipe.encode_prompt([""] * len(batch["conditions"]), "cpu", 1, False)[0]
        c_eps = teacher_unet(noisy, start, encoder_hidden_states=prompt).sample
        u_eps = teacher_unet(noisy, start, encoder_hidden_states=empty).sample
        ww = w.view(-1, 1, 1, 1)
        pred_x0 = x0_of(c_eps, start, noisy) + ww * (x0_of(c_eps, start, noisy) - x0_of(u_eps, start, noisy))
        pred_eps = c_eps + ww * (c_eps - u_eps)
        ap = ddim_prev[index].view(-1, 1, 1, 1)
        x_prev = ap.sqrt() * pred_x0 + (1 - ap).sqrt() * pred_eps
        skip, out = scalings(prev_t)
        target = skip * x_prev + out * x0_of(target_unet(x_prev, prev_t, encoder_hidden_states=prompt, **kw).sample,
                                             prev_t, x_prev)
        skip, out = scalings(start)
        model_pred = skip * noisy + out * x0_of(student(noisy, start, encoder_hidden_states=prompt, **kw).sample,
                                                start, noisy)
    return float(torch.mean(torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_step_zero_loss_is_diffusers_lcm_script_loss(teacher, tmp_path, kind):
    from ldmkit.training import Trainer
    from ldmkit.training.methods import LCM

    extra = {"lora_rank": 4} if kind == "lora" else {}
    trainer = Trainer(LCM(distill_config(teacher, tmp_path, **extra)))
    batch = next(trainer.method.batches(0))[0]
    assert batch["guidance"].min() >= 2.0 and batch["guidance"].max() <= 9.0
    proj = None
    if kind == "full":  # the student moves away from its EMA (the target): the guidance input now counts
        proj = trainer.model.denoiser.time_embedding.cond_proj.weight
        with torch.no_grad():
            proj.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    ours = float(trainer.method.loss(trainer.wrapped, batch, "main", 0)[0])
    ref = reference_loss(teacher / "sd1", batch, None if kind == "lora" else 32, proj)
    print(f"LCM step-0 loss ({kind}): ours {ours:.6f}, diffusers' formulas {ref:.6f}")
    assert ours == pytest.approx(ref, rel=1e-4)
    if kind == "full":
        assert ours != pytest.approx(reference_loss(teacher / "sd1", batch, 32), rel=1e-3)  # the input mattered
    trainer.lock.release()


def _trained(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_a_full_student_trains_resumes_exactly_and_runs_in_diffusers(teacher, tmp_path):
    """Only the student trains (the teacher copy stays bit-identical); a run resumed at step 2 ends where the
    uninterrupted one does; the model folder samples with LCM at its defaults and, converted, runs in diffusers'
    LatentConsistencyModelPipeline to ldmkit's latents."""
    import shutil

    from diffusers import LatentConsistencyModelPipeline

    from ldmkit.cli import main
    from ldmkit.pipelines import load
    from ldmkit.training import Trainer
    from ldmkit.training.methods import LCM

    trainer = Trainer(LCM(distill_config(teacher, tmp_path, steps=4)))
    teacher_before = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
    path = trainer.run()
    assert all(torch.equal(v, trainer.method.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert trainer.model.denoiser.time_embedding.cond_proj.weight.abs().max() > 0  # the guidance input learned
    shutil.copytree(tmp_path / "run", tmp_path / "again", ignore=shutil.ignore_patterns(".lock", "model"))
    again = Trainer(LCM(distill_config(teacher, tmp_path, steps=4, out=str(tmp_path / "again"))),
                    resume=tmp_path / "again" / "checkpoints" / "step-2.pt")
    again.run()
    for n, v in _trained(trainer).items():
        assert torch.equal(v, dict(again.model.named_parameters())[n].detach()), n

    ours = load(path, device="cpu", dtype=torch.float32)
    assert ours.denoiser.guidance_mode == "distilled"
    assert ours.defaults == {"sampler": "lcm", "steps": 2, "guidance": 5.5,
                             "sampler_options": {"original_inference_steps": 50}}
    assert main(["convert", "--from", str(path), "--to", str(tmp_path / "hf"), "--format", "diffusers"]) == 0
    ref = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "hf", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, height=16, width=16, num_inference_steps=2, guidance_scale=5.5,
               generator=torch.Generator().manual_seed(4), output_type="latent").images
    s = ours.settings(height=16, width=16, progress=False)
    assert _rel(ours.sample_latents(s, [PROMPT], None, [4]), want) <= 1e-5


def test_ldm_distill_lora_command_line_and_bad_settings(teacher, tmp_path, capsys):
    """`ldm distill --lora-rank` writes an LCM-LoRA (only LoRA factors train) that `ldm sample --lora` uses;
    settings that cannot work are one-line errors with exit code 2."""
    from ldmkit.cli import main
    from ldmkit.io.adapter_files import read_lora

    base = ["distill", "--teacher", str(teacher / "sd1"), "--data", str(teacher / "data"), "--resolution", "16",
            "--batch-size", "2", "--steps", "2", "--no-progress", "--device", "cpu", "--sample-every", "100"]
    assert main(base + ["--out", str(tmp_path / "lora"), "--lora-rank", "4", "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "LCM-LoRA written to" in out and "--sampler lcm" in out
    lora = read_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    paths = list(lora.layers["unet"])
    assert any(p.endswith("time_emb_proj") for p in paths) and any(p.endswith("conv1") for p in paths)
    assert main(["sample", "--model", str(teacher / "sd1"), "--lora",
                 str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "--sampler", "lcm", "--steps", "2",
                 "--guidance", "1", "--prompt", PROMPT, "--height", "16", "--width", "16", "--no-progress",
                 "--out", str(tmp_path / "img")]) == 0
    capsys.readouterr()
    bad = [(["--distill-guidance", "9", "2"], "low end is above the high end"),
           (["--cond-drop", "0.1"], "cond_drop"),
           (["--num-ddim-timesteps", "5000"], "num_ddim_timesteps")]
    for extra, match in bad:
        args = base + ["--out", str(tmp_path / "bad"), "--overwrite"] + extra
        assert _exit_code(main, args) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], (extra, err)
    assert _exit_code(main, ["distill", "--teacher", str(teacher / "sd1"), "--out", str(tmp_path / "nodata")]) == 2
    assert "--data DIR" in capsys.readouterr().err


def _exit_code(main, args) -> int:
    try:
        return main(args)
    except SystemExit as e:
        return e.code
