"""diffusers' scheduler_config.json <-> ldmkit's schedule + default sampler, both ways.

Reading (``schedule_from_diffusers``): each scheduler class ldmkit implements becomes its sampler with the
config's options -- the sigma kind (``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``
-> ``NAME_karras`` ...), the solver order and type, PNDM's ``skip_prk_steps``, DDIM's ``set_alpha_to_one``,
``clip_sample``, the timestep spacing (each class's own default when the file has none) -- so the folder
runs as diffusers runs it. What ldmkit cannot run exactly comes back as a note, "scheduler X runs as Y:
why", which ``ldm sample`` prints (``scheduler_notes``). Writing (``schedule_to_diffusers``): the scheduler
config of a sampler and its options, for ``ldm convert --format diffusers``.
"""
from __future__ import annotations

from pathlib import Path

from ldmkit.errors import UserError

_SD = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012}  # classes with SD's betas as default
_LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
# class -> (sampler, its defaults for the fields ldmkit reads, takes a sigma kind, applies rescale_betas_zero_snr)
CLASSES = {
    "DDIMScheduler": ("ddim", {**_LINEAR, "timestep_spacing": "leading"}, False, True),
    "DDPMScheduler": ("ddpm", {**_LINEAR, "timestep_spacing": "leading"}, False, True),
    "PNDMScheduler": ("pndm", {**_LINEAR, "timestep_spacing": "leading"}, False, False),
    "EulerDiscreteScheduler": ("euler", {**_LINEAR, "timestep_spacing": "linspace"}, True, True),
    "EulerAncestralDiscreteScheduler": ("euler_a", {**_LINEAR, "timestep_spacing": "linspace"}, False, True),
    "HeunDiscreteScheduler": ("heun", {**_SD, "timestep_spacing": "linspace"}, True, False),
    "LMSDiscreteScheduler": ("lms", {**_LINEAR, "timestep_spacing": "linspace"}, True, False),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", {**_LINEAR, "timestep_spacing": "linspace"}, True, True),
    "DPMSolverSDEScheduler": ("dpmpp_sde", {**_SD, "timestep_spacing": "linspace"}, True, False),
    "UniPCMultistepScheduler": ("unipc", {**_LINEAR, "timestep_spacing": "linspace"}, True, True),
    "DEISMultistepScheduler": ("deis", {**_LINEAR, "timestep_spacing": "linspace"}, True, False),
    "LCMScheduler": ("lcm", {**_SD, "beta_schedule": "scaled_linear", "timestep_spacing": "leading"}, False, True),
    # no ldmkit counterpart: the nearest sampler, always with a note
    "DPMSolverSinglestepScheduler": ("dpmpp_2m", {**_LINEAR, "timestep_spacing": "linspace"}, True, False),
    "KDPM2DiscreteScheduler": ("heun", {**_SD, "timestep_spacing": "linspace"}, True, False),
    "KDPM2AncestralDiscreteScheduler": ("euler_a", {**_SD, "timestep_spacing": "linspace"}, True, False),
}
NEAREST = {"DPMSolverSinglestepScheduler": "single-step DPM-Solver is not implemented; multistep DPM-Solver++ "
                                           "of the same order is the nearest",
           "KDPM2DiscreteScheduler": "DPM2 is not implemented; Heun is the nearest second-order sampler",
           "KDPM2AncestralDiscreteScheduler": "DPM2 ancestral is not implemented; Euler ancestral is the nearest"}
SAMPLER_OF_SCHEDULER = {cls: row[0] for cls, row in CLASSES.items()}
SCHEDULER_OF_SAMPLER = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_3m_sde": "DPMSolverMultistepScheduler", "dpmpp_sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler", "deis": "DEISMultistepScheduler", "lcm": "LCMScheduler",
}
_KIND_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}
_BOOLS = ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "skip_prk_steps", "lower_order_final",
          "predict_x0", "thresholding", "euler_at_final", "use_lu_lambdas", "use_flow_sigmas") + tuple(_KIND_FLAGS)


def _check(cfg: dict) -> None:
    from ldmkit.errors import check_int, check_str

    for name in _BOOLS:
        if cfg.get(name) is not None and not isinstance(cfg[name], bool):
            raise UserError(f"scheduler config: {name}={cfg[name]!r} must be true or false")
    check_int("solver_order", cfg.get("solver_order"), 1, 3, optional=True)
    check_int("original_inference_steps", cfg.get("original_inference_steps"), 1, 1 << 20, optional=True)
    for name in ("algorithm_type", "solver_type", "final_sigmas_type", "interpolation_type", "timestep_type",
                 "variance_type"):
        check_str(name, cfg.get(name), optional=True)
    corr = cfg.get("disable_corrector")
    if corr is not None and not (isinstance(corr, list) and all(isinstance(i, int) for i in corr)):
        raise UserError(f"scheduler config: disable_corrector={corr!r} must be a list of step indices")
    if sum(bool(cfg.get(flag)) for flag in _KIND_FLAGS) > 1:
        raise UserError(f"scheduler config: at most one of {', '.join(_KIND_FLAGS)} may be true")


def schedule_from_diffusers(cfg: dict) -> tuple[dict, dict, list[str]]:
    """diffusers scheduler_config.json -> (our DiscreteSchedule dict, sampler defaults, notes)."""
    from ldmkit.diffusion.samplers import with_sigmas
    from ldmkit.diffusion.schedules import DiscreteSchedule, prediction_name

    if cfg.get("trained_betas") is not None:
        raise ValueError("scheduler config with explicit trained_betas is not supported")
    cls = cfg.get("_class_name", "DDIMScheduler")
    if cls not in CLASSES:
        raise ValueError(f"diffusers scheduler {cls!r} is not supported; known: {sorted(CLASSES)}")
    _check(cfg)
    base, defaults, kinds, ztsnr = CLASSES[cls]
    get = lambda key: cfg[key] if cfg.get(key) is not None else defaults[key]  # noqa: E731
    notes = [f"scheduler {cls} runs as {{sampler}}: {NEAREST[cls]}"] if cls in NEAREST else []
    rescale = bool(cfg.get("rescale_betas_zero_snr", False))
    if rescale and not ztsnr:
        notes.append(f"rescale_betas_zero_snr is ignored, as diffusers' {cls} ignores it")
    schedule = DiscreteSchedule(
        beta_schedule=get("beta_schedule"), num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        beta_start=float(get("beta_start")), beta_end=float(get("beta_end")),
        rescale_zero_terminal_snr=rescale and ztsnr, timestep_spacing=get("timestep_spacing"),
        steps_offset=int(cfg.get("steps_offset", 0)),
    ).to_dict()
    schedule["prediction_type"] = prediction_name(cfg.get("prediction_type", "epsilon"))  # read by prediction_of
    sampler, options, why = _sampler_of(cls, base, cfg, schedule)
    kind = next((k for flag, k in _KIND_FLAGS.items() if cfg.get(flag)), None)
    if kind and not kinds:
        notes.append(f"{next(f for f, k in _KIND_FLAGS.items() if k == kind)} is ignored, as diffusers' {cls} "
                     "ignores it")
    elif kind:
        sampler = with_sigmas(sampler, kind)
        if kind != "karras" and base in ("dpmpp_2m", "unipc", "deis"):
            notes.append(f"scheduler {cls} runs as {{sampler}}: diffusers casts the first {kind} timestep to an "
                         "integer after float32 round-off (T - 2 for SD's betas); ldmkit uses the level's own, "
                         "T - 1 (~1e-4 latent difference)")
    notes += [f"scheduler {cls} runs as {{sampler}}: {w}" for w in why]
    return schedule, {"sampler": sampler, "sampler_options": options}, [n.format(sampler=sampler) for n in notes]


def _sampler_of(cls: str, sampler: str, cfg: dict, schedule: dict) -> tuple[str, dict, list[str]]:
    """The sampler, its options and what differs from diffusers, for one class's own config fields."""
    options, why = {}, []
    clip_default = cls in ("DDIMScheduler", "DDPMScheduler")
    if cls in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "HeunDiscreteScheduler") \
            and cfg.get("clip_sample", clip_default):
        options["clip_x0"] = float(cfg.get("clip_sample_range", 1.0))
    if cfg.get("thresholding"):
        why.append("dynamic thresholding (thresholding=true) is not implemented; x0 is not thresholded")
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        options["set_alpha_to_one"] = bool(cfg.get("set_alpha_to_one", cls == "DDIMScheduler"))
        if schedule["timestep_spacing"] != "leading":
            why.append(f"with {schedule['timestep_spacing']!r} spacing diffusers steps from t to t - T // steps, "
                       "off its own grid unless T is a multiple of steps; ldmkit steps along the grid")
    if cls == "PNDMScheduler":
        options["skip_prk_steps"] = bool(cfg.get("skip_prk_steps", False))
        if schedule["prediction_type"] == "v":  # diffusers extrapolates a v-prediction model's raw output
            options["variable"] = "v"
    if cls == "DDPMScheduler" and cfg.get("variance_type", "fixed_small") != "fixed_small":
        why.append(f"variance_type {cfg['variance_type']!r} is not implemented; the posterior's fixed small "
                   "variance is used")
    if cls == "EulerDiscreteScheduler":
        if cfg.get("interpolation_type", "linear") != "linear":
            why.append(f"interpolation_type {cfg['interpolation_type']!r}: sigmas are interpolated linearly")
        if cfg.get("timestep_type", "discrete") != "discrete":
            why.append(f"timestep_type {cfg['timestep_type']!r}: the network sees discrete timesteps")
    if cfg.get("final_sigmas_type", "zero") != "zero" and cls != "DEISMultistepScheduler":
        why.append(f"final_sigmas_type {cfg['final_sigmas_type']!r}: the last step goes to sigma 0")
    if cfg.get("sigma_min") is not None or cfg.get("sigma_max") is not None:
        why.append("sigma_min / sigma_max are not used: the sigmas span the schedule's own range")
    if cfg.get("use_flow_sigmas") or cfg.get("use_lu_lambdas") or cfg.get("euler_at_final"):
        why.append("use_flow_sigmas / use_lu_lambdas / euler_at_final are not implemented")
    if cls in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"):
        sampler = _dpm_solver(cls, cfg, options, why)
    if cls == "UniPCMultistepScheduler":
        options.update(solver_order=int(cfg.get("solver_order", 2)), solver_type=cfg.get("solver_type", "bh2"),
                       lower_order_final=bool(cfg.get("lower_order_final", True)))
        if options["solver_type"] not in ("bh1", "bh2"):  # diffusers reads its DPM-Solver names as bh2
            options["solver_type"] = "bh2"
        if cfg.get("disable_corrector"):
            options["disable_corrector"] = list(cfg["disable_corrector"])
        if cfg.get("predict_x0") is False:
            why.append("predict_x0=false (UniPC on eps) is not implemented; it predicts x0")
    if cls == "DEISMultistepScheduler":
        options.update(solver_order=int(cfg.get("solver_order", 2)),
                       lower_order_final=bool(cfg.get("lower_order_final", True)))
    if cls == "LCMScheduler":
        options["original_inference_steps"] = int(cfg.get("original_inference_steps", 50))
    if cls == "DPMSolverSDEScheduler" and cfg.get("noise_sampler_seed") is not None:
        why.append("noise_sampler_seed is not used: the Brownian noise comes from each image's seed")
    return sampler, options, why


def _dpm_solver(cls: str, cfg: dict, options: dict, why: list) -> str:
    order, algorithm = int(cfg.get("solver_order", 2)), cfg.get("algorithm_type", "dpmsolver++")
    solver_type = cfg.get("solver_type", "midpoint")
    solver_type = solver_type if solver_type in ("midpoint", "heun") else "midpoint"  # as diffusers reads it
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        why.append(f"algorithm_type {algorithm!r} (noise prediction) is not implemented; its data-prediction "
                   "form (DPM-Solver++) runs")
    if cfg.get("lambda_min_clipped", float("-inf")) not in (None, float("-inf")):
        why.append("lambda_min_clipped is not used")
    if cfg.get("variance_type") is not None:
        why.append(f"variance_type {cfg['variance_type']!r} is not used")
    if algorithm.startswith("sde"):
        if order >= 3:
            why.append("diffusers' third-order SDE update carries its D2 term with the wrong sign (an O(1) "
                       "weight where the exact one is O(h)); k-diffusion's DPM++ 3M SDE runs")
            return "dpmpp_3m_sde"
        options["solver_type"] = solver_type
        if order == 1:
            why.append("first-order SDE DPM-Solver is not implemented; the 2M SDE runs")
        return "dpmpp_2m_sde"
    if order != 2:
        why.append(f"solver_order {order} is not implemented for the ODE solver; DPM++ 2M runs")
    if solver_type == "heun":
        why.append("solver_type 'heun' is not implemented for DPM++ 2M; the midpoint form runs")
    return "dpmpp_2m"


def scheduler_notes(path) -> list[str]:
    """The notes of a diffusers folder's scheduler ([] for other models): what runs instead of it and why.
    A folder ldmkit wrote names its sampler under "_ldmkit" in model_index.json; that sampler runs."""
    from ldmkit.io.files import read_json

    root = Path(path)
    config = root / "scheduler" / "scheduler_config.json"
    if not root.is_dir() or not config.is_file():
        return []
    cfg = read_json(config)
    _, defaults, notes = schedule_from_diffusers(cfg)
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    written = ((index.get("_ldmkit") or {}).get("defaults") or {}).get("sampler") if isinstance(index, dict) else None
    if written and written != defaults["sampler"]:
        return [f"scheduler {cfg.get('_class_name', 'DDIMScheduler')} runs as {written}: the sampler ldmkit wrote "
                "into model_index.json (_ldmkit.defaults)"]
    return notes


def schedule_to_diffusers(schedule: dict, sampler: str = "ddim", options: dict | None = None,
                          prediction: str | None = None) -> dict:
    """The scheduler_config.json of our schedule and a sampler with its options (the class diffusers runs
    it with; a sampler it has none for is written as DDIM)."""
    from ldmkit.diffusion.samplers import SAMPLERS, base_name
    from ldmkit.diffusion.schedules import prediction_of

    options = options or {}
    base = base_name(sampler) if sampler in SAMPLERS else sampler
    kind = SAMPLERS[sampler].sigmas if sampler in SAMPLERS else None
    cls = SCHEDULER_OF_SAMPLER.get(base, "DDIMScheduler")
    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction or prediction_of(schedule, "eps")]
    beta = {"cosine": "squaredcos_cap_v2"}.get(schedule["beta_schedule"], schedule["beta_schedule"])
    out = {
        "_class_name": cls, "num_train_timesteps": schedule["num_train_timesteps"],
        "beta_start": schedule["beta_start"], "beta_end": schedule["beta_end"], "beta_schedule": beta,
        "prediction_type": pred, "timestep_spacing": schedule["timestep_spacing"],
        "steps_offset": schedule["steps_offset"], "rescale_betas_zero_snr": schedule["rescale_zero_terminal_snr"],
        "trained_betas": None,
    }
    clip = options.get("clip_x0")
    if cls in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "HeunDiscreteScheduler"):
        out.update(clip_sample=clip is not None, clip_sample_range=float(clip if clip is not None else 1.0))
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        out["set_alpha_to_one"] = bool(options.get("set_alpha_to_one", cls == "DDIMScheduler"))
    if cls == "PNDMScheduler":
        out["skip_prk_steps"] = bool(options.get("skip_prk_steps", True))
    if cls == "DPMSolverMultistepScheduler":
        sde = base != "dpmpp_2m"
        out.update(algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_order=3 if base == "dpmpp_3m_sde"
                   else 2, solver_type="heun" if base == "dpmpp_3m_sde" else options.get("solver_type", "midpoint"))
        if base == "dpmpp_3m_sde":
            out["lower_order_final"] = False  # k-diffusion's form has none (the last step is x0 either way)
    if cls == "UniPCMultistepScheduler":
        out.update(solver_order=options.get("solver_order", 2), solver_type=options.get("solver_type", "bh2"),
                   lower_order_final=options.get("lower_order_final", True), predict_x0=True,
                   disable_corrector=list(options.get("disable_corrector", [])))
    if cls == "DEISMultistepScheduler":
        out.update(solver_order=options.get("solver_order", 2),
                   lower_order_final=options.get("lower_order_final", True))
    if cls == "LCMScheduler":
        out["original_inference_steps"] = options.get("original_inference_steps", 50)
    if CLASSES[cls][2]:
        out.update({flag: kind == k for flag, k in _KIND_FLAGS.items()})
    return out
