"""`ldm eval` and `ldm train-classifier` end to end on tiny inputs."""
import json

import pytest
import torch

from ldmkit.cli import main
from ldmkit.io.images import save_png, tensor_to_pil
from ldmkit.metrics.classifier import FeatureClassifier, FeatureClassifierConfig, save_classifier
from ldmkit.metrics.evaluate import evaluate, images_from_folder
from ldmkit.metrics.features import ClassifierFeatures


def _stripes(label: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(size)
    pat = (i[:, None] // 2 % 2).expand(size, size) if label == 0 else (i[None, :] // 2 % 2).expand(size, size)
    return (pat.float() * 2 - 1 + 0.2 * torch.randn(size, size, generator=g)).clamp(-1, 1)[None]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = FeatureClassifierConfig(in_channels=1, image_size=16, num_classes=2, widths=(8, 16), feature_dim=8)
    model = FeatureClassifier(cfg).eval()
    # untrained weights are enough here: the report plumbing is under test, not the accuracy
    folder = tmp_path_factory.mktemp("clf")
    return save_classifier(model, folder / "clf", dataset="stripes", accuracy=0.5, class_names=["h", "v"])


def _write_set(folder, n, seed, with_meta=True):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        label = k % 2
        meta = {"class": label, "seed": seed + k} if with_meta else None
        save_png(tensor_to_pil(_stripes(label, seed=seed + k)), folder / f"img-{k:03d}.png", meta)


def test_eval_folder_report_names_network_and_scores(tmp_path, classifier_dir, capsys):
    _write_set(tmp_path / "gen", 12, seed=0)
    _write_set(tmp_path / "real", 12, seed=100, with_meta=False)
    out = tmp_path / "report.json"
    rc = main(["eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "real"),
               "--features", str(classifier_dir), "--out", str(out), "--k", "2"])
    assert rc == 0
    report = json.loads(out.read_text())
    fn = report["feature_network"]
    assert fn["dataset"] == "stripes" and len(fn["weights_sha256"]) == 64 and fn["feature_dim"] == 8
    for key in ("fid", "precision", "recall"):
        assert isinstance(report[key], float)
    assert report["num_generated"] == 12 and report["kid"]["subset_size"] == "all"
    acc = report["class_accuracy"]
    assert acc["n"] == 12 and 0.0 <= acc["accuracy"] <= 1.0
    assert acc["classifier"]["weights_sha256"] == fn["weights_sha256"]
    assert json.loads(capsys.readouterr().out)["fid"] == report["fid"]


def test_images_from_folder_reads_labels_and_greyscale(tmp_path):
    _write_set(tmp_path / "g", 4, seed=0)
    s = images_from_folder(tmp_path / "g")
    assert s.images.shape == (4, 1, 16, 16) and s.labels == [0, 1, 0, 1] and s.prompts is None
    (tmp_path / "sub" / "v").mkdir(parents=True)
    save_png(tensor_to_pil(_stripes(1)), tmp_path / "sub" / "v" / "a.png")
    assert images_from_folder(tmp_path / "sub").labels == ["v"]


def test_evaluate_identical_sets_and_sample_order(classifier_dir):
    net = ClassifierFeatures.load(classifier_dir)
    x = torch.stack([_stripes(k % 2, seed=k) for k in range(20)])
    same = evaluate(x, x, net, k=2)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    y = torch.stack([_stripes(1, seed=50 + k) for k in range(16)])
    a = evaluate(y, x, net, k=2)
    perm = evaluate(y[torch.randperm(16)], x[torch.randperm(20)], net, k=2)
    for key in ("fid", "precision", "recall"):
        assert perm[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9)
    assert perm["kid"]["mean"] == pytest.approx(a["kid"]["mean"], rel=1e-6, abs=1e-12)


def test_eval_bad_input_is_one_line_error(tmp_path, classifier_dir, capsys):
    _write_set(tmp_path / "gen", 4, seed=0)
    assert main(["eval", "--generated", str(tmp_path / "gen"), "--features", str(classifier_dir)]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "gen"),
                 "--features", str(tmp_path / "missing")]) == 2
    assert "train-classifier" in capsys.readouterr().err
    assert main(["eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "gen"),
                 "--features", str(classifier_dir), "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err
    assert main(["train-classifier", "--dataset", "shapes", "--out", str(tmp_path / "c"), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_train_classifier_command_on_shapes(tmp_path):
    rc = main(["train-classifier", "--dataset", "shapes", "--out", str(tmp_path / "clf"), "--limit", "64",
               "--test-limit", "32", "--max-steps", "2", "--batch-size", "16", "--device", "cpu"])
    assert rc == 0
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["dataset"] == "shapes" and 0.0 <= meta["accuracy"] <= 1.0 and meta["steps"] == 2
    assert meta["train_examples"] == 64 and meta["test_examples"] == 32
    assert len(meta["class_names"]) == 12


def _tiny_class_model(folder):
    import dataclasses

    from ldmkit.autoencoder.model import Autoencoder
    from ldmkit.conditioning.labels import ClassConditioner, ClassConfig
    from ldmkit.denoisers.unet import PRESETS as UNET_PRESETS
    from ldmkit.denoisers.unet import UNet
    from ldmkit.diffusion import make_schedule
    from ldmkit.io.format import save_model

    torch.manual_seed(0)
    ae = Autoencoder.from_preset("tiny-kl-f4")
    cfg = dataclasses.replace(UNET_PRESETS["tiny"], cross_attention_dim=None, down_block_types=("DownBlock2D",) * 2,
                              up_block_types=("UpBlock2D",) * 2, mid_block_type="UNetMidBlock2D",
                              num_class_embeds=3)
    index = {"schedule": make_schedule("linear").to_dict(), "objective": "eps", "conditioning": "class",
             "concat": None, "latent_size": [8, 8], "defaults": {"sampler": "ddim", "steps": 2}}
    cond = ClassConditioner(ClassConfig(num_classes=2, class_names=("h", "v")))
    return save_model(folder, {"autoencoder": ae, "denoiser": UNet(cfg), "conditioner": cond}, index)


def test_eval_samples_a_class_conditional_model(tmp_path, classifier_dir):
    model = _tiny_class_model(tmp_path / "model")
    _write_set(tmp_path / "real", 8, seed=100, with_meta=False)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(model), "--reference", str(tmp_path / "real"), "--features",
               str(classifier_dir), "--num", "6", "--steps", "2", "--batch-size", "3", "--device", "cpu",
               "--save-samples", str(tmp_path / "s"), "--out", str(out), "--k", "2"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["num_generated"] == 6 and report["class_accuracy"]["n"] == 6
    assert set(report["class_accuracy"]["per_class"]) == {"h", "v"}  # balanced classes 0,1,0,1,...
    assert report["generated"]["sampler"] == "ddim" and report["generated"]["steps"] == 2
    again = images_from_folder(tmp_path / "s")  # saved samples carry their class for a later --generated run
    assert again.labels == [0, 1, 0, 1, 0, 1]


def test_eval_scores_shapes_prompt_adherence_from_png_metadata(tmp_path, classifier_dir):
    from ldmkit.data.shapes import ShapesDataset

    data = ShapesDataset("train", size=32, length=6, seed=3)
    (tmp_path / "gen").mkdir()
    for i in range(len(data)):
        item = data[i]
        save_png(tensor_to_pil(item["image"]), tmp_path / "gen" / f"{i}.png", {"prompt": item["caption"]})
    out = tmp_path / "r.json"
    assert main(["eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "gen"),
                 "--features", str(classifier_dir), "--k", "2", "--out", str(out)]) == 0
    adherence = json.loads(out.read_text())["adherence"]
    # real renders of the prompts: the analyser must find exactly what each caption asks for
    assert adherence["n"] == 6 and adherence["match_rate"] == 1.0
    assert "samples" not in adherence


def test_eval_warns_when_the_classifier_knows_other_classes(tmp_path, classifier_dir, capsys):
    """A model whose classes are not the classifier's gets its accuracy with a warning (printed and in the
    report): the labels are compared by index only. The old `ldm eval` said nothing."""
    import dataclasses

    from ldmkit.conditioning.labels import ClassConditioner, ClassConfig
    from ldmkit.io.format import load_model, save_model

    model = _tiny_class_model(tmp_path / "model")
    index, comps = load_model(model)
    index = {k: v for k, v in index.items() if k not in ("format", "format_version", "components")}
    comps["conditioner"] = ClassConditioner(dataclasses.replace(comps["conditioner"].config,
                                                                class_names=("cat", "dog")))
    save_model(tmp_path / "pets", comps, index)
    _write_set(tmp_path / "real", 8, seed=100, with_meta=False)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tmp_path / "pets"), "--reference", str(tmp_path / "real"), "--features",
               str(classifier_dir), "--num", "4", "--steps", "2", "--device", "cpu", "--out", str(out), "--k", "2"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "ldm eval: warning:" in err and "['cat', 'dog']" in err and "['h', 'v']" in err
    assert "by index" in json.loads(out.read_text())["class_accuracy"]["warning"]
    # the model the classifier was made for gets no warning
    rc = main(["eval", "--model", str(model), "--reference", str(tmp_path / "real"), "--features",
               str(classifier_dir), "--num", "4", "--steps", "2", "--device", "cpu", "--k", "2"])
    assert rc == 0 and "warning" not in capsys.readouterr().err


def test_eval_samples_any_text_model_from_a_prompts_file(tmp_path, classifier_dir, capsys):
    """`ldm eval --model` took text models only with the shapes prompts; any prompts file works now, and
    adherence is reported only for prompts of the shapes grammar."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_pipelines import make_autoencoder, make_unet

    from ldmkit.conditioning import TransformerTextEncoder
    from ldmkit.diffusion import make_schedule
    from ldmkit.io.format import save_model

    torch.manual_seed(0)
    text = TransformerTextEncoder.from_captions(["a photo of a cat"], width=32, depth=1, heads=2, max_length=8)
    save_model(tmp_path / "m", {"autoencoder": make_autoencoder(), "denoiser": make_unet(), "conditioner": text},
               {"schedule": make_schedule("sd15").to_dict(), "objective": "eps", "conditioning": "text",
                "concat": None, "latent_size": [8, 8], "defaults": {"sampler": "ddim", "steps": 2}})
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\na dog on grass\n")
    _write_set(tmp_path / "real", 8, seed=100, with_meta=False)
    rc = main(["eval", "--model", str(tmp_path / "m"), "--reference", str(tmp_path / "real"), "--features",
               str(classifier_dir), "--num", "4", "--steps", "2", "--device", "cpu", "--k", "2",
               "--prompts-file", str(prompts), "--out", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_generated"] == 4 and "shapes" in report["adherence"]["skipped"]
    rc = main(["eval", "--model", str(tmp_path / "m"), "--reference", str(tmp_path / "real"), "--features",
               str(classifier_dir), "--num", "4", "--device", "cpu"])
    assert rc == 2 and "--prompts-file" in capsys.readouterr().err
