"""`ldm convert` round trips, safe reading of .ckpt files, clear errors, scheduler mapping, half precision."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import interop_models as im  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.io import load_model  # noqa: E402
from ldmkit.io import single_file as sf  # noqa: E402
from ldmkit.io.diffusers_export import schedule_to_diffusers  # noqa: E402
from ldmkit.io.diffusers_format import schedule_from_diffusers  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory, one_thread):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("convert")
    out = {"root": root}
    for style in ("sd1", "sd2"):
        pipe = im.build_pipeline(style, workdir=root, seed=1)
        folder = root / f"{style}-diffusers"
        pipe.save_pretrained(folder)
        ckpt = im.to_original_checkpoint(pipe, style)
        single = root / f"{style}.safetensors"
        save_file({k: v.contiguous() for k, v in ckpt.items()}, str(single))
        out[style] = dict(pipe=pipe, folder=folder, single=single, ckpt=ckpt)
    return out


def _files(folder: Path) -> dict:
    """Every file's content: bytes, or for safetensors (whose header order is not reproducible) the
    metadata and the tensors' dtypes, shapes and raw bytes."""
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                content = (f.metadata(), {k: (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8)
                                              .numpy().tobytes()) for k, t in tensors.items()})
        else:
            content = p.read_bytes()
        out[p.relative_to(folder).as_posix()] = content
    return out


def _weights(comps) -> dict:
    return {f"{name}.{k}": v for name, m in comps.items() for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------- round trips
def test_convert_round_trip_is_exact(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    src = sd["sd2"]["folder"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["convert", "--from", str(src), "--to", str(a)]) == 0
    assert main(["convert", "--from", str(a), "--to", str(b), "--format", "diffusers"]) == 0
    assert main(["convert", "--from", str(b), "--to", str(c)]) == 0
    fa, fc = _files(a), _files(c)
    assert fa.keys() == fc.keys() and all(fa[k] == fc[k] for k in fa), "ldmkit -> diffusers -> ldmkit changed bytes"
    # the exported diffusers folder holds the original tensors and runs in diffusers unchanged
    orig = sd["sd2"]["pipe"]
    back = StableDiffusionPipeline.from_pretrained(b)
    for name in ("unet", "vae", "text_encoder"):
        x, y = getattr(orig, name).state_dict(), getattr(back, name).state_dict()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert back.scheduler.config.prediction_type == "v_prediction"
    kw = dict(height=16, width=16, num_inference_steps=3, output_type="np")
    i1 = orig("the red cat", generator=torch.Generator().manual_seed(1), **kw).images
    i2 = back("the red cat", generator=torch.Generator().manual_seed(1), **kw).images
    assert abs(i1 - i2).max() == 0


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_single_file_converts_to_the_same_model_as_the_folder(sd, tmp_path, style):
    m = sd[style]
    args = ["convert", "--from", str(m["single"]), "--to", str(tmp_path / "x"),
            "--tokenizer", str(m["folder"] / "tokenizer")]
    if style == "sd2":
        args += ["--prediction-type", "v"]
    assert main(args) == 0
    ia, ca = load_model(tmp_path / "x")
    ib, cb = load_model(m["folder"])
    wa, wb = _weights(ca), _weights(cb)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ia["schedule"] == ib["schedule"]


def test_convert_refuses_bad_arguments(sd, tmp_path, capsys):
    folder = sd["sd1"]["folder"]
    assert main(["convert", "--from", str(folder), "--to", str(tmp_path / "o"), "--prediction-type", "v"]) == 2
    assert "only apply to original single-file" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f.txt").write_text("x")
    assert main(["convert", "--from", str(folder), "--to", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "--from", str(tmp_path / "nope.safetensors"), "--to", str(tmp_path / "o")]) == 2


# ----------------------------------------------------------------------------- reading .ckpt safely
def _lightning_class():
    """A stand-in for pytorch_lightning's ModelCheckpoint, pickled by name like in real SD .ckpt files."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = cls
    return cls, mods


def test_ckpt_with_lightning_metadata_loads_with_weights_only(sd, tmp_path, monkeypatch):
    cls, mods = _lightning_class()
    path = tmp_path / "sd2.ckpt"
    with monkeypatch.context() as mp:
        for n, mod in mods.items():
            mp.setitem(sys.modules, n, mod)
        torch.save({"state_dict": sd["sd2"]["ckpt"], "global_step": 875000, "epoch": 1,
                    "callbacks": {cls: {"best_model_score": torch.tensor(0.5), "monitor": None}}}, path)
    assert "pytorch_lightning" not in sys.modules  # nothing of it is importable while loading
    state, meta = sf.read_checkpoint(path)
    assert meta["global_step"] == 875000
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(state[key], sd["sd2"]["ckpt"][key])
    # SD 2.x with the 768-v release's global_step: v-prediction without a flag
    parts = sf.single_file_to_parts(path, tokenizer=sd["sd2"]["folder"])
    assert parts.scheduler_config["prediction_type"] == "v_prediction"


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        sf.read_checkpoint(path)
    assert not marker.exists()
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint file"):
        sf.read_checkpoint(bad)


# ----------------------------------------------------------------------------- clear errors
def test_errors_name_the_tensor(sd, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))

    # a shape mismatch in a diffusers folder names the tensor
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(sd["sd1"]["folder"], folder)
    w = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(w))
    key = "down_blocks.0.attentions.0.proj_in.weight"
    state[key] = torch.zeros(7, 7, 1, 1)
    del state["conv_out.bias"]
    save_file(state, str(w))
    with pytest.raises(ValueError) as err:
        load_model(folder)
    assert key in str(err.value) and "conv_out.bias" in str(err.value) and "missing" in str(err.value)

    # an LDM tensor with no counterpart is reported by name
    ckpt = dict(sd["sd1"]["ckpt"])
    ckpt["model.diffusion_model.input_blocks.1.0.mystery.weight"] = torch.zeros(1)
    p = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(p))
    with pytest.raises(ValueError, match="mystery"):
        sf.single_file_to_parts(p)

    # not an SD checkpoint; missing tokenizer
    q = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(q))
    with pytest.raises(ValueError, match="not an original Stable Diffusion checkpoint"):
        load_model(q)
    with pytest.raises(ValueError, match="--tokenizer"):  # none given; CLIP's (if installed) is too big
        load_model(sd["sd1"]["single"])


def test_ema_weights_and_original_config(sd, tmp_path):
    from safetensors.torch import save_file

    ckpt = dict(sd["sd2"]["ckpt"])
    for k, v in list(ckpt.items()):
        if k.startswith("model.diffusion_model."):
            ckpt["model_ema." + "diffusion_model" + k[len("model.diffusion_model."):].replace(".", "")] = v + 1
    p = tmp_path / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(p))
    yaml_file = tmp_path / "v2-inference-v.yaml"
    yaml_file.write_text("model:\n  params:\n    parameterization: v\n    linear_start: 0.00085\n"
                         "    linear_end: 0.0120\n    timesteps: 1000\n    scale_factor: 0.18215\n"
                         "    unet_config:\n      params:\n        num_head_channels: 64\n        image_size: 96\n")
    parts = sf.single_file_to_parts(p, original_config=yaml_file, ema=True)
    assert parts.scheduler_config["prediction_type"] == "v_prediction"
    assert parts.unet_config["sample_size"] == 96
    ref = sd["sd2"]["pipe"].unet.state_dict()
    assert all(torch.equal(parts.unet_state[k], ref[k] + 1) for k in ref)
    with pytest.warns(UserWarning, match="prediction_type='v'"):
        eps = sf.single_file_to_parts(sd["sd2"]["single"])
    assert eps.scheduler_config["prediction_type"] == "epsilon"


# ----------------------------------------------------------------------------- schedulers
def test_scheduler_configs_map_to_schedule_and_sampler():
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    schedule, d, notes = schedule_from_diffusers({"_class_name": "DPMSolverMultistepScheduler", **base,
                                                  "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                                  "rescale_betas_zero_snr": True, "use_karras_sigmas": True})
    assert schedule["prediction_type"] == "v" and schedule["timestep_spacing"] == "trailing"
    assert schedule["rescale_zero_terminal_snr"] is True
    assert d["sampler"] == "dpmpp_2m_karras"
    back = schedule_to_diffusers(schedule, d["sampler"], d["sampler_options"])
    assert back["use_karras_sigmas"] is True and back["rescale_betas_zero_snr"] is True
    assert schedule_from_diffusers(back)[0] == schedule

    s2, d2, notes2 = schedule_from_diffusers({"_class_name": "PNDMScheduler", **base, "steps_offset": 1,
                                              "skip_prk_steps": True})  # SD 1.5's: now run as it is, no note
    assert d2["sampler"] == "pndm" and not notes2 and s2["steps_offset"] == 1
    assert d2["sampler_options"] == {"set_alpha_to_one": False, "skip_prk_steps": True}  # PNDM's defaults
    _, d3, _ = schedule_from_diffusers({"_class_name": "DDIMScheduler", **base, "clip_sample": False,
                                        "set_alpha_to_one": False})
    assert d3["sampler_options"] == {"set_alpha_to_one": False}
    with pytest.raises(ValueError, match="KarrasVeScheduler"):
        schedule_from_diffusers({"_class_name": "KarrasVeScheduler"})
    with pytest.raises(ValueError, match="at most one of use_karras_sigmas"):
        schedule_from_diffusers({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True,
                                 "use_beta_sigmas": True})
    with pytest.raises(ValueError, match="solver_order"):
        schedule_from_diffusers({"_class_name": "UniPCMultistepScheduler", "solver_order": 5})


# (scheduler config, the sampler and options ldmkit runs it with, a note when not exactly diffusers')
SCHEDULERS = [
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "euler_karras", {}, None),
    ({"_class_name": "HeunDiscreteScheduler", "use_beta_sigmas": True}, "heun_beta", {}, None),
    ({"_class_name": "LMSDiscreteScheduler", "use_exponential_sigmas": True}, "lms_exponential", {}, None),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a", {}, None),
    ({"_class_name": "UniPCMultistepScheduler", "solver_order": 3, "solver_type": "bh1"}, "unipc",
     {"solver_order": 3, "solver_type": "bh1", "lower_order_final": True}, None),
    ({"_class_name": "UniPCMultistepScheduler", "use_exponential_sigmas": True}, "unipc_exponential",
     {"solver_order": 2, "solver_type": "bh2", "lower_order_final": True}, "T - 1"),
    ({"_class_name": "DEISMultistepScheduler", "use_karras_sigmas": True}, "deis_karras",
     {"solver_order": 2, "lower_order_final": True}, None),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde",
     {"solver_type": "midpoint"}, None),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
     "dpmpp_3m_sde", {}, "wrong sign"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "dpmpp_2m", {}, "solver_order 3"),
    ({"_class_name": "DPMSolverSDEScheduler", "use_karras_sigmas": True}, "dpmpp_sde_karras", {}, None),
    ({"_class_name": "LCMScheduler"}, "lcm", {"original_inference_steps": 50}, None),
    ({"_class_name": "PNDMScheduler"}, "pndm", {"set_alpha_to_one": False, "skip_prk_steps": False}, None),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "prediction_type": "v_prediction"}, "pndm",
     {"set_alpha_to_one": False, "skip_prk_steps": True, "variable": "v"}, None),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "linspace"}, "ddim",
     {"clip_x0": 1.0, "set_alpha_to_one": True}, "t - T // steps"),
    ({"_class_name": "KDPM2AncestralDiscreteScheduler"}, "euler_a", {}, "DPM2 ancestral"),
]


@pytest.mark.parametrize("cfg,sampler,options,note", SCHEDULERS,
                         ids=[f"{c['_class_name']}-{s}" for c, s, *_ in SCHEDULERS])
def test_every_scheduler_ldmkit_runs_maps_exactly_or_says_why(cfg, sampler, options, note):
    schedule, d, notes = schedule_from_diffusers(cfg)
    assert (d["sampler"], d["sampler_options"]) == (sampler, options)
    assert bool(notes) == bool(note) and all(note in n and f"runs as {sampler}" in n for n in notes), notes
    back = schedule_to_diffusers(schedule, d["sampler"], d["sampler_options"])  # ldm convert --format diffusers
    assert schedule_from_diffusers(back)[:2] == (schedule, d)
    diffusers = pytest.importorskip("diffusers")  # and diffusers reads the written config as written
    ref = getattr(diffusers.schedulers, back["_class_name"]).from_config(back)
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "solver_order", "algorithm_type",
                "skip_prk_steps", "timestep_spacing"):
        if key in back:
            assert ref.config[key] == back[key], key


def test_scheduler_defaults_are_diffusers_defaults():
    """A config without a field means that class's default in diffusers (Euler's spacing is linspace, Heun's
    betas SD's ...): the table ldmkit reads them from matches diffusers' signatures."""
    import inspect

    from ldmkit.io.diffusers_schedulers import CLASSES

    diffusers = pytest.importorskip("diffusers")
    for cls, (_, defaults, _, _) in CLASSES.items():
        params = inspect.signature(getattr(diffusers.schedulers, cls).__init__).parameters
        for key, value in defaults.items():
            if key in params:
                assert params[key].default == value, f"{cls}.{key}"
    with pytest.raises(ValueError, match="trained_betas"):
        schedule_from_diffusers({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]})


# ----------------------------------------------------------------------------- half precision
def test_half_precision_keeps_the_vae_in_float32(sd):
    _, comps = load_model(sd["sd1"]["folder"], dtype=torch.float16)
    assert next(comps["denoiser"].parameters()).dtype == torch.float16
    assert next(comps["conditioner"].parameters()).dtype == torch.float16
    assert next(comps["autoencoder"].parameters()).dtype == torch.float32  # SD VAE config: force_upcast
    _, comps = load_model(sd["sd1"]["folder"], dtype=torch.float16, upcast_vae=False)
    assert next(comps["autoencoder"].parameters()).dtype == torch.float16
    _, comps = load_model(sd["sd1"]["folder"], dtype=torch.bfloat16)
    assert next(comps["autoencoder"].parameters()).dtype == torch.bfloat16  # bf16 does not overflow


def test_nan_in_half_precision_decode_retries_in_float32(sd):
    from ldmkit.io.precision import decode_checked

    _, comps = load_model(sd["sd1"]["folder"])
    ae = comps["autoencoder"]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    import copy

    rounded = copy.deepcopy(ae).half().float()  # the retry decodes the fp16 model's weights in float32
    with torch.no_grad():
        ref = rounded.decode_latents(z)

    def overflow_in_half(module, inputs, output):  # what SD's VAE does in float16 on bright latents
        if output.dtype == torch.float16:
            return output * float("inf")

    hook = ae.decoder.conv_out.register_forward_hook(overflow_in_half)
    try:
        ae.to(torch.float16)
        with pytest.warns(RuntimeWarning, match="decoding again in float32"):
            x = decode_checked(ae, z)
        assert next(ae.parameters()).dtype == torch.float16  # put back
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        assert (x - ref).abs().max() <= 1e-5
    finally:
        hook.remove()
        ae.to(torch.float32)


def test_clip_vocabulary_and_sidecar_yaml(sd, tmp_path, monkeypatch):
    """Without --tokenizer, CLIP's own BPE vocabulary (clip-anytorch) tokenizes like openai/clip-vit-large."""
    import shutil

    from ldmkit.io.diffusers_format import DiffusersParts, _tokenizer, clip_bpe_files

    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    if clip_bpe_files() is None:
        pytest.skip("clip-anytorch (CLIP's BPE vocabulary) is not installed")
    parts = DiffusersParts({}, {}, {}, {}, {}, {}, None, {}, pad_with_eos=False)
    tok = _tokenizer(parts, 77)
    assert len(tok) == 49408
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 0  # SD 2.x pads with "!"
    # a .yaml next to the checkpoint is read (parameterization: v)
    single = tmp_path / "sd2x.safetensors"
    shutil.copy(sd["sd2"]["single"], single)
    single.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n")
    parts = sf.single_file_to_parts(single, num_head_channels=64)
    assert parts.scheduler_config["prediction_type"] == "v_prediction"


def test_fp16_variant_only_folder_loads(sd, tmp_path):
    """A folder holding only `*.fp16.safetensors` (a common partial download) loads; weights as stored."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "fp16"
    shutil.copytree(sd["sd1"]["folder"], folder)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        w = folder / sub / f"{stem}.safetensors"
        save_file({k: v.half() for k, v in load_file(str(w)).items()}, str(folder / sub / f"{stem}.fp16.safetensors"))
        w.unlink()
    _, comps = load_model(folder, dtype=torch.float16)
    ref = sd["sd1"]["pipe"].unet.state_dict()
    ours = comps["denoiser"].state_dict()
    assert all(torch.equal(ours[k], ref[k].half()) for k in ref)
