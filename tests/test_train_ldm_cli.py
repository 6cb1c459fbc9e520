"""`ldm train` from the command line: latent cache in, model folder out; SIGKILL mid-run then --resume
gives the same weights as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ldmkit.training.common import load_training_state

ARGS = ["--preset", "tiny", "--text-encoder", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
        "--sample-every", "1000", "--sample-steps", "2", "--sampler", "ddim", "--seed", "1", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.data.latents import encode_dataset
    from ldmkit.data.shapes import ShapesDataset
    from ldmkit.io.format import save_component

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["tiny-kl-f4"])
    save_component(ae, root / "ae")
    encode_dataset(ae, ShapesDataset("train", size=32, length=16, seed=0), root / "latents", batch_size=16,
                   progress=False)
    return root


def _cmd(root, out, *extra):
    return [sys.executable, "-m", "ldmkit.cli", "train", "--autoencoder", str(root / "ae"), "--latents",
            str(root / "latents"), "--out", str(out), *ARGS, *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def test_cli_train_writes_model_and_resumes(prepared, tmp_path):
    from ldmkit.cli import main

    out = tmp_path / "run"
    argv = ["train", "--autoencoder", str(prepared / "ae"), "--latents", str(prepared / "latents"), "--out",
            str(out), *ARGS, "--steps", "2", "--checkpoint-every", "1"]
    assert main(argv) == 0
    assert (out / "model" / "model_index.json").is_file()
    assert (out / "checkpoints" / "step-2.pt").is_file()
    # continue the same run for 1 more step
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert load_training_state(out / "checkpoints" / "step-3.pt")["step"] == 3
    # changing a numeric setting on resume is refused with a one-line error
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    from ldmkit import pipelines

    pipe = pipelines.load(out / "model", device="cpu")
    assert pipe.conditioning == "text"
    assert len(pipe.text2img("a blue triangle above a red circle", steps=2, progress=False)) == 1


def test_cli_config_rebuilds_a_run(prepared, tmp_path, capsys):
    """`ldm train --config RUN/config.json --out NEW` repeats the run (same weights); flags override the file."""
    import json

    from ldmkit.cli import main

    first = tmp_path / "first"
    assert main(["train", "--autoencoder", str(prepared / "ae"), "--latents", str(prepared / "latents"), "--out",
                 str(first), *ARGS, "--steps", "2", "--ema-decay", "0.5", "--timestep-sampling", "stratified"]) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    a = load_training_state(first / "checkpoints" / "step-2.pt")
    b = load_training_state(again / "checkpoints" / "step-2.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    saved = json.loads((again / "config.json").read_text())["training"]
    assert saved["out"] == str(again) and saved["ema_decay"] == 0.5 and saved["timestep_sampling"] == "stratified"
    # a plain object of fields works too, and given options win over it
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({**saved, "out": str(tmp_path / "unused"), "steps": 5}))
    assert main(["train", "--config", str(plain), "--out", str(tmp_path / "short"), "--steps", "1"]) == 0
    assert load_training_state(tmp_path / "short" / "checkpoints" / "step-1.pt")["step"] == 1
    assert not (tmp_path / "unused").exists()
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": {**saved, "bogus": 1}}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown training settings ['bogus']" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["train", "--config", str(first / "config.json"), "--resume"]) == 2
    assert "--config starts a run" in capsys.readouterr().err
    no_out = tmp_path / "no_out.json"
    no_out.write_text(json.dumps({k: v for k, v in saved.items() if k != "out"}))
    assert main(["train", "--config", str(no_out)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_cli_errors(prepared, tmp_path, capsys):
    from ldmkit.cli import main

    assert main(["train", "--out", str(tmp_path / "x")]) == 2
    assert "--autoencoder is required" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--autoencoder", str(prepared / "ae"), "--latents", str(prepared / "latents"),
                 "--out", str(tmp_path / "y"), "--batch-size", "5", "--grad-accum", "2"]) == 2
    assert "batch_size 5" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(prepared, tmp_path):
    steps = 8
    full = subprocess.run(_cmd(prepared, tmp_path / "full", "--steps", str(steps), "--checkpoint-every", "2"),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "crash"
    proc = subprocess.Popen(_cmd(prepared, out, "--steps", str(steps), "--checkpoint-every", "2"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-4.pt").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / f"step-{steps}.pt").exists()

    resumed = subprocess.run([sys.executable, "-m", "ldmkit.cli", "train", "--out", str(out), "--resume"],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_training_state(tmp_path / "full" / "checkpoints" / f"step-{steps}.pt")
    b = load_training_state(out / "checkpoints" / f"step-{steps}.pt")
    assert a["step"] == b["step"] == steps
    for key in ("model", "ema"):
        sa = a[key] if key == "model" else a[key]["weights"]
        sb = b[key] if key == "model" else b[key]["weights"]
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (key, k)
