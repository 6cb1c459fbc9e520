"""Multi-process training with gloo on CPU.

What is compared is exactly comparable, so the comparisons are exact (no tolerance that a machine
with other kernels could exceed): 2 processes with accumulation A run the very micro-batches one
process runs with accumulation 2A (`LDM.batches`), each rank's micro-batch gradient is computed by
the same kernels on the same inputs as the one process's, and the mean of two gradients is the same
float whether DDP / FSDP average them ((g0 + g1) / 2) or one process accumulates them (g0 / 2 + g1 / 2):
halving is exact and the sum of two numbers commutes.

DDP: 2 processes hold identical weights, equal to the 1-process run's. FSDP (strategy="fsdp",
torch FSDP1 with use_orig_params) computes through flattened, sharded parameters (other kernels on other
memory layouts), so its weights match the 1-process run's up to float rounding lifted by AdamW (see
FSDP_ATOL); checkpoints are written once (rank 0) and `--resume` repeats an uninterrupted FSDP run
exactly; FSDP checkpoints resume under DDP.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ldmkit.training import distributed

WORKER = Path(__file__).with_name("_ddp_worker.py")
FSDP_WORKER = Path(__file__).with_name("_fsdp_worker.py")


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


def _torchrun(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
                           *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout)


def test_two_gloo_processes_match_one(tmp_path):
    _make_ae(tmp_path / "ae")
    ae = str(tmp_path / "ae")
    single = subprocess.run([sys.executable, str(WORKER), ae, str(tmp_path / "single")], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _torchrun(WORKER, ae, tmp_path / "ddp")
    assert multi.returncode == 0, multi.stderr[-3000:]
    # every parameter is used, so DDP runs without find_unused_parameters (and its warning)
    assert "find_unused_parameters=True was specified" not in multi.stderr
    one = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "ddp-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp-rank1.pt", weights_only=True)
    assert one["world_size"] == 1 and r0["world_size"] == 2 and r1["world_size"] == 2
    assert torch.equal(r0["losses"], one["losses"]), (r0["losses"], one["losses"])
    changed = 0
    for k, v in one["weights"].items():
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k  # both ranks hold the same weights...
        assert torch.equal(r0["weights"][k], v), k  # ...and they are the one process's
        changed += int(v.is_floating_point())
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


# ----------------------------------------------------------------------------------------- FSDP
# Tolerances from AdamW's arithmetic: float rounding of the gradients (FSDP's flattened layouts run other
# kernels) is lifted by the normalisation (update ~ lr * g / sqrt(v)) to far less than one step for
# gradients well above their rounding error (measured: ~1e-6 after 3 steps at lr 1e-3); a gradient
# within rounding of zero (an attention key bias: softmax ignores it) can get a different sign and then
# move by up to 2 * lr per step. So: nearly every element within FSDP_ATOL (5 % of one AdamW step), none
# beyond the AdamW bound 2 * lr * steps, and the whole update equal to 1 % in norm.
FSDP_ATOL = 5e-5


def assert_close_training(a: torch.Tensor, b: torch.Tensor, init: torch.Tensor | None, name: str,
                          lr: float = 1e-3, steps: int = 4) -> None:
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    far = int((diff > FSDP_ATOL).sum())
    assert far <= max(1, diff.numel() // 1000), (name, "elements off by more than FSDP_ATOL", far, diff.numel())
    assert float(diff.max()) <= 2 * lr * steps, (name, float(diff.max()))
    if init is not None:
        update = (b - init.float()).norm()
        if update > 1e-3:  # tensors that trained (a key bias gets ~zero gradient: attention ignores it)
            assert float((a - b).norm() / update) < 1e-2, (name, float((a - b).norm() / update))


def _fsdp_helpers():
    sys.path.insert(0, str(FSDP_WORKER.parent))
    import _fsdp_worker

    return _fsdp_worker


def test_fsdp_two_gloo_processes_match_one(tmp_path):
    from ldmkit.training.loop import Trainer
    from ldmkit.training.methods.ldm import LDM

    w = _fsdp_helpers()
    _make_ae(tmp_path / "ae")
    multi = _torchrun(FSDP_WORKER, "steps", tmp_path / "ae", tmp_path / "fsdp")
    assert multi.returncode == 0, multi.stderr[-3000:]
    r0 = torch.load(tmp_path / "fsdp-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "fsdp-rank1.pt", weights_only=True)
    assert r0["world_size"] == 2 and r0["sharded"] and r1["sharded"]
    assert r0["blocks"] > 0 and r0["fsdp_units"] == r0["blocks"] + 1  # every resnet / transformer block a unit

    # the same run in this process with twice the accumulation (strategy "fsdp" without torchrun is a
    # plain module)
    method = LDM(w.make_config(str(tmp_path / "ae"), str(tmp_path / "one"), grad_accum=2), data=w.make_data())
    one = Trainer(method, distributed.DistContext())
    assert not distributed.is_sharded(one.wrapped)
    init = {k: v.clone() for k, v in one.model.state_dict().items()}
    batches = method.batches(0)
    losses = torch.tensor([one.train_step(next(batches))["loss"] for _ in range(one.config.steps)],
                          dtype=torch.float64)
    ref = one.model.state_dict()
    with one.ema.swapped():
        ref_ema = {k: v.clone() for k, v in one.model.state_dict().items() if k in one.trained}

    # the same micro-batches through other memory layouts: the losses agree to float rounding
    assert torch.allclose(r0["losses"], losses, rtol=1e-5, atol=0), (r0["losses"], losses)
    assert set(r0["weights"]) == set(ref)  # plain names: no FSDP / module prefixes
    moved = 0.0
    for k, v in ref.items():
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k  # every rank gathers the same tensors
        assert_close_training(r0["weights"][k], v, init[k], k)
        moved = max(moved, float((v.float() - init[k].float()).abs().max()))
    assert moved > 20 * FSDP_ATOL  # training moved the weights far beyond the tolerance (~2e-3)

    # the EMA averages each rank's shards: it holds 1/2 of the trainable weights per rank...
    trainable = sum(p.numel() for p in one.model.parameters() if p.requires_grad)
    assert 0 < r0["ema_numel"] < trainable and r0["ema_numel"] + r1["ema_numel"] == trainable
    # ...and, gathered, is the one-process EMA
    assert set(r0["ema"]) == set(ref_ema)
    for k, v in ref_ema.items():
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
        assert_close_training(r0["ema"][k], v, init[k], "ema " + k)
    assert any(not torch.equal(r0["ema"][k], r0["weights"][k]) for k in ref_ema)  # it is not the live weights


def test_fsdp_checkpoints_and_exact_resume(tmp_path):
    from ldmkit.training.common import load_training_state

    _make_ae(tmp_path / "ae")
    multi = _torchrun(FSDP_WORKER, "resume", tmp_path / "ae", tmp_path / "run")
    assert multi.returncode == 0, multi.stderr[-3000:]
    r0 = torch.load(tmp_path / "run-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "run-rank1.pt", weights_only=True)

    # only rank 0 wrote training states: A at steps 2 and 4, B and C (resumed at 2) at step 4
    assert [Path(p).relative_to(tmp_path).as_posix() for p in r0["writes"]] == [
        "run-a/checkpoints/step-2.pt", "run-a/checkpoints/step-4.pt", "run-b/checkpoints/step-4.pt",
        "run-c/checkpoints/step-4.pt"]
    assert r1["writes"] == []
    ckdir = tmp_path / "run-a" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-2.pt", "step-4.pt"]  # no temp files left
    assert (tmp_path / "run-a" / "model").is_dir() and (tmp_path / "run-b" / "model").is_dir()

    # the resumed FSDP run ends exactly where the uninterrupted one does (weights and EMA)
    assert r0["b_step"] == 4
    for k in r0["a"]:
        assert torch.equal(r0["a"][k], r0["b"][k]), k
    for k in r0["ema_a"]:
        assert torch.equal(r0["ema_a"][k], r0["ema_b"][k]), k

    # a run initialised from the step-2 checkpoint starts from its averaged weights (each rank taking
    # its shards of them), its EMA from the same
    step2 = load_training_state(ckdir / "step-2.pt")
    d = r0["d_start"]
    assert step2["ema"]["num_updates"] == 2
    for k, v in step2["ema"]["weights"].items():
        assert torch.equal(d["model"][k], v) and torch.equal(d["ema"][k], v), k

    # the checkpoint holds the full trained weights under the plain names, and named optimiser state
    state = load_training_state(ckdir / "step-4.pt")
    assert set(state["model"]) == set(r0["ema_a"])
    for k, v in state["model"].items():
        assert torch.equal(r0["a"][k], v), k
    assert all(isinstance(k, str) for k in state["optimizers"]["main"]["state"])

    # the FSDP checkpoint resumed under DDP (named -> numbered optimiser state) lands, up to the
    # rounding of the other layouts (FSDP_ATOL), on the same weights
    for k, v in r0["c"].items():
        assert_close_training(v, r0["a"][k], None, k)


def test_optimizer_state_converts_between_numbered_and_named():
    """DDP / single-process checkpoints number the optimiser's parameters, FSDP ones name them;
    load_optimizer_state_dict takes either, through the order of the optimiser's groups."""
    import pytest

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2))
    groups = [{"params": [model[0].weight, model[2].weight]},
              {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    numbered = opt.state_dict()
    names = distributed._param_names(model, opt)
    assert names == ["0.weight", "2.weight", "0.bias", "1.weight", "1.bias", "2.bias"]
    named = distributed._renumber(numbered, lambda i: names[i])
    assert named["param_groups"][1]["params"] == ["0.bias", "1.weight", "1.bias", "2.bias"]

    fresh = torch.optim.AdamW([dict(g, params=list(g["params"])) for g in groups], lr=1e-2)
    distributed.load_optimizer_state_dict(model, fresh, named)
    loaded = fresh.state_dict()
    for i, st in numbered["state"].items():
        assert torch.equal(loaded["state"][i]["exp_avg_sq"], st["exp_avg_sq"]), i
    assert loaded["param_groups"][1]["weight_decay"] == 0.0
    bad = distributed._renumber(numbered, lambda i: "nope." + names[i])
    with pytest.raises(ValueError, match="does not have"):
        distributed.load_optimizer_state_dict(model, fresh, bad)
