import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.data.latents import CachedLatents, encode_dataset, read_index, weights_sha256
from ldmkit.data.shapes import ShapesDataset, all_prompts


@dataclass(frozen=True)
class _Cfg:
    scaling_factor: float = 0.5
    shift_factor: float = 0.25


class _Posterior:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std


class _DoubleAE(torch.nn.Module):
    """Test double with the autoencoder API: encode(x) -> posterior(.mean, .std), config factors.
    mean = 2x2 average pool of a 1x1 conv; std = softplus of another conv."""

    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.mu = torch.nn.Conv2d(3, 2, 1)
        self.sd = torch.nn.Conv2d(3, 2, 1)

    def encode(self, x):
        return _Posterior(torch.nn.functional.avg_pool2d(self.mu(x), 2),
                          torch.nn.functional.softplus(torch.nn.functional.avg_pool2d(self.sd(x), 2)))


def test_round_trip_exact_with_test_double(tmp_path):
    torch.manual_seed(0)
    ae = _DoubleAE()
    ds = ShapesDataset("train", size=16, length=11, seed=2)
    out = encode_dataset(ae, ds, tmp_path / "cache", batch_size=3, shard_size=4, progress=False,
                         source={"dataset": "shapes", "split": "train"})
    index = read_index(out)
    assert [s["count"] for s in index["shards"]] == [4, 4, 3]
    assert index["latent_shape"] == [2, 8, 8] and index["scaled"] is True
    assert index["scaling_factor"] == 0.5 and index["shift_factor"] == 0.25
    assert index["autoencoder"]["weights_sha256"] == weights_sha256(ae)
    assert index["source"] == {"dataset": "shapes", "split": "train"}
    assert (out / "shard-00002.safetensors").exists() and (out / "shard-00002.json").exists()

    x = torch.stack([ds[i]["image"] for i in range(11)])
    with torch.no_grad():
        post = ae.encode(x)
    want_mean = (post.mean - 0.25) * 0.5
    want_std = post.std * 0.5
    cache = CachedLatents(out, sample=False)
    assert len(cache) == 11 and cache.latent_shape == (2, 8, 8)
    torch.testing.assert_close(cache.mean, want_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.std, want_std, rtol=0, atol=1e-6)
    assert cache.captions == [ds[i]["caption"] for i in range(11)]
    assert cache.labels.tolist() == [ds[i]["label"] for i in range(11)]
    item = cache[7]
    assert torch.equal(item["latent"], cache.mean[7])
    assert item["caption"] == ds[7]["caption"] and all_prompts()[item["label"]] == item["caption"]
    # shard contents are exactly the slices
    shard1 = load_file(str(out / "shard-00001.safetensors"))
    assert torch.equal(shard1["mean"], cache.mean[4:8])
    assert json.loads((out / "shard-00001.json").read_text())["captions"] == cache.captions[4:8]


def test_sampling_is_reproducible_and_has_the_posterior_statistics(tmp_path):
    torch.manual_seed(0)
    ae = _DoubleAE()
    ds = ShapesDataset("train", size=16, length=4, seed=0)
    out = encode_dataset(ae, ds, tmp_path / "c", progress=False)
    a, b = CachedLatents(out, seed=1), CachedLatents(out, seed=1)
    assert torch.equal(a[2]["latent"], b[2]["latent"])
    assert not torch.equal(a[2]["latent"], CachedLatents(out, seed=2)[2]["latent"])
    first = a[2]["latent"]
    a.set_epoch(1)
    assert not torch.equal(first, a[2]["latent"])
    # z = mean + std * eps with eps ~ N(0, 1)
    eps = []
    for epoch in range(200):
        a.set_epoch(epoch)
        eps.append((a[0]["latent"] - a.mean[0]) / a.std[0])
    eps = torch.stack(eps)
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    loader = torch.utils.data.DataLoader(a, batch_size=2)  # default collate works
    batch = next(iter(loader))
    assert batch["latent"].shape == (2, 2, 8, 8) and len(batch["caption"]) == 2


def test_tuple_items_float16_and_errors(tmp_path):
    torch.manual_seed(0)
    ae = _DoubleAE()
    data = [(torch.rand(3, 8, 8) * 2 - 1, k % 3) for k in range(5)]
    out = encode_dataset(ae, data, tmp_path / "c", dtype="float16", class_names=["a", "b", "c"], progress=False)
    cache = CachedLatents(out)
    assert cache.captions is None and cache.labels.tolist() == [0, 1, 2, 0, 1]
    assert cache.class_names == ["a", "b", "c"] and "caption" not in cache[0]
    with torch.no_grad():
        want = ((ae.encode(torch.stack([d[0] for d in data])).mean - 0.25) * 0.5).half().float()
    assert torch.equal(cache.mean, want)
    with pytest.raises(FileExistsError):
        encode_dataset(ae, data, out, progress=False)
    encode_dataset(ae, data[:2], out, shard_size=1, overwrite=True, progress=False)
    assert len(CachedLatents(out)) == 2 and not (out / "shard-00002.json").exists()
    with pytest.raises(ValueError, match="shard_size"):
        encode_dataset(ae, data, tmp_path / "d", shard_size=0)
    with pytest.raises(ValueError, match="dtype"):
        encode_dataset(ae, data, tmp_path / "d", dtype="int8")
    with pytest.raises(FileNotFoundError, match="latent cache"):
        CachedLatents(tmp_path / "nothing")
    with pytest.raises(IndexError):
        cache[5]
    # a damaged cache is reported, not silently truncated
    encode_dataset(ae, data[:3], tmp_path / "e", progress=False)
    (tmp_path / "e" / "shard-00000.safetensors").replace(out / "shard-00001.safetensors")
    with pytest.raises(ValueError, match="damaged"):
        CachedLatents(out)


@pytest.mark.parametrize("preset", ["tiny-kl-f4", "tiny-vq-f4"])
def test_round_trip_with_real_tiny_autoencoder(tmp_path, preset):
    from ldmkit.autoencoder.model import Autoencoder

    torch.manual_seed(0)
    ae = Autoencoder.from_preset(preset, scaling_factor=0.8, shift_factor=-0.1).eval()
    ds = ShapesDataset("heldout", size=32, length=4, seed=0)
    out = encode_dataset(ae, ds, tmp_path / "c", batch_size=4, shard_size=3, progress=False)
    cache = CachedLatents(out, sample=True, seed=0)
    x = torch.stack([ds[i]["image"] for i in range(4)])
    with torch.no_grad():
        post = ae.encode(x)
        torch.testing.assert_close(cache.mean, (post.mean - (-0.1)) * 0.8, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.std, post.std * 0.8, rtol=1e-5, atol=1e-5)
        # the cached mean is what encode_latents(sample=False) gives; decoding it inverts the scaling
        torch.testing.assert_close(cache.mean, ae.encode_latents(x, sample=False), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ae.decode_latents(cache.mean), ae.decode(post.mean), rtol=1e-4, atol=1e-4)
    assert cache.latent_shape == (4, 8, 8)
    assert cache.index["autoencoder"]["config"]["kind"] == preset.split("-")[1]
    assert cache.index["autoencoder"]["weights_sha256"] == weights_sha256(ae)
    if preset.startswith("tiny-vq"):
        assert torch.count_nonzero(cache.std) == 0 and torch.equal(cache[3]["latent"], cache.mean[3])
    else:
        assert torch.all(cache.std > 0)


def test_recaption_copies_latents_and_rewrites_captions(tmp_path):
    from ldmkit.data.latents import recaption

    ds = ShapesDataset("train", size=16, length=10, seed=4)
    src = encode_dataset(_DoubleAE(), ds, tmp_path / "src", batch_size=4, shard_size=4, progress=False)
    out = recaption(src, tmp_path / "upper", str.upper, note="upper case")
    a, b = CachedLatents(src, sample=False), CachedLatents(out, sample=False)
    assert len(a) == len(b) == 10
    for i in range(10):
        assert torch.equal(a[i]["latent"], b[i]["latent"]) and a[i]["label"] == b[i]["label"]
        assert b[i]["caption"] == a[i]["caption"].upper()
    idx = read_index(out)
    assert idx["source"]["recaptioned"] == "upper case" and idx["autoencoder"] == read_index(src)["autoencoder"]
    with pytest.raises(FileExistsError):
        recaption(src, out, str.lower)
    with pytest.raises(ValueError, match="differ"):
        recaption(src, src, str.lower)
    with pytest.raises(ValueError, match="string"):
        recaption(src, tmp_path / "bad", lambda c: None)
