"""Stage-1 training: overfit on real photo crops, exact resume after interruption, the CLI end to end."""
import json

import pytest
import torch
from PIL import Image

from ldmkit.autoencoder.losses import AutoencoderLoss, LossConfig
from ldmkit.autoencoder.model import Autoencoder, AutoencoderConfig
from ldmkit.metrics.reconstruction import psnr, to_unit

skimage_data = pytest.importorskip("skimage.data")

# (photo, top, left) of 32x32 crops from scikit-image's real photographs.
CROPS = [("astronaut", 60, 200), ("coffee", 150, 250), ("chelsea", 100, 150), ("rocket", 200, 300),
         ("astronaut", 300, 100), ("coffee", 50, 400)]


def _crop(name, top, left, size=32):
    return getattr(skimage_data, name)()[top:top + size, left:left + size]


@pytest.fixture
def photo_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, (name, top, left) in enumerate(CROPS):
        Image.fromarray(_crop(name, top, left)).save(folder / f"{name}_{k}.png")
    return folder


def test_overfit_real_photo_crops_reaches_25db():
    """A tiny KL autoencoder (f=2) fits four real 32x32 photo crops to > 25 dB PSNR in 100 steps
    (about 7 CPU-seconds on one core)."""
    torch.manual_seed(0)
    x = torch.stack([torch.from_numpy(_crop(*c).copy()).permute(2, 0, 1).float() / 127.5 - 1 for c in CROPS[:4]])
    model = Autoencoder(AutoencoderConfig(channels=16, ch_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                          norm_groups=4))
    crit = AutoencoderLoss(LossConfig(perceptual_weight=0.0, disc_weight=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def quality():
        model.eval()
        with torch.no_grad():
            rec = model.decode(model.encode(x).mode()).clamp(-1, 1)
        model.train()
        return psnr(to_unit(x), to_unit(rec)).mean().item()

    start = quality()
    for step in range(100):
        x_rec, aux = model(x)
        loss, logs = crit.generator_loss(x, x_rec, aux, step, model.last_layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = quality()
    assert start < 15 and end > 25.0, (start, end)


def _method(folder, out, steps, **kw):
    from ldmkit.training.methods.autoencoder import AETrainConfig, AutoencoderMethod

    cfg = dict(data=str(folder), out=str(out), preset="tiny-kl-f4", steps=steps, batch_size=2, lr=1e-3, size=16,
               checkpoint_every=2, sample_every=100, log_every=1, holdout=2, stats_samples=4, ema_decay=0.9,
               perceptual_weight=0.0, disc_start=1, disc_layers=1, disc_channels=8, progress=False, device="cpu")
    return AutoencoderMethod(AETrainConfig(**{**cfg, **kw}))


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_after_interruption_is_exact(photo_folder, tmp_path, monkeypatch):
    """The autoencoder method on the shared loop: two optimisers (autoencoder, discriminator from step 1),
    EMA, an interruption after the step-2 checkpoint, resume: the same weights and state as 4 steps straight."""
    from ldmkit.training.common import load_training_state
    from ldmkit.training.loop import Trainer

    Trainer(_method(photo_folder, tmp_path / "a", 4)).run()
    ref = load_training_state(tmp_path / "a" / "checkpoints" / "step-4.pt")
    assert set(ref["optimizers"]) == {"main", "discriminator"}

    trainer = Trainer(_method(photo_folder, tmp_path / "b", 4))
    original = Trainer.train_step

    def interrupt(self, micro_batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(Trainer, "train_step", original)
    trainer.lock.release()  # what the end of the interrupted process does
    saved = load_training_state(tmp_path / "b" / "checkpoints" / "step-2.pt")

    resumed = Trainer(_method(photo_folder, tmp_path / "b", 4), resume=tmp_path / "b" / "checkpoints" / "step-2.pt")
    assert resumed.step == 2
    _assert_same(resumed.optimizers["main"].state_dict(), saved["optimizers"]["main"])
    _assert_same(resumed.optimizers["discriminator"].state_dict(), saved["optimizers"]["discriminator"])
    folder = resumed.run()
    final = load_training_state(tmp_path / "b" / "checkpoints" / "step-4.pt")
    assert final["step"] == ref["step"] == 4
    for key in ("model", "optimizers", "ema", "schedulers"):
        _assert_same(final[key], ref[key], key)
    # the loss log has one row per step, without the rows of the interrupted step
    rows = (tmp_path / "b" / "loss.csv").read_text().strip().splitlines()
    assert [int(float(r.split(",")[0])) for r in rows[1:]] == [1, 2, 3, 4]
    assert "d" in rows[0].split(",") and "rec" in rows[0].split(",")
    # the component carries the latent statistics measured at the end, as summary.json says
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())["config"]
    assert cfg["scaling_factor"] == pytest.approx(summary["latent_statistics"]["scaling_factor"])
    assert (tmp_path / "b" / "loss.png").is_file() and list((tmp_path / "b" / "samples").glob("step_0000004.png"))


def test_resume_without_checkpoint_is_a_clear_error(photo_folder, tmp_path, capsys):
    from ldmkit.cli import main

    rc = main(["train-autoencoder", "--data", str(photo_folder), "--out", str(tmp_path / "c"), "--resume"])
    assert rc == 2 and "config.json" in capsys.readouterr().err


def test_latent_statistics_normalise_latents(photo_folder):
    from ldmkit.data.images import ImageFolder
    from ldmkit.autoencoder.evaluation import latent_statistics

    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(channels=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    ds = ImageFolder(photo_folder, size=16)
    stats = latent_statistics(model, ds, num_samples=6, seed=0)
    from dataclasses import replace

    model.config = replace(model.config, scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    x = torch.stack([ds[i]["image"] for i in range(6)])
    z = model.encode_latents(x, generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item()) < 1e-4 and z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_cli_train_stats_eval_vq(photo_folder, tmp_path, capsys):
    from ldmkit.cli import main

    out = tmp_path / "run"
    rc = main(["train-autoencoder", "--data", str(photo_folder), "--preset", "tiny-vq-f4", "--out", str(out),
               "--steps", "2", "--batch-size", "2", "--size", "16", "--holdout", "2", "--disc-weight", "0",
               "--checkpoint-every", "2", "--stats-samples", "4", "--num-codes", "32", "--no-progress"])
    assert rc == 0
    assert "autoencoder written to" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "codebook" in summary["heldout"]
    cfg_path = out / "autoencoder" / "config.json"
    before = json.loads(cfg_path.read_text())["config"]["scaling_factor"]
    assert before == pytest.approx(summary["latent_statistics"]["scaling_factor"])
    assert main(["ae-stats", "--model", str(out), "--data", str(photo_folder), "--num-samples", "2"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert json.loads(cfg_path.read_text())["config"]["scaling_factor"] == pytest.approx(stats["scaling_factor"])
    assert main(["eval-autoencoder", "--model", str(out / "autoencoder"), "--data", str(photo_folder),
                 "--no-lpips", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    # a folder given to eval-autoencoder is scored whole (it is the held-out set), not half of it
    assert result["num_images"] == len(CROPS) and result["kind"] == "vq" and result["codebook"]["num_codes"] == 32
    assert 0 < result["psnr"]["mean"] < 100 and -1 <= result["ssim"]["mean"] <= 1
    assert result["lpips"].startswith("unavailable")


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from ldmkit.cli import main

    rc = main(["train-autoencoder", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "not a folder, and not 'fashion-mnist' or 'shapes'" in capsys.readouterr().err
    rc = main(["train-autoencoder", "--data", "shapes", "--out", str(tmp_path / "o"), "--steps", "0"])
    assert rc == 2 and "steps=0" in capsys.readouterr().err
    rc = main(["train-autoencoder", "--data", "shapes", "--out", str(tmp_path / "o"), "--threads", "0"])
    assert rc == 2 and "threads=0" in capsys.readouterr().err
    rc = main(["eval-autoencoder", "--model", str(tmp_path), "--data", "shapes"])
    assert rc == 2 and "no autoencoder component" in capsys.readouterr().err


def test_a_perceptual_term_from_a_network_trained_here(photo_folder, tmp_path, capsys):
    """--perceptual-net CLASSIFIER: the loss compares the classifier's stage activations (LPIPS's recipe without
    its heads); the distance is 0 for equal images, grows with distortion and passes gradients; the run says
    what it trains with and the perceptual term is logged."""
    from ldmkit.autoencoder.losses import FeaturePerceptual
    from ldmkit.metrics.classifier import PRESETS, FeatureClassifier, save_classifier
    from ldmkit.training import Trainer

    torch.manual_seed(0)
    net = FeatureClassifier(PRESETS["shapes"]).eval()
    folder = save_classifier(net, tmp_path / "clf", "shapes", 0.5)
    d = FeaturePerceptual(net)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    small, big = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1), (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    assert float(d(x, x).max()) == 0.0
    assert 0 < float(d(x, small).mean()) < float(d(x, big).mean())
    y = small.clone().requires_grad_(True)
    d(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())

    trainer = Trainer(_method(photo_folder, tmp_path / "run", 2, perceptual_weight=0.5, perceptual_net=str(folder),
                              disc_weight=0.0))
    assert "perceptual term: the features of classifier" in capsys.readouterr().err
    trainer.run()
    logged = (tmp_path / "run" / "loss.csv").read_text().splitlines()[0].split(",")
    assert "lpips" in logged
