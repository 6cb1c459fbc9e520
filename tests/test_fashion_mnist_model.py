"""The bundled `fashion-mnist` model: it samples right after install, and `ldm eval` reproduces the numbers in
its evaluation.json (the recipe's protocol: 1,000 class-balanced samples against 1,000 test images in its own
classifier's features)."""
from __future__ import annotations

import json

import pytest

from ldmkit.io import resolve_model_path


def _model():
    try:
        return resolve_model_path("fashion-mnist")
    except FileNotFoundError:
        pytest.skip("the fashion-mnist model is not bundled (examples/fashion_mnist/recipe.py --bundle)")


def test_sample_a_class_grid(tmp_path, one_thread):
    from PIL import Image

    from ldmkit.cli import main

    _model()
    assert main(["sample", "--model", "fashion-mnist", "--class", "Trouser", "--num", "4", "--grid", "--steps", "8",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 0
    files = sorted(p for p in (tmp_path / "out").glob("*.png") if not p.name.startswith("grid"))
    assert len(files) == 4 and len(list((tmp_path / "out").glob("grid*.png"))) == 1
    assert "Class: Trouser" in Image.open(files[0]).text["parameters"]


@pytest.mark.slow
def test_ldm_eval_reproduces_the_bundled_numbers(tmp_path):
    from ldmkit.cli import main
    from ldmkit.data import fashion_mnist

    if not fashion_mnist.available():
        pytest.skip("dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    published = json.loads((_model() / "evaluation.json").read_text())
    want = published["at_best_guidance"]
    out = tmp_path / "report.json"
    assert main(["eval", "--model", "fashion-mnist", "--dataset", "fashion-mnist", "--num-reference", "1000",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["feature_network"]["weights_sha256"] == want["feature_network"]["weights_sha256"]
    assert got["fid"] == pytest.approx(want["fid"], rel=0.03)
    assert got["class_accuracy"]["accuracy"] == pytest.approx(want["class_accuracy"]["accuracy"], abs=0.01)
    assert got["precision"] == pytest.approx(want["precision"], abs=0.02)
    assert got["recall"] == pytest.approx(want["recall"], abs=0.02)
