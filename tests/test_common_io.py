"""Our format, atomic writes, images with metadata, and the shared training utilities."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from ldmkit.io.files import atomic_write, check_state_dict, config_from_dict, read_json, write_json
from ldmkit.io.images import load_image, make_grid, pil_to_tensor, read_png_metadata, save_png, tensor_to_pil
from ldmkit.training.common import EMA, LossLog, latest_checkpoint, load_training_state, prune_checkpoints, rng_state, save_training_state, set_rng_state


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    p = tmp_path / "f.json"
    write_json(p, {"a": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(p, broken)
    assert read_json(p) == {"a": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_config_from_dict_restores_tuples_and_rejects_unknown_keys():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Cfg:
        ch_mult: tuple[int, ...] = (1, 2)
        name: str = "x"

    assert config_from_dict(Cfg, {"ch_mult": [1, 2, 4]}).ch_mult == (1, 2, 4)
    with pytest.raises(ValueError, match="unknown config keys \\['bogus'\\]"):
        config_from_dict(Cfg, {"bogus": 1})


def test_check_state_dict_names_the_problem():
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="weight: file \\(2, 4\\) vs model \\(2, 3\\)"):
        check_state_dict(m, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "x")
    with pytest.raises(ValueError, match="missing key\\(s\\): bias"):
        check_state_dict(m, {"weight": torch.zeros(2, 3)}, "x")
    with pytest.raises(ValueError, match="unexpected key\\(s\\): extra"):
        check_state_dict(m, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "extra": torch.zeros(1)}, "x")


def test_png_metadata_round_trip_and_tensor_conversion(tmp_path):
    x = torch.rand(3, 8, 6) * 2 - 1
    img = tensor_to_pil(x)
    back = pil_to_tensor(img)
    assert back.shape == (3, 8, 6) and (back - x).abs().max() <= 1 / 127.5 + 1e-6
    meta = {"prompt": "a red circle", "seed": 7, "steps": 20, "sampler": "ddim", "guidance": 7.5}
    p = save_png(img, tmp_path / "a.png", meta)
    assert read_png_metadata(p) == meta
    from PIL import Image

    with Image.open(p) as im:
        # A1111's parameters chunk and ldmkit's JSON chunk only: no `prompt` chunk (ComfyUI reads one as JSON)
        assert "Steps: 20" in im.text["parameters"] and set(im.text) == {"parameters", "ldmkit"}
    grid = make_grid(torch.zeros(5, 3, 8, 8), nrow=3, padding=1)
    assert grid.size == (3 * 8 + 4, 2 * 8 + 3)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(bad)


def test_ema_warmup_swap_and_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].requires_grad_(False)  # frozen parts get no shadow copy
    ema = EMA(model, decay=0.9, warmup=True)
    assert ema.names == ["0.weight", "0.bias"] and ema.current_decay() == pytest.approx(0.1)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    live = model[0].weight.detach().clone()
    with ema.swapped():  # the average inside the block: 1 - decay(0) = 0.9 of the step
        assert torch.allclose(model[0].weight, before + 0.9)
    assert torch.equal(model[0].weight, live)  # the training weights come back
    with ema.swapped():  # loading averaged weights: put them into the module, then take them
        with torch.no_grad():
            model[0].weight.zero_()
        ema.take_from_module()
    assert torch.equal(model[0].weight, live)
    with ema.swapped():
        assert torch.equal(model[0].weight, torch.zeros_like(live))
    assert ema.settings() == {"decay": 0.9, "warmup": True, "num_updates": 1}


def test_training_state_round_trip_restores_rngs(tmp_path):
    torch.manual_seed(1); random.seed(1); np.random.seed(1)
    state = {"step": 3, "rng": rng_state(), "w": torch.arange(4.0)}
    expected = (torch.rand(3), random.random(), np.random.rand())
    save_training_state(tmp_path / "step-3.pt", state)
    save_training_state(tmp_path / "step-10.pt", state)
    loaded = load_training_state(tmp_path / "step-3.pt")
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    assert latest_checkpoint(tmp_path).name == "step-10.pt"
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10.pt"]
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="training state .*not a readable PyTorch file"):
        load_training_state(tmp_path / "junk.pt")


def test_loss_log_resume_truncates_and_plots(tmp_path):
    log = LossLog(tmp_path / "loss.csv")
    for s in range(1, 11):
        log.append(s, loss=1.0 / s)
    resumed = LossLog(tmp_path / "loss.csv", resume_step=5)
    assert [r["step"] for r in resumed.rows] == [1, 2, 3, 4, 5]
    resumed.append(6, loss=0.2, kl=0.01)
    assert LossLog(tmp_path / "loss.csv", resume_step=100).rows[-1] == {"step": 6.0, "loss": 0.2, "kl": 0.01}
    png = resumed.plot(tmp_path / "loss.png")
    assert png.stat().st_size > 1000


def test_model_folder_keeps_autoencoder_float32_when_index_asks(tmp_path):
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.io.format import load_model, save_model

    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["tiny-kl-f4"])
    save_model(tmp_path / "m", {"autoencoder": ae}, {"schedule": {}, "defaults": {"upcast_vae": True}})
    _, comps = load_model(tmp_path / "m", dtype=torch.float16)
    assert next(comps["autoencoder"].parameters()).dtype == torch.float32
    save_model(tmp_path / "n", {"autoencoder": ae}, {"schedule": {}, "defaults": {}})
    _, comps = load_model(tmp_path / "n", dtype=torch.float16)
    assert next(comps["autoencoder"].parameters()).dtype == torch.float16
    _, again = load_model(tmp_path / "m")  # exact round trip in float32
    loaded = again["autoencoder"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ae.state_dict().items())
