"""Image-folder dataset (captions, labels, transforms, corrupt files) and the Fashion-MNIST reader."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.images import ImageFolder, collate, resize_crop


def _png(path, w=40, h=30, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def test_captions_from_txt_and_metadata_and_transforms(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    _png(tmp_path / "sub" / "b.jpg", colour=(0, 0, 255))
    _png(tmp_path / "c.png", colour=(0, 255, 0))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.jpg", "text": "blue"}) + "\n")
    ds = ImageFolder(tmp_path, size=16)
    assert len(ds) == 3
    items = {p.name: ds[i] for i, p in enumerate(ds.files)}
    assert items["a.png"]["caption"] == "a red thing"
    assert items["b.jpg"]["caption"] == "blue"
    assert items["c.png"]["caption"] is None and items["c.png"]["label"] is None
    img = items["a.png"]["image"]
    assert img.shape == (3, 16, 16) and img.min() >= -1 and img.max() <= 1
    assert torch.allclose(img[0], torch.ones(16, 16)) and torch.allclose(img[1], -torch.ones(16, 16))
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and len(batch["caption"]) == 2


def test_metadata_csv_class_folders_and_grayscale(tmp_path):
    for cls in ("cat", "dog"):
        for k in range(2):
            _png(tmp_path / cls / f"{k}.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\ncat/0.png,a cat\n")
    ds = ImageFolder(tmp_path, size=8, class_folders=True, channels=1)
    assert ds.classes == ["cat", "dog"]
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert labels == [0, 0, 1, 1]
    assert ds[0]["caption"] == "a cat" and ds[0]["image"].shape == (1, 8, 8)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    _png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = ImageFolder(tmp_path, size=8)
    with pytest.warns(UserWarning, match="skipping unreadable image .*bad.png"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1
    assert all(it["image"].shape == (3, 8, 8) for it in items)  # the bad slot falls through to a good image
    only_bad = tmp_path / "bad_only"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 1 images .* are unreadable"):
        ImageFolder(only_bad, size=8)[0]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)
    _png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="channels=2"):
        ImageFolder(tmp_path, channels=2)
    (tmp_path / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1"):
        ImageFolder(tmp_path)


def test_resize_crop_flip_and_split(tmp_path):
    img = Image.fromarray(np.arange(30 * 60 * 3, dtype=np.uint8).reshape(30, 60, 3))
    out = resize_crop(img, 16)
    assert out.size == (16, 16)
    a = resize_crop(img, 16, random_crop=True, rng=random.Random(0))
    b = resize_crop(img, 16, random_crop=True, rng=random.Random(0))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    for k in range(6):
        _png(tmp_path / f"{k}.png", colour=(40 * k, 0, 0))
    ds = ImageFolder(tmp_path, size=8, random_crop=True, flip=True)
    train, held = ds.split(2, seed=1)
    assert len(train) == 4 and len(held) == 2 and not set(train.files) & set(held.files)
    assert not held.flip and not held.random_crop and train.flip
    assert [p.name for p in ds.split(2, seed=1)[1].files] == [p.name for p in held.files]  # deterministic
    with pytest.raises(ValueError, match="holdout=6"):
        ds.split(6)
    # Augmentation can be driven by a caller's rng (exact resume in the trainer).
    x1 = train.item(0, rng=random.Random(5))["image"]
    x2 = train.item(0, rng=random.Random(5))["image"]
    assert torch.equal(x1, x2)


def test_fashion_mnist_reader():
    from ldmkit.data import fashion_mnist as fm

    if not fm.available():
        pytest.skip("dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    ds = fm.FashionMNIST("test", channels=3, limit=16)
    it = ds[0]
    assert len(ds) == 16 and ds.size == 32
    assert it["image"].shape == (3, 32, 32) and it["image"].min() >= -1 and it["image"].max() <= 1
    assert torch.all(it["image"][:, :2] == -1)  # the padding is background
    assert it["label"] == 9 and it["caption"] == "Ankle boot"  # first t10k item is an ankle boot
    raw = fm.FashionMNIST("train", pad_to_32=False, limit=4)
    assert raw[0]["image"].shape == (1, 28, 28)
    # `ldm cache-latents --data fashion-mnist` gives the autoencoder the channels it was trained on
    from ldmkit.data.commands import dataset_for_cache

    for channels in (1, 3):
        ds, names = dataset_for_cache("fashion-mnist", 32, 0, 0, False, channels=channels)
        assert ds[0]["image"].shape == (channels, 32, 32) and names[1] == "Trouser"


def test_fashion_mnist_absent_message(tmp_path):
    from ldmkit.data.fashion_mnist import FashionMNIST

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=tmp_path)
    with pytest.raises(ValueError, match="split='val'"):
        FashionMNIST("val", root=tmp_path)
