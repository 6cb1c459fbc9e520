"""benchmarks/fsweep.py end to end at a toy size (needs the Debian Fashion-MNIST files)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fsweep():
    spec = importlib.util.spec_from_file_location("fsweep", ROOT / "benchmarks" / "fsweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fsweep"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bad_arguments_are_refused():
    fs = _fsweep()
    with pytest.raises(SystemExit):
        fs.parse(["--factors", "3"])
    with pytest.raises(SystemExit):
        fs.parse(["--num-eval", "5"])
    p = fs.parse(["--full"])
    assert p.unet_channels == (64, 128, 128) and p.train_images == 60000


@pytest.mark.slow
def test_tiny_sweep_equal_flops_and_outputs(tmp_path):
    from ldmkit.data.fashion_mnist import available

    if not available():
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) is not installed")
    fs = _fsweep()
    out = tmp_path / "sweep"
    rc = fs.main(["--out", str(out), "--results", str(tmp_path / "results"), "--factors", "1", "2",
                  "--train-images", "64", "--reference-images", "40", "--steps", "2", "--eval-points", "2",
                  "--num-eval", "20", "--eval-steps", "2", "--ae-steps", "2", "--ae-batch", "8",
                  "--classifier-steps", "2", "--nfe-model", "2", "--nfe-steps", "2", "--device", "cpu"])
    assert rc == 0
    r = json.loads((out / "fsweep.json").read_text())
    assert r["feature_network"]["dataset"] == "fashion-mnist" and len(r["feature_network"]["weights_sha256"]) == 64
    step_flops = [run["train_flops_per_step"] for run in r["runs"]]
    assert abs(step_flops[1] - step_flops[0]) / step_flops[0] < 0.05  # equal FLOPs per optimiser step
    assert [len(run["points"]) for run in r["runs"]] == [2, 2]
    assert {row["sampler"] for row in r["nfe"]["rows"]} == {"ddim", "dpmpp_2m", "euler"}
    for name in ("fsweep.png", "fsweep_nfe.png", "samples-f1.png", "samples-f2.png", "fsweep.md"):
        assert (out / name).is_file(), name
    assert (out / "ldm-f2" / "model_index.json").is_file()
    assert json.loads((tmp_path / "results" / "fsweep.json").read_text())["runs"] == r["runs"]
