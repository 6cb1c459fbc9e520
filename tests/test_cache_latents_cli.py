"""`ldm cache-latents` feeds `ldm train` from the command line."""
import torch
from PIL import Image

from ldmkit.autoencoder.model import PRESETS, Autoencoder
from ldmkit.cli import main
from ldmkit.data.latents import CachedLatents, read_index
from ldmkit.io.format import save_component


def _autoencoder(tmp_path):
    torch.manual_seed(0)
    return save_component(Autoencoder(PRESETS["tiny-kl-f4"]), tmp_path / "ae")


def test_cache_shapes_then_read_back(tmp_path):
    ae = _autoencoder(tmp_path)
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", "shapes", "--out", str(tmp_path / "lat"),
                 "--length", "12", "--batch-size", "5"]) == 0
    cache = CachedLatents(tmp_path / "lat", sample=False)
    assert len(cache) == 12 and cache[0]["latent"].shape == (4, 8, 8) and isinstance(cache[0]["caption"], str)
    assert read_index(tmp_path / "lat")["source"]["dataset"] == "shapes"
    # an existing cache is not overwritten silently
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", "shapes", "--out", str(tmp_path / "lat"),
                 "--length", "4"]) == 2


def test_cache_image_folder_with_class_labels_skips_corrupt_files(tmp_path, capsys):
    ae = _autoencoder(tmp_path)
    for cls, colour in (("cats", (200, 0, 0)), ("dogs", (0, 0, 200))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 36), colour).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dogs" / "broken.png").write_bytes(b"not an image")
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", str(tmp_path / "imgs"), "--class-folders",
                 "--out", str(tmp_path / "lat")]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    cache = CachedLatents(tmp_path / "lat", sample=False)
    assert len(cache) == 4  # the broken file is left out, not replaced by a duplicate
    assert sorted(int(cache[i]["label"]) for i in range(4)) == [0, 0, 1, 1]


def test_cache_rejects_size_not_multiple_of_factor(tmp_path, capsys):
    ae = _autoencoder(tmp_path)
    assert main(["cache-latents", "--autoencoder", str(ae), "--data", "shapes", "--out", str(tmp_path / "x"),
                 "--size", "30"]) == 2
    assert "--size 30 is not a multiple of the autoencoder's downsampling factor 4" in capsys.readouterr().err
