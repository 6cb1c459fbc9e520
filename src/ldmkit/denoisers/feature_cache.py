"""DeepCache-style feature caching (Ma et al. 2023): adjacent sampler steps reuse a UNet's deep features.

The deep half of a UNet (everything below a skip connection) changes little from one network evaluation
to the next, the shallow half more. A `FeatureCache` makes a sampling call run the whole UNet at one
evaluation in `interval` (a *full* step) and keep the features entering the up layer that reads skip
`branch + 1`; the evaluations between (*partial* steps) run conv_in, the first `branch + 1` down layers
(resnets with their attention, downsamplers) and the up layers that read those skips, fed with the kept
features: the mid block and every deeper layer are skipped.

    cache = FeatureCache(interval=3, branch=0)
    for each network evaluation:
        with cache.evaluation(unet):         # evaluation 1, 1 + interval, ... run in full; UNet.forward asks
            out = unet(x, t, context)        # the cache what to run, one forward per chunk of rows

Branches count down layers: branch 0 (the default, DeepCache's too) cuts after the first down resnet, so
a partial step recomputes two skips (conv_in's output and that resnet's) and runs the last two up resnets;
the deepest branch, skips - 2, skips only the mid block. A *step* is one network evaluation: a sampler
that evaluates the network twice per step (Heun, DPM++ SDE, flow Heun) counts both, so interval 2 runs
its first evaluation of each step in full and reuses those features for the second one.

The forwards of one evaluation (the chunks of a CFG batch split by `max_model_batch`) are told apart by
their order: chunk k of a partial step reuses chunk k's features of the last full step. A ControlNet's
residuals reach a partial step only through the shallow skips it recomputes; the deep skips' and the mid
block's residuals act through the cached features of the last full step.
"""
from __future__ import annotations

import contextlib

import torch


def branches(unet) -> int:
    """How many cut points a UNet has: its skip connections - 1 (branch 0 .. skips - 2)."""
    return len(unet.skip_channels) - 1


class FeatureCache:
    """The cache of one sampling call (see the module doc); `full_runs` / `partial_runs` count the forwards."""

    def __init__(self, interval: int, branch: int = 0):
        if interval < 1:
            raise ValueError(f"cache interval {interval} must be >= 1")
        if branch < 0:
            raise ValueError(f"cache branch {branch} must be >= 0")
        self.interval, self.branch = int(interval), int(branch)
        self.calls = 0  # network evaluations begun (`next_call`)
        self.full_runs = self.partial_runs = 0
        self._slot = 0  # forwards so far in this evaluation: chunk k's features are kept under k
        self._key = 0
        self._partial = False
        self._features: dict[int, torch.Tensor] = {}

    @property
    def depth(self) -> int:
        """The skips a partial step recomputes (conv_in's output and the first branch + 1 down layers')."""
        return self.branch + 2

    @property
    def full(self) -> bool:
        """Whether the current evaluation runs the whole UNet: the first one and every interval-th after."""
        return (self.calls - 1) % self.interval == 0

    def next_call(self) -> None:
        """A new network evaluation begins (its forwards are chunks 0, 1, ... of its rows)."""
        self.calls += 1
        self._slot = 0

    @contextlib.contextmanager
    def evaluation(self, unet):
        """One network evaluation: `unet` consults this cache inside the block (the plain UNet outside it)."""
        self.next_call()
        unet.feature_cache = self
        try:
            yield
        finally:
            unet.feature_cache = None

    def begin(self, x: torch.Tensor) -> bool:
        """Called by `UNet.forward`: True when this forward takes the shortcut. A chunk with no features kept
        for its rows (no full step before it, another batch) runs in full."""
        if self.calls == 0:
            raise RuntimeError("FeatureCache.next_call() must announce each network evaluation")
        self._key, self._slot = self._slot, self._slot + 1
        kept = self._features.get(self._key)
        self._partial = not self.full and kept is not None and kept.shape[0] == x.shape[0]
        if self._partial:
            self.partial_runs += 1
        else:
            self.full_runs += 1
        return self._partial

    def features(self) -> torch.Tensor:
        """The features a partial step's up path starts from (kept at the last full step)."""
        return self._features[self._key]

    def record(self, pos: int, h: torch.Tensor) -> None:
        """Called by `UNet.decode` before the up resnet that reads skip `pos`: keep its input at a full step."""
        if not self._partial and pos == self.branch + 1:
            self._features[self._key] = h
