"""`ldm train` from the command line: latent cache in, model folder out; `--resume`, `--config`,
`--overwrite`, the run-folder rules (a second run or a second writer is refused, stale temporaries go
on resume), one-line errors with exit code 2 (also under `python -m ldmkit.cli`); SIGKILL mid-run then
`--resume` gives the same weights as an uninterrupted run (slow)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ldmkit.cli import main
from ldmkit.training.common import load_training_state

ARGS = ["--preset", "tiny", "--text-encoder", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
        "--sample-every", "1000", "--sample-steps", "2", "--seed", "1", "--no-progress", "--device", "cpu"]


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


def _argv(root, out, *extra):
    return ["train", "--autoencoder", str(root / "ae"), "--latents", str(root / "latents"), "--out", str(out),
            *ARGS, *extra]


@pytest.fixture(scope="module")
def finished(prepared):
    """A finished 2-step run (checkpoints at steps 1 and 2); tests copy it before changing it."""
    out = prepared / "finished"
    assert main(_argv(prepared, out, "--steps", "2", "--checkpoint-every", "1")) == 0
    return out


def _copy(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _one_line_error(err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm train: error:"), err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LDM_DEBUG"):
        env.pop(key, None)
    return env


def _cmd(root, out, *extra):
    return [sys.executable, "-m", "ldmkit.cli", *_argv(root, out, *extra)]


def test_cli_train_writes_model_and_resumes(prepared, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    assert (out / "model" / "model_index.json").is_file()
    assert (out / "checkpoints" / "step-2.pt").is_file()
    # continue the same run for 1 more step
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert load_training_state(out / "checkpoints" / "step-3.pt")["step"] == 3
    assert "model written to" in capsys.readouterr().out
    # changing a numeric setting on resume is refused with a one-line error
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    _one_line_error(capsys.readouterr().err, "['lr'] differ")
    from ldmkit import pipelines

    pipe = pipelines.load(out / "model", device="cpu")
    assert pipe.conditioning == "text"
    assert len(pipe.text2img("a blue triangle above a red circle", steps=2, progress=False)) == 1


def test_cli_flow_objective_trains_and_writes_its_model(prepared, tmp_path):
    """The sample grid and the model's default sampler follow the objective (flow: flow_euler); the
    old trainer finished training, then died on "unknown sampler 'ddim'" before writing the model."""
    out = tmp_path / "flow"
    assert main(_argv(prepared, out, "--objective", "flow", "--steps", "1", "--checkpoint-every", "1")) == 0
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["objective"] == "flow" and index["defaults"]["sampler"] == "flow_euler"
    assert (out / "samples" / "step_0000001.png").is_file()
    from ldmkit import pipelines

    assert len(pipelines.load(out / "model", device="cpu").text2img("a red circle", steps=2, progress=False)) == 1


def test_cli_refuses_to_write_over_a_run_unless_resume_or_overwrite(prepared, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    assert main(_argv(prepared, out, "--steps", "1")) == 2
    _one_line_error(capsys.readouterr().err, str(out), "already holds a run", "--resume", "--overwrite")
    assert _snapshot(out) == before  # nothing of the old run changed
    # --overwrite replaces it: the old checkpoints (steps 1 and 2) are gone
    assert main(_argv(prepared, out, "--steps", "1", "--checkpoint-every", "5", "--overwrite")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1.pt"]
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 1
    assert not (out / "samples" / "step_0000002.png").exists()


def test_cli_refuses_a_second_writer(prepared, tmp_path, capsys):
    from ldmkit.io.files import FolderLock

    out = tmp_path / "busy"
    with FolderLock(out):
        assert main(_argv(prepared, out, "--steps", "1")) == 2
        _one_line_error(capsys.readouterr().err, str(out), "in use by another process")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    assert main(_argv(prepared, out, "--steps", "1")) == 0  # free again once the other writer is done


def test_cli_resume_removes_stale_checkpoint_temporaries(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    stale = out / "checkpoints" / ".step-3.pt.x8k2q1.tmp"  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"part of a checkpoint")
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert not stale.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2.pt", "step-3.pt"]


def test_cli_config_rebuilds_a_run(prepared, finished, tmp_path, capsys):
    """`ldm train --config RUN/config.json --out NEW` repeats the run (same weights); flags override the file."""
    first = tmp_path / "first"
    assert main(_argv(prepared, first, "--steps", "2", "--ema-decay", "0.5", "--timestep-sampling",
                      "stratified")) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    a = load_training_state(first / "checkpoints" / "step-2.pt")
    b = load_training_state(again / "checkpoints" / "step-2.pt")
    for key in ("model", "ema"):
        sa, sb = (a[key], b[key]) if key == "model" else (a[key]["weights"], b[key]["weights"])
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (key, k)
    saved = json.loads((again / "config.json").read_text())
    assert saved["method"] == "ldm"
    saved = saved["config"]
    assert saved["out"] == str(again) and saved["ema_decay"] == 0.5 and saved["timestep_sampling"] == "stratified"
    # a plain object of fields works too, and given options win over it
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({**saved, "out": str(tmp_path / "unused"), "steps": 5}))
    assert main(["train", "--config", str(plain), "--out", str(tmp_path / "short"), "--steps", "1"]) == 0
    assert load_training_state(tmp_path / "short" / "checkpoints" / "step-1.pt")["step"] == 1
    assert not (tmp_path / "unused").exists()
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "ldm", "config": {**saved, "bogus": 1}}))
    assert main(["train", "--config", str(bad)]) == 2
    _one_line_error(capsys.readouterr().err, "unknown settings ['bogus']")
    bad.write_text(json.dumps({**saved, "lr": -1}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "neg")]) == 2
    _one_line_error(capsys.readouterr().err, "lr=-1 is outside the allowed range")
    bad.write_text("{not json")
    assert main(["train", "--config", str(bad)]) == 2
    _one_line_error(capsys.readouterr().err, "is not valid JSON")
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    _one_line_error(capsys.readouterr().err, "cannot read")
    assert main(["train", "--config", str(first / "config.json"), "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "--config starts a run")
    assert not (tmp_path / "neg").exists()


def test_cli_errors(prepared, finished, tmp_path, capsys):
    assert main(["train", "--latents", str(prepared / "latents"), "--out", str(tmp_path / "x"), *ARGS]) == 2
    _one_line_error(capsys.readouterr().err, "--autoencoder: a component folder is required")
    assert main(["train", "--autoencoder", str(prepared / "ae"), "--out", str(tmp_path / "x"), *ARGS]) == 2
    _one_line_error(capsys.readouterr().err, "give --latents CACHE")
    assert main(["train", "--out", str(tmp_path / "y"), "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "does not exist")
    assert main(["train", "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "--resume needs --out")
    assert main(["train", "--out", str(finished), "--resume", str(tmp_path / "nope.pt")]) == 2
    _one_line_error(capsys.readouterr().err, "nope.pt")
    assert main(_argv(prepared, tmp_path / "z", "--batch-size", "5", "--grad-accum", "2")) == 2
    _one_line_error(capsys.readouterr().err, "batch_size 5")
    assert main(_argv(prepared, tmp_path / "z", "--objective", "flow", "--sampler", "ddim")) == 2
    _one_line_error(capsys.readouterr().err, "sampler 'ddim' does not fit objective 'flow'")
    with pytest.raises(SystemExit) as exc:  # argparse's own checks: exit 2, one line
        main(_argv(prepared, tmp_path / "z", "--objective", "score"))
    assert exc.value.code == 2
    assert "invalid choice: 'score'" in capsys.readouterr().err
    # the failed starts left their folders usable
    assert main(_argv(prepared, tmp_path / "x", "--steps", "1")) == 0


def test_python_m_cli_bad_value_is_one_line_exit_2(prepared, tmp_path):
    """Under `python -m ldmkit.cli` (torchrun's way in) too: a bad value is a one-line error, exit 2."""
    proc = subprocess.run(_cmd(prepared, tmp_path / "run", "--lr", "0", "--steps", "1"), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _one_line_error(proc.stderr, "lr=0.0 is outside the allowed range")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


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
    assert not list((out / "checkpoints").glob(".*.tmp"))
    a = load_training_state(tmp_path / "full" / "checkpoints" / f"step-{steps}.pt")
    b = load_training_state(out / "checkpoints" / f"step-{steps}.pt")
    assert a["step"] == b["step"] == steps
    for key in ("model", "ema"):
        sa = a[key] if key == "model" else a[key]["weights"]
        sb = b[key] if key == "model" else b[key]["weights"]
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (key, k)
