"""Latent caches with the inputs of spatially conditioned training: images and segmentation maps."""
import json

import numpy as np
import pytest
import torch

from ldmkit.cli import main
from ldmkit.data.latents import CachedLatents, encode_dataset, image_to_uint8, read_index
from ldmkit.data.shapes import SEGMENTATION_CLASSES, SHAPES, ShapesDataset, render, render_segmentation


class _AE(torch.nn.Module):
    """Autoencoder double: mean = 2x2 average pool of a 1x1 conv, std = 0 (no config: factors 1, 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mu = torch.nn.Conv2d(3, 2, 1)

    def encode(self, x):
        mean = torch.nn.functional.avg_pool2d(self.mu(x), 2)
        return type("P", (), {"mean": mean, "std": torch.zeros_like(mean)})()


def test_shapes_segmentation_leaves_images_captions_labels_unchanged():
    plain = ShapesDataset("train", size=32, length=12, seed=4)
    seg = ShapesDataset("train", size=32, length=12, seed=4, segmentation=True)
    for i in range(12):
        a, b = plain[i], seg[i]
        assert "segmentation" not in a
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["label"] == b["label"]
        m = b["segmentation"]
        assert m.shape == (32, 32) and m.dtype == torch.long
        # the map names exactly the shapes of the caption (plus background)
        want = {0} | {1 + SHAPES.index(o.shape) for o in b["spec"].objects}
        assert set(m.unique().tolist()) == want
        # shape pixels are coloured, background pixels far from a shape are white
        white = (b["image"] > 0.99).all(0)
        assert not (white & (m > 0)).any()
        assert white[m == 0].float().mean() > 0.8


def test_render_segmentation_matches_render_layout():
    spec = ShapesDataset("train", size=16, length=3, seed=0, segmentation=True)[0]["spec"]
    img, boxes = render(spec, 16, np.random.default_rng(5), return_layout=True)
    m = render_segmentation(spec, boxes, 16)
    assert m.dtype == np.uint8 and m.shape == (16, 16) and m.max() < len(SEGMENTATION_CLASSES)
    with pytest.raises(ValueError, match="boxes"):
        render_segmentation(spec, boxes[:0], 16)


def test_cache_stores_images_and_maps_round_trip(tmp_path):
    ds = ShapesDataset("train", size=16, length=7, seed=1, segmentation=True)
    out = encode_dataset(_AE(), ds, tmp_path / "c", batch_size=3, shard_size=4, progress=False,
                         store_images=True, store_segmentation=True, segmentation_classes=list(SEGMENTATION_CLASSES))
    index = read_index(out)
    assert index["format_version"] == 2 and index["has_images"] and index["image_shape"] == [3, 16, 16]
    assert index["has_segmentation"] and index["segmentation_classes"] == list(SEGMENTATION_CLASSES)
    cache = CachedLatents(out, sample=False)
    assert cache.images.dtype == torch.uint8 and cache.images.shape == (7, 3, 16, 16)
    for i in range(7):
        assert torch.equal(cache.images[i], image_to_uint8(ds[i]["image"]))
        assert torch.equal(cache.segmentation[i].long(), ds[i]["segmentation"])
        item = cache[i]
        assert (item["image"] - ds[i]["image"]).abs().max() <= 1 / 127.5 + 1e-6
        assert torch.equal(item["segmentation"], ds[i]["segmentation"])
    # without the options nothing extra is stored
    plain = CachedLatents(encode_dataset(_AE(), ds, tmp_path / "p", progress=False))
    assert plain.images is None and plain.segmentation is None and "image" not in plain[0]


def test_version_1_cache_still_loads(tmp_path):
    ds = ShapesDataset("train", size=16, length=5, seed=1)
    out = encode_dataset(_AE(), ds, tmp_path / "c", progress=False)
    index = json.loads((out / "index.json").read_text())
    for key in ("has_images", "image_shape", "has_segmentation", "segmentation_classes"):
        del index[key]
    index["format_version"] = 1  # what caches written before format 2 hold
    (out / "index.json").write_text(json.dumps(index))
    cache = CachedLatents(out, sample=False)
    assert len(cache) == 5 and cache.images is None and cache.segmentation is None
    assert read_index(out)["has_images"] is False
    index["format_version"] = 3
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="version 1 or 2"):
        read_index(out)


def test_cache_errors(tmp_path):
    ds = ShapesDataset("train", size=16, length=3, seed=1)
    with pytest.raises(ValueError, match="segmentation_classes"):
        encode_dataset(_AE(), ds, tmp_path / "a", progress=False, store_segmentation=True)
    with pytest.raises(ValueError, match="no 'segmentation' map"):
        encode_dataset(_AE(), ds, tmp_path / "b", progress=False, store_segmentation=True,
                       segmentation_classes=["bg", "fg"])
    seg = ShapesDataset("train", size=16, length=3, seed=1, segmentation=True)
    with pytest.raises(ValueError, match="segmentation labels span"):
        encode_dataset(_AE(), seg, tmp_path / "c", progress=False, store_segmentation=True,
                       segmentation_classes=["bg"])


def test_cli_store_images_and_segmentation(tmp_path, capsys):
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.io.format import save_component

    torch.manual_seed(0)
    ae = save_component(Autoencoder(PRESETS["tiny-kl-f4"]), tmp_path / "ae")
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", "shapes", "--out", str(tmp_path / "lat"),
                 "--length", "4", "--size", "16", "--store-images", "--segmentation"]) == 0
    assert "with images and label maps" in capsys.readouterr().out
    cache = CachedLatents(tmp_path / "lat")
    assert cache.images.shape == (4, 3, 16, 16) and cache.segmentation.shape == (4, 16, 16)
    assert cache.segmentation_classes == list(SEGMENTATION_CLASSES)
    # a data set without maps says so
    folder = tmp_path / "imgs"
    folder.mkdir()
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", str(folder), "--out", str(tmp_path / "x"),
                 "--segmentation"]) == 2
    assert "only 'shapes' has" in capsys.readouterr().err


def test_cli_caches_an_image_folder_with_its_label_maps(tmp_path, capsys):
    """Semantic synthesis trains on any folder of label maps: --maps mirrors the image tree (PNG class
    ids), the maps get the images' resize / crop, the class names come from --map-classes."""
    import numpy as np
    from PIL import Image

    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.io.format import save_component
    from ldmkit.io.files import FolderLock

    torch.manual_seed(0)
    ae = save_component(Autoencoder(PRESETS["tiny-kl-f4"]), tmp_path / "ae")
    imgs, maps = tmp_path / "imgs" / "a", tmp_path / "maps" / "a"
    imgs.mkdir(parents=True)
    maps.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 32, 3), dtype=np.uint8)).save(imgs / f"{k}.jpg")
        ids = np.zeros((40, 32), dtype=np.uint8)
        ids[:, 16:] = 2  # right half class 2, left half class 0
        Image.fromarray(ids, mode="L").save(maps / f"{k}.png")
    out = tmp_path / "lat"
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", str(tmp_path / "imgs"), "--out", str(out),
                 "--maps", str(tmp_path / "maps"), "--map-classes", "sky,tree,road"]) == 0, capsys.readouterr().err
    cache = CachedLatents(out)
    # --size defaults to the autoencoder's training size (tiny-kl-f4: 32), not a fixed 32
    assert cache.segmentation.shape == (3, 32, 32) and cache.segmentation_classes == ["sky", "tree", "road"]
    # the 32x40 image and its map are centre-cropped alike: left half 0, right half 2
    assert (cache.segmentation[:, :, :16] == 0).all() and (cache.segmentation[:, :, 16:] == 2).all()
    (maps / "2.png").unlink()
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "lat2"), "--maps", str(tmp_path / "maps")]) == 2
    assert "has no label map" in capsys.readouterr().err
    with FolderLock(out):  # a second writer on the same cache is refused
        assert main(["cache-latents", "--autoencoder", str(ae), "--data", "shapes", "--out", str(out),
                     "--length", "4", "--overwrite"]) == 2
    assert "in use by another process" in capsys.readouterr().err
    assert CachedLatents(out).segmentation_classes == ["sky", "tree", "road"]  # the first cache is intact
