"""Feature networks: Inception-v3 layout (random weights) and the own classifier."""
import json

import pytest
import torch

from ldmkit.metrics.classifier import (
    PRESETS,
    FeatureClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from ldmkit.metrics.features import (
    ClassifierFeatures,
    FeatureNetwork,
    FIDInceptionV3,
    InceptionFeatures,
    extract_features,
    load_feature_network,
)


def _pattern_set(n, size=16, seed=0):
    """4 classes of texture: horizontal stripes, vertical stripes, checkerboard, flat; plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    i = torch.arange(size)
    patterns = torch.stack([
        (i[:, None] // 2 % 2).expand(size, size),
        (i[None, :] // 2 % 2).expand(size, size),
        ((i[:, None] // 2 + i[None, :] // 2) % 2),
        torch.zeros(size, size, dtype=torch.long),
    ]).float() * 2 - 1
    x = patterns[labels][:, None] + 0.3 * torch.randn(n, 1, size, size, generator=g)
    return torch.utils.data.TensorDataset(x, labels)


def test_inception_layout_matches_pytorch_fid_weight_names(tmp_path):
    net = FIDInceptionV3()
    keys = set(net.state_dict())
    # names from pytorch-fid's pt_inception-2015-12-05 state dict (torchvision Inception3 layout)
    for k in ["Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
              "Mixed_6b.branch7x7dbl_5.bn.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
              "Mixed_7c.branch3x3dbl_3b.bn.running_mean", "fc.weight", "fc.bias"]:
        assert k in keys, k
    assert net.state_dict()["fc.weight"].shape == (1008, 2048)
    assert net.state_dict()["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)


@pytest.mark.slow
def test_inception_loads_weights_file_and_gives_2048_features(tmp_path):
    # a state dict without num_batches_tracked (as the released file) loads; features are 2048-d
    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    feats = InceptionFeatures(path)
    assert isinstance(feats, FeatureNetwork)
    out = feats.features(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    d = feats.describe()
    assert d["name"] == "inception-v3-fid" and len(d["weights_sha256"]) == 64


def test_inception_missing_or_wrong_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("LDMKIT_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="cannot download"):
        load_feature_network("inception")
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a pytorch-fid Inception"):
        InceptionFeatures(bad)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_feature_network(str(tmp_path / "nope"))


def test_classifier_trains_saves_and_loads_with_hash(tmp_path):
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    result = train_classifier(_pattern_set(256), _pattern_set(64, seed=1), cfg, epochs=3, batch_size=32,
                              lr=1e-2, progress=False)
    assert result.accuracy > 0.5  # chance is 0.25
    folder = save_classifier(result.model, tmp_path / "clf", dataset="patterns", accuracy=result.accuracy)
    assert json.loads((folder / "config.json").read_text())["type"] == "feature_classifier"
    model, meta = load_classifier(folder)
    x = _pattern_set(8, seed=2).tensors[0]
    assert torch.allclose(model(x), result.model(x), atol=1e-5)
    assert meta["accuracy"] == pytest.approx(result.accuracy) and len(meta["weights_sha256"]) == 64
    net = load_feature_network(f"classifier:{folder}")
    assert isinstance(net, ClassifierFeatures) and isinstance(net, FeatureNetwork)
    feats = extract_features(net, x, batch_size=3)
    assert feats.shape == (8, cfg.feature_dim) and feats.dtype == torch.float64
    desc = net.describe()
    assert desc["dataset"] == "patterns" and desc["weights_sha256"] == meta["weights_sha256"]


def test_classifier_input_adaptation_and_errors():
    model = FeatureClassifier(PRESETS["tiny"]).eval()
    # RGB input is averaged to grey, other sizes are resized
    assert model.features(torch.zeros(2, 3, 28, 28)).shape == (2, 16)
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="num_classes"):
        type(PRESETS["tiny"])(num_classes=1)
