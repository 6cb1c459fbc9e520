"""benchmarks/run_all.py: discovery, failure reporting and the ratio summary (no real benchmark runs)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_ratios_found_by_key_and_from_ours_diffusers_pairs(run_all):
    data = {"device": "cpu", "cases": [{"name": "512px", "ours_ms": 30.0, "diffusers_ms": 40.0},
                                       {"name": "64px", "speedup": 1.5}], "max_abs_diff": 1e-6}
    got = dict(run_all.ratios(data))
    assert got["cases[64px].speedup"] == 1.5
    assert got["cases[512px] ours/diffusers"] == pytest.approx(0.75)
    # a result that states its ratio is not given a second, computed one
    assert run_all.ratios({"ours_s": 1.0, "diffusers_s": 2.0, "ratio_ours_over_diffusers": 0.5}) == [
        ("ratio_ours_over_diffusers", 0.5)]


def test_summary_reports_missing_failed_and_tables(tmp_path, run_all, monkeypatch):
    out = tmp_path / "results"
    out.mkdir()
    (out / "unet_vs_diffusers.json").write_text(json.dumps({"device": "cpu", "time_ratio": 0.9}))
    (out / "broken.json").write_text("{not json")
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "failing.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    (bench / "good.py").write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--device')\n"
                                   "a = p.parse_args()\nprint('device', a.device)\n")
    monkeypatch.setattr(run_all, "HERE", bench)
    assert run_all.discover(with_fsweep=False) == ["failing", "good"]
    logs = out / "logs"
    logs.mkdir()
    runs = [run_all.run_one(n, out, None, 60, logs) for n in ("failing", "good", "sampler_nfe")]
    assert [r["status"] for r in runs] == ["failed (exit 3)", "ok", "missing"]
    assert run_all.run_one("good", out, "cpu", 60, logs)["status"] == "ok"
    assert "device cpu" in (logs / "good.log").read_text()
    assert "no --device option" in run_all.run_one("failing", out, "cuda", 60, logs)["status"]
    text = run_all.write_summary(out, runs).read_text()
    assert "| failing | failed (exit 3) |" in text and "| sampler_nfe | missing |" in text
    assert "| unet_vs_diffusers.json (" in text and "| time_ratio | 0.9 |" in text
    assert "broken.json" in text and "unreadable" in text
