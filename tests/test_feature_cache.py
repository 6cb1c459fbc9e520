"""DeepCache-style feature caching (denoisers.feature_cache, pipelines.feature_cache): interval 1 changes
nothing, interval N runs the whole UNet at every N-th evaluation, a partial step equals the full UNet with
its deep features replaced by the cached ones, CFG rows and chunks keep their own features, transformers
are refused, and the CLI records the setting in the PNG."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.denoisers.feature_cache import FeatureCache, branches
from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_pipelines import STEPS, make_autoencoder, text_pipeline  # noqa: E402

# three levels, two layers each: cuts inside a level and at level boundaries (9 skips, branches 0..7)
CONFIG = UNetConfig(block_out_channels=(32, 32, 64), layers_per_block=2, attention_head_dim=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=16, norm_num_groups=8, sample_size=8)


@pytest.fixture(scope="module")
def unet(one_thread):
    torch.manual_seed(0)
    model = UNet(CONFIG).eval()
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.05)  # the output must see every layer
    return model


def _inputs(step: int, batch: int = 2):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), 900.0 - 100 * step),
            torch.randn(batch, 5, 16, generator=g))


def _cut_layer(unet: UNet, branch: int) -> torch.nn.Module:
    """The up resnet that reads skip branch + 1 (the up path reads the skips last to first)."""
    flat = [res for level in unet.up_blocks for res in level.resnets]
    return flat[len(unet.skip_channels) - 2 - branch]


def _reference(unet: UNet, x, t, ctx, features, branch, **kw):
    """The full UNet with the features entering the cut layer replaced by `features` (a pre-hook)."""
    layer = _cut_layer(unet, branch)

    def swap(module, args):
        joined, temb = args
        return torch.cat([features, joined[:, features.shape[1]:]], 1), temb

    hook = layer.register_forward_pre_hook(swap)
    try:
        return unet(x, t, ctx, **kw)
    finally:
        hook.remove()


def _kept_input(unet: UNet, branch: int, run):
    """What `run()` feeds the cut layer (its features part), and run()'s output."""
    seen = []
    layer = _cut_layer(unet, branch)
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        out = run()
    finally:
        hook.remove()
    return seen[0], out


@torch.no_grad()
def test_interval_one_is_bit_identical(unet):
    cache = FeatureCache(1)
    for step in range(3):
        x, t, ctx = _inputs(step)
        plain = unet(x, t, ctx)
        with cache.evaluation(unet):
            cached = unet(x, t, ctx)
        assert torch.equal(plain, cached)
    assert (cache.full_runs, cache.partial_runs) == (3, 0)


@torch.no_grad()
@pytest.mark.parametrize("branch", range(branches(UNet(CONFIG))))
def test_partial_steps_equal_the_full_unet_with_cached_deep_features(unet, branch):
    interval, calls = 3, 7
    cache = FeatureCache(interval, branch)
    mids = []
    hook = unet.mid_block.resnets[0].register_forward_hook(lambda m, i, o: mids.append(1))
    g = torch.Generator().manual_seed(9)
    sizes = [8] + [8] * 2 + [4] + [4] * 2 + [2] + [2] * 2  # skip resolutions: conv_in, level 0, down, ...
    residuals = [torch.randn(2, c, s, s, generator=g) * 0.1 for c, s in zip(unet.skip_channels, sizes)]
    mid = torch.randn(2, 64, 2, 2, generator=g) * 0.1
    try:
        kept = None
        for call in range(calls):
            x, t, ctx = _inputs(call)
            kw = dict(down_residuals=residuals, mid_residual=mid) if call % 2 else {}  # a ControlNet's, sometimes
            cache.next_call()
            unet.feature_cache = cache
            try:
                if call % interval == 0:  # a full step: the UNet's own output, its cut features kept
                    before = len(mids)
                    features, out = _kept_input(unet, branch, lambda: unet(x, t, ctx, **kw))
                    kept = features[:, :features.shape[1] - unet.skip_channels[branch + 1]]
                    assert len(mids) == before + 1
                    unet.feature_cache = None
                    assert torch.equal(out, unet(x, t, ctx, **kw))
                    continue
                out = unet(x, t, ctx, **kw)
            finally:
                unet.feature_cache = None
            torch.testing.assert_close(out, _reference(unet, x, t, ctx, kept, branch, **kw), rtol=1e-5, atol=1e-6)
    finally:
        hook.remove()
    assert cache.full_runs == 3 and cache.partial_runs == 4  # calls 1, 4, 7 in full
    assert len(mids) == 3 + 3 + 4  # the full steps, their uncached twins, the partial steps' references


@torch.no_grad()
def test_chunks_keep_their_own_features(unet):
    """Two forwards per evaluation (CFG chunks): each reuses its own rows' features."""
    cache = FeatureCache(2, 1)
    outs = {}
    for call in range(2):
        x, t, ctx = _inputs(call, batch=4)
        with cache.evaluation(unet):
            outs[call] = torch.cat([unet(x[:2], t[:2], ctx[:2]), unet(x[2:], t[2:], ctx[2:])])
    whole = FeatureCache(2, 1)
    for call in range(2):
        x, t, ctx = _inputs(call, batch=4)
        with whole.evaluation(unet):
            out = unet(x, t, ctx)
        torch.testing.assert_close(outs[call], out, rtol=1e-5, atol=1e-6)
    assert (cache.full_runs, cache.partial_runs) == (2, 2)


# ----------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def tpipe(one_thread):
    return text_pipeline()


def _count_full(pipe, run):
    mids = []
    hook = pipe.denoiser.mid_block.resnets[0].register_forward_hook(lambda m, i, o: mids.append(i[0].shape[0]))
    try:
        return run(), mids
    finally:
        hook.remove()


def test_pipeline_interval_one_is_the_default_and_bit_identical(tpipe):
    kw = dict(num=2, seed=4, steps=STEPS, guidance=3.0, progress=False)
    a = tpipe.text2img("a red square", **kw)
    b = tpipe.text2img("a red square", cache_interval=1, cache_branch=2, **kw)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert "cache_interval" not in y.metadata
    assert tpipe.denoiser.feature_cache is None


def test_cfg_with_two_prompts_in_chunks(tpipe):
    """CFG doubles the rows; chunks of 2 rows (max_model_batch) and rows sampled alone agree."""
    steps, interval = 5, 2
    s = tpipe.settings(steps=steps, guidance=3.0, height=32, width=32, progress=False, cache_interval=interval)
    conds, seeds = ["a red square", "blue circle"], [1, 2]
    one, mids = _count_full(tpipe, lambda: tpipe.sample_latents(s, conds, None, seeds))
    assert mids == [4] * 3  # evaluations 1, 3, 5 of 5 in full, on the 4-row CFG batch
    chunked, mids = _count_full(tpipe, lambda: tpipe.sample_latents(dataclasses.replace(s, max_model_batch=2),
                                                                    conds, None, seeds))
    assert mids == [2, 2] * 3
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)
    alone = torch.cat([tpipe.sample_latents(s, [c], None, [k]) for c, k in zip(conds, seeds)])
    torch.testing.assert_close(alone, one, atol=1e-4, rtol=1e-4)
    plain = tpipe.sample_latents(dataclasses.replace(s, cache_interval=1), conds, None, seeds)
    assert 0 < (plain - one).abs().max() < plain.abs().max()  # the shortcut changes the images, a little


def test_a_step_is_a_network_evaluation(tpipe):
    """Heun evaluates twice a step (once at the last): 3 steps = 5 evaluations, 1, 3, 5 in full."""
    s = tpipe.settings(sampler="heun", steps=3, guidance=3.0, progress=False, cache_interval=2)
    _, mids = _count_full(tpipe, lambda: tpipe.sample_latents(s, ["a"], None, [0]))
    assert len(mids) == 3


def test_img2img_and_inpaint(tpipe):
    from test_pipelines import make_image

    image, mask = make_image(), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    runs = {"img2img": lambda: tpipe.img2img(image, "a", strength=0.6, steps=5, progress=False, cache_interval=2),
            "inpaint": lambda: tpipe.inpaint(image, mask, "a", steps=5, progress=False, cache_interval=2)}
    for task, run in runs.items():
        results, mids = _count_full(tpipe, run)
        evaluations = 3 if task == "img2img" else 5  # strength 0.6 of 5 steps: the last 3
        assert len(mids) == (evaluations + 1) // 2, task
        assert results[0].metadata["cache_interval"] == 2


def test_settings_are_checked_and_recorded(tpipe):
    r = tpipe.text2img("a", steps=STEPS, progress=False, cache_interval=3, cache_branch=1)[0]
    assert (r.metadata["cache_interval"], r.metadata["cache_branch"]) == (3, 1)
    for bad, words in (({"cache_interval": 0}, "cache_interval=0"), ({"cache_interval": 2.5}, "whole number"),
                       ({"cache_interval": 2, "cache_branch": 3}, "cache_branch=3 must be in [0, 2]"),
                       ({"cache_interval": 2, "cache_branch": -1}, "cache_branch=-1")):
        with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")) as e:
            tpipe.settings(**bad)
        assert "\n" not in str(e.value)


def test_refused_for_a_dit():
    from ldmkit.denoisers.dit import PRESETS, DiT
    from ldmkit.diffusion.schedules import make_schedule
    from ldmkit.pipelines import Pipeline

    pipe = Pipeline(make_autoencoder(), DiT(PRESETS["tiny"]).eval(), make_schedule("sd15"), latent_size=[8, 8])
    pipe.settings(cache_interval=1)  # off: fine
    with pytest.raises(UserError, match="not a UNet") as e:
        pipe.settings(cache_interval=2)
    assert "\n" not in str(e.value) and "DiT" in str(e.value)


# ----------------------------------------------------------------------------- the command line
def test_cli_flag_end_to_end(tmp_path, capsys, one_thread):
    from test_cli_generate import _index, _text_encoder, ldm

    from ldmkit.io.format import save_model
    from PIL import Image

    from ldmkit.io.images import read_png_metadata, read_png_text
    from test_pipelines import make_unet

    model = tmp_path / "text"
    save_model(model, {"autoencoder": make_autoencoder(), "denoiser": make_unet(),
                       "conditioner": _text_encoder()}, _index("text"))
    out = tmp_path / "a.png"
    rc, _, err = ldm(capsys, "sample", "--model", model, "--prompt", "a red square", "--seed", 1, "--out", out,
                     "--cache-interval", 2, "--cache-branch", 1, "--no-progress")
    assert rc == 0, err
    meta = read_png_metadata(out)
    assert (meta["cache_interval"], meta["cache_branch"]) == (2, 1)
    assert "Cache interval: 2, Cache branch: 1" in read_png_text(out)["parameters"]
    again = tmp_path / "again.png"  # --from-png runs the same settings again: the same image
    rc, _, err = ldm(capsys, "sample", "--model", model, "--from-png", out, "--out", again, "--no-progress")
    assert rc == 0, err
    assert (read_png_metadata(again)["cache_interval"], read_png_metadata(again)["cache_branch"]) == (2, 1)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    for flags, words in ((("--cache-interval", 0), "--cache-interval=0"),
                         (("--cache-interval", 2, "--cache-branch", 9), "cache_branch=9")):
        rc, _, err = ldm(capsys, "sample", "--model", model, "--prompt", "a", "--out", tmp_path / "b.png",
                         "--no-progress", *flags)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
