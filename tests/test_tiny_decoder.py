"""The tiny (TAESD-style) decoder: diffusers AutoencoderTiny folders and original TAESD decoder files decode as in
diffusers; `ldm train-tiny-decoder` distils the demo model's decoder; `--fast-decode`, `--tiny-decoder` and
`--live-preview` in `ldm sample`; bad tiny decoders are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def taesd(tmp_path_factory, one_thread):
    """A random diffusers AutoencoderTiny (TAESD's layout, 4 latent channels) as a folder and as TAESD's own
    decoder file (layers numbered from 1)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny(decoder_block_out_channels=(16, 16, 16, 16),
                                    encoder_block_out_channels=(16, 16, 16, 16)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(root / "folder")
    original = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v.contiguous()
                for k, v in vae.state_dict().items() if k.startswith("decoder.layers.")}
    save_file(original, str(root / "taesd_decoder.safetensors"))
    torch.save(original, root / "taesd_decoder.pth")
    return vae, root


@pytest.mark.parametrize("source", ["folder", "taesd_decoder.safetensors", "taesd_decoder.pth"])
def test_taesd_files_decode_as_diffusers_autoencoder_tiny(taesd, source):
    from ldmkit.io.tiny_decoder_files import read_tiny_decoder

    vae, root = taesd
    tiny = read_tiny_decoder(root / source)
    assert tiny.config.num_blocks == (3, 3, 3, 1) and tiny.downsample_factor == 8 and tiny.config.channels == 16
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = vae.decode(z).sample
        got = tiny(z)
    assert got.shape == (2, 3, 48, 40)
    assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())


def test_train_a_tiny_decoder_and_sample_with_it(tmp_path, one_thread, capsys):
    """A few steps on the shapes set imitate the demo model's decoder better than step 0; the run's tiny decoder
    decodes `ldm sample --fast-decode` images (metadata "Decoder: tiny"), and --live-preview writes the preview."""
    from ldmkit.cli import main
    from ldmkit.io.infotext import parse_infotext
    from ldmkit.training import Trainer
    from ldmkit.training.methods import TinyDecoderMethod, TinyTrainConfig

    cfg = TinyTrainConfig(autoencoder="demo-shapes", data="shapes", out=str(tmp_path / "run"), steps=40, batch_size=8,
                          channels=16, lr=3e-3, warmup_steps=5, ema_decay=0.0, sample_every=1000, checkpoint_every=20,
                          eval_images=32, progress=False, device="cpu", seed=0)
    trainer = Trainer(TinyDecoderMethod(cfg))
    batch = next(trainer.method.batches(0))[0]
    with torch.no_grad():
        first = float(trainer.method.loss(trainer.model, batch, "main", 0)[0])
    folder = trainer.run()
    with torch.no_grad():
        last = float(trainer.method.loss(trainer.model, batch, "main", 0)[0])
    assert last < 0.7 * first, (first, last)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["psnr_vs_full_decoder_db"] > 10 and summary["parameters"] < 100_000

    out = tmp_path / "img"
    args = ["sample", "--model", "demo-shapes", "--prompt", "a red circle", "--steps", "4", "--no-progress",
            "--out", str(out), "--tiny-decoder", str(folder)]
    assert main(args + ["--fast-decode", "--live-preview"]) == 0
    png = sorted(out.glob("*.png"))
    assert (out / "preview.png").is_file() and len([p for p in png if p.name != "preview.png"]) == 1
    from PIL import Image

    image = Image.open([p for p in png if p.name != "preview.png"][0])
    assert parse_infotext(image.text["parameters"])["Decoder"] == "tiny"
    capsys.readouterr()
    # the bundled model brings its own tiny decoder; a copy without it refuses --fast-decode in one line
    assert main(["sample", "--model", "demo-shapes", "--prompt", "a red circle", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "own"), "--fast-decode"]) == 0
    plain = _without_tiny_decoder(tmp_path / "plain")
    capsys.readouterr()
    assert main(["sample", "--model", str(plain), "--prompt", "a red circle", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "x"), "--fast-decode"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fast_decode needs a tiny decoder" in err[0]


def _without_tiny_decoder(folder):
    import shutil

    from ldmkit.io import resolve_model_path

    shutil.copytree(resolve_model_path("demo-shapes"), folder, ignore=shutil.ignore_patterns("tiny_decoder"))
    index = json.loads((folder / "model_index.json").read_text())
    index["components"].remove("tiny_decoder")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_tiny_decoder_for_other_latents_is_refused(taesd, tmp_path, capsys):
    """demo-shapes has 4-channel latents at f = 4; the TAESD decodes f = 8: refused before sampling."""
    from ldmkit.cli import main

    _, root = taesd
    code = main(["sample", "--model", "demo-shapes", "--prompt", "a red circle", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "x"), "--tiny-decoder", str(root / "folder"), "--fast-decode"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "8x; this model's are 4-channel, 4x" in err[0], err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code = main(["sample", "--model", "demo-shapes", "--prompt", "a red circle", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "y"), "--tiny-decoder", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err


def test_a_taesd3_style_folder_keeps_its_scaling_and_shift(tmp_path, one_thread):
    """TAESD3 / TAEF1 folders say scaling_factor / shift_factor: diffusers' pipelines decode
    latents / scaling + shift, and so does the tiny decoder read from the folder."""
    from ldmkit.io.tiny_decoder_files import read_tiny_decoder

    torch.manual_seed(1)
    vae = diffusers.AutoencoderTiny(latent_channels=16, decoder_block_out_channels=(8, 8, 8, 8),
                                    encoder_block_out_channels=(8, 8, 8, 8), scaling_factor=1.5305,
                                    shift_factor=0.0609).eval()
    vae.save_pretrained(tmp_path / "taesd3")
    tiny = read_tiny_decoder(tmp_path / "taesd3")
    assert (tiny.config.scaling_factor, tiny.config.shift_factor) == (1.5305, 0.0609)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
        assert torch.allclose(tiny(z), want, atol=1e-6, rtol=0)
