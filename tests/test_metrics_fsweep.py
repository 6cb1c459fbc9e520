"""benchmarks/fsweep.py end to end at a toy size (needs the Debian Fashion-MNIST files)."""
import importlib.util
import json
import re
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
    with pytest.raises(SystemExit):
        fs.parse(["--seeds", "1", "1"])
    with pytest.raises(SystemExit):
        fs.parse(["--long", "--full"])
    with pytest.raises(SystemExit):
        fs.parse(["--objective", "x0"])
    p = fs.parse(["--full"])
    assert p.unet_channels == (64, 128, 128) and p.train_images == 60000 and p.seeds == [0, 1, 2]
    p = fs.parse(["--long", "--seeds", "2"])
    assert p.objective == "v" and p.ae_perceptual == 1.0 and p.seeds == [2]
    assert fs.parse([]).seeds == [0]


def test_intervals_and_verdict():
    _fsweep()  # puts benchmarks/ on the path
    import _fsweep_report as rep

    assert rep.interval([3.0])["ci95"] is None
    iv = rep.interval([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.303
    assert iv["mean"] == 2.0 and abs(iv["ci95"] - 4.303 / 3 ** 0.5) < 1e-9

    def run(f, seed, fids):
        pts = [{"step": 10 * (k + 1), "train_gflop": 5.0 * (k + 1), "train_seconds": 1.0, "fid": v, "kid": 0.0,
                "precision": 0.5, "recall": 0.5, "class_accuracy": 0.5} for k, v in enumerate(fids)]
        return {"f": f, "seed": seed, "latent_shape": [1, 32 // f, 32 // f], "batch": 4, "points": pts}

    runs = [run(1, s, [50 + s, 40 + s]) for s in range(3)] + [run(4, s, [30 + s, 10 + s]) for s in range(3)]
    runs += [run(8, s, [20 + s, 12.5 + 3 * s]) for s in range(3)]
    rows = rep.aggregate(runs)
    assert [(r["f"], r["point"]) for r in rows] == [(1, 0), (1, 1), (4, 0), (4, 1), (8, 0), (8, 1)]
    v = rep.verdict(rows)
    last = v["points"][-1]
    assert last["ranked_by_fid"] == [4, 8, 1]
    assert last["latent_beats_pixels"]["clearly"] and last["f8_capped"]["holds"]
    assert not last["f8_capped"]["clearly"]  # 11 +- 2.5 vs 15.5 +- 7.5: intervals overlap
    assert v["points"][0]["ranked_by_fid"] == [8, 4, 1] and not v["points"][0]["f8_capped"]["holds"]
    assert "LDM-4 < LDM-8 < LDM-1" in v["summary"]
    # pixels with three seeds, LDM-4 with one (a sweep reported in parts): no interval comparison claimed
    part = rep.verdict(rep.aggregate(runs[:4]))
    assert not part["points"][-1]["latent_beats_pixels"]["intervals"]
    assert "beats pixels: yes, but one side has one seed" in part["summary"]


@pytest.mark.slow
def test_tiny_sweep_equal_flops_seeds_and_reuse(tmp_path, capsys):
    from ldmkit.data.fashion_mnist import available

    if not available():
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) is not installed")
    fs = _fsweep()
    out = tmp_path / "sweep"
    args = ["--out", str(out), "--results", str(tmp_path / "results"), "--factors", "1", "2",
            "--train-images", "64", "--reference-images", "40", "--steps", "2", "--eval-points", "2",
            "--num-eval", "20", "--eval-steps", "2", "--ae-steps", "2", "--ae-batch", "8",
            "--classifier-steps", "2", "--nfe-model", "2", "--nfe-steps", "2", "--device", "cpu"]
    assert fs.main(args + ["--seeds", "0"]) == 0
    r = json.loads((out / "fsweep.json").read_text())
    assert r["feature_network"]["dataset"] == "fashion-mnist" and len(r["feature_network"]["weights_sha256"]) == 64
    step_flops = [run["train_flops_per_step"] for run in r["runs"]]
    assert abs(step_flops[1] - step_flops[0]) / step_flops[0] < 0.05  # equal FLOPs per optimiser step
    assert [len(run["points"]) for run in r["runs"]] == [2, 2]
    assert {row["sampler"] for row in r["nfe"]["rows"]} == {"ddim", "dpmpp_2m", "euler"}
    for name in ("fsweep.png", "fsweep_nfe.png", "samples-f1-seed0.png", "samples-f2-seed0.png", "fsweep.md"):
        assert (out / name).is_file(), name
    assert (out / "ldm-f2-seed0" / "model_index.json").is_file()
    assert json.loads((tmp_path / "results" / "fsweep.json").read_text())["runs"] == r["runs"]
    assert r["summary"][0]["fid"]["ci95"] is None and "verdict" in r
    capsys.readouterr()

    # a second seed in a later invocation: the seed-0 runs and the NFE table are read back, not retrained
    assert fs.main(args + ["--seeds", "0", "1", "--reuse"]) == 0
    log = capsys.readouterr().out
    assert "LDM-1 seed 0: reusing" in log and "LDM-2 seed 0: reusing" in log and "LDM-2 seed 1 step" in log
    r2 = json.loads((out / "fsweep.json").read_text())
    assert r2["runs"][0] == r["runs"][0] and [run["seed"] for run in r2["runs"]] == [0, 1, 0, 1]
    assert r2["nfe"] == r["nfe"]
    assert all(row["fid"]["ci95"] is not None for row in r2["summary"])

    # --report-only trains nothing: what is stored is reported, the rest listed (LDM-4 has no autoencoder)
    assert fs.main(args + ["--factors", "1", "2", "4", "--seeds", "0", "1", "2", "--report-only"]) == 0
    log = capsys.readouterr().out
    assert not re.search(r"seed \d step", log) and "autoencoder trained" not in log and "reusing autoencoder" in log
    r3 = json.loads((out / "fsweep.json").read_text())
    assert r3["summary"] == r2["summary"] and r3["nfe"] == r2["nfe"]
    assert r3["missing"] == ["f1-seed2", "f2-seed2", "f4-seed0", "f4-seed1", "f4-seed2"]
    assert "Not run yet (not in the table): f1-seed2" in (out / "fsweep.md").read_text()
    assert fs.main(args + ["--factors", "8", "--report-only"]) == 2  # nothing stored: nothing to report
    capsys.readouterr()

    # changed settings are not reused: the stage-2 learning rate; the autoencoder's perceptual term (a new
    # autoencoder, so the LDM-2 run on it is retrained too)
    assert fs.main(args + ["--seeds", "0", "--reuse", "--lr", "5e-4"]) == 0
    assert "LDM-1 seed 0: reusing" not in capsys.readouterr().out
    assert fs.main(args + ["--seeds", "0", "--reuse", "--ae-perceptual", "1.0", "--factors", "2"]) == 0
    log = capsys.readouterr().out
    assert "LDM-2: reusing autoencoder" not in log and "LDM-2 seed 0: reusing" not in log
    assert json.loads((out / "autoencoder-f2" / "fsweep_ae.json").read_text())["ae_perceptual"] == 1.0
