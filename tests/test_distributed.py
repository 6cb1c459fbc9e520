"""DDP with gloo on CPU: 2 processes hold identical weights and match a 1-process run with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ldmkit.training import distributed

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _make_ae(folder):
    from ldmkit.autoencoder.model import PRESETS, Autoencoder
    from ldmkit.io.format import save_component

    torch.manual_seed(0)
    save_component(Autoencoder(PRESETS["tiny-kl-f4"]), folder)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_two_gloo_processes_match_one(tmp_path):
    _make_ae(tmp_path / "ae")
    ae = str(tmp_path / "ae")
    single = subprocess.run([sys.executable, str(WORKER), ae, str(tmp_path / "single")], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
                            str(WORKER), ae, str(tmp_path / "ddp")], env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "ddp-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp-rank1.pt", weights_only=True)
    assert one["world_size"] == 1 and r0["world_size"] == 2 and r1["world_size"] == 2
    # both ranks hold exactly the same weights
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    # same global batch and per-sample randomness: the loss and the update match one process
    assert torch.allclose(r0["losses"], one["losses"], rtol=1e-4, atol=1e-5), (r0["losses"], one["losses"])
    changed = 0
    for k, v in one["weights"].items():
        assert torch.allclose(r0["weights"][k], v, rtol=1e-3, atol=1e-5), k
        changed += 0 if k.endswith("num_batches_tracked") else 1
    assert changed > 0


def test_single_process_context():
    ctx = distributed.init("cpu")
    assert ctx.world_size == 1 and ctx.is_main and not ctx.distributed
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(ctx.all_reduce_mean(x), x)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, ctx) is model
    assert distributed.unwrap(model) is model
    with distributed.no_sync(model, True):  # plain modules have no no_sync: a null context
        pass


def test_bad_strategy_and_device():
    import pytest

    ctx = distributed.DistContext()
    with pytest.raises(ValueError, match="strategy 'zero3'"):
        distributed.wrap(torch.nn.Linear(1, 1), ctx, "zero3")
    with pytest.raises(ValueError, match="device 'tpu'"):
        distributed.init("tpu")
