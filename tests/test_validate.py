"""validate_config: every shipped config passes; each bad field fails on one line that names it."""

import importlib
import inspect
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import default
from ddpm_bs import evaluation, sampling, timesteps, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8  # conftest's fake CPU devices


def _takes_base(name: str) -> bool:
    module = importlib.import_module(f"configs.{name}")
    return "base" in inspect.signature(module.get_config).parameters


_NAMES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
_BASES = [n for n in _NAMES if not _takes_base(n)]
# Every config file, and every `configs/<variant>.py:<base>` a variant can be launched with.
CONFIG_SPECS = [
    f"{n}:{base}" if _takes_base(n) else n
    for n in _NAMES
    for base in (_BASES if _takes_base(n) else [None])
]


def _load(spec: str) -> ml_collections.ConfigDict:
    name, _, base = spec.partition(":")
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(base) if base else module.get_config()


def _digits() -> ml_collections.ConfigDict:
    return importlib.import_module("configs.digits").get_config()


def _set(config: ml_collections.ConfigDict, path: str, value) -> None:
    """Sets a dotted field, bypassing ConfigDict's type safety (a config file can do worse)."""
    *sections, field = path.split(".")
    node = config
    for section in sections:
        node = node[section]
    with node.ignore_type():
        node[field] = value


def _error(config, *, mode="train", num_devices=None) -> validate.ConfigError:
    with pytest.raises(validate.ConfigError) as info:
        validate.validate_config(config, num_devices=num_devices, mode=mode)
    return info.value


def _assert_one_line_naming(error: validate.ConfigError, path: str) -> str:
    message = str(error)
    assert "\n" not in message and "\r" not in message
    assert path in message, message
    assert message.startswith(error.path), (error.path, message)
    assert isinstance(error, ValueError)
    return message


# --- Every shipped config is valid ----------------------------------------------------------


@pytest.mark.parametrize("spec", CONFIG_SPECS)
def test_every_shipped_config_validates_in_every_mode(spec):
    config = _load(spec)
    for mode in ("sample", "eval"):  # these never read the data source: valid as shipped
        validate.validate_config(config, num_devices=NUM_DEVICES, mode=mode)
    if config.data.name == "folder":  # the launch command in the file's docstring sets it
        config.data.folder = "/data/images"
    for mode in validate.MODES:
        for num_devices in (None, 1, NUM_DEVICES):
            validate.validate_config(config, num_devices=num_devices, mode=mode)


def test_folder_configs_need_data_folder_to_train_but_not_to_sample():
    config = _load("ffhq128")
    message = _assert_one_line_naming(_error(config), "data.folder")
    assert "data.name='folder'" in message
    validate.validate_config(config, num_devices=NUM_DEVICES, mode="sample")


def test_t_delta_auto_is_valid_and_brings_in_the_interval_section():
    config = _digits()
    _set(config, "timesteps.t_delta", "auto")
    validate.validate_config(config, num_devices=NUM_DEVICES)
    _set(config, "interval.num_t", 1)  # only read because training locates t_δ first
    _assert_one_line_naming(_error(config), "interval.num_t")
    _set(config, "timesteps.t_delta", 800)
    validate.validate_config(config, num_devices=NUM_DEVICES)


# --- Bad fields: one line, the dotted field, the valid values -------------------------------


def case(path, value, *valid, mode="train", num_devices=None, setup=None):
    """A bad override of configs/digits.py; `valid`: strings the message must list."""
    setup = setup or {}
    extra = ",".join(f"{k}={v!r}" for k, v in setup.items())
    case_id = f"{path}={value!r}" + (f"[{extra}]" if extra else "") + f"@{mode}"
    return pytest.param(path, value, valid, mode, num_devices, setup, id=case_id)


BAD = [
    # seed, data
    case("seed", -1),
    case("seed", 2**32, "4294967295"),
    case("data.name", ""),
    case("data.image_size", 0),
    case("data.image_size", 9),  # 2 levels: must be even
    case("data.channels", 2, "1", "3"),
    case("data.split", "test"),
    case("data.folder", "/images"),  # set while data.name='digits'
    case("data.on_corrupt", "retry", "skip", "halt"),
    case("data.class_conditional", True),
    # model
    case("model.model_channels", 0),
    case("model.model_channels", 48, "32"),
    case("model.channel_mult", ()),
    case("model.channel_mult", (1, -2)),
    case("model.num_res_blocks", 0),
    case("model.attention_resolutions", (3,), "8", "4"),
    case("model.num_heads", 0),
    case("model.num_heads", 3),
    case("model.num_head_channels", 0),
    case("model.num_head_channels", 24),
    case("model.dropout", 1.0),
    case("model.dtype", "float16", "float32", "bfloat16"),
    case("model.attention_implementation", "flash", "None", "xla", "cudnn"),
    case("model.attention_implementation", "cudnn", "bfloat16"),
    case("model.num_classes", -1),
    case("model.num_classes", 10),  # without data.class_conditional
    case("model.learn_sigma", "yes"),
    # diffusion
    case("diffusion.schedule", "quadratic", "linear", "cosine"),
    case("diffusion.num_timesteps", 1),
    case("diffusion.num_timesteps", 20, "21", setup={"diffusion.schedule": "linear"}),
    # timesteps
    case("timesteps.sampler", "gaussian", *timesteps.SAMPLERS),
    case("timesteps.t_delta", 0, "auto"),
    case("timesteps.t_delta", 1001, "auto", "1000"),
    case("timesteps.t_delta", "late", "auto"),
    case("timesteps.p", 1.5),
    case("timesteps.boundaries", (1200,), setup={"timesteps.sampler": "piecewise"}),
    case("timesteps.masses", (0.5, 0.4), setup={"timesteps.sampler": "piecewise"}),
    case("timesteps.beta_b", 0.0, setup={"timesteps.sampler": "beta"}),
    case("timesteps.p_std", -1.0, setup={"timesteps.sampler": "lognormal"}),
    case("timesteps.logit_std", 0.0, setup={"timesteps.sampler": "logit_normal"}),
    case("timesteps.history", 0, setup={"timesteps.sampler": "loss_aware"}),
    case("timesteps.uniform_prob", 2.0, setup={"timesteps.sampler": "loss_aware"}),
    case("timesteps.importance_weighting", "yes"),
    # loss
    case("loss.target", "score", "eps", "x0", "v"),
    case("loss.weighting", "snr", "none", "p2", "min_snr", "debias"),
    case("loss.p2_k", -1.0),
    case("loss.min_snr_gamma", 0.0),
    case("loss.max_weight", 0.0),
    # optim
    case("optim.lr", -1.0),
    case("optim.lr", 0.0),
    case("optim.lr", float("nan")),
    case("optim.warmup_steps", -1),
    case("optim.weight_decay", -0.1),
    case("optim.b1", 1.0),
    case("optim.b2", -0.1),
    case("optim.eps", 0.0),
    case("optim.grad_clip", -1.0),
    # train
    case("train.batch_size", 0),
    case("train.batch_size", True),
    case("train.grad_accum_steps", 0),
    case("train.grad_accum_steps", 3, "64"),
    case("train.num_steps", 0),
    case("train.ema_rates", ()),
    case("train.ema_rates", (0.999, 1.0)),
    case("train.log_every", -1),
    case("train.checkpoint_every", -5),
    case("train.sample_every", -1),
    case("train.keep_checkpoints", 0),
    case("train.num_samples", 0),
    case("train.sample_steps", 0),
    case("train.sample_steps", 1001, "1000"),
    case("train.on_nonfinite", "ignore", "skip", "halt"),
    case("train.eval_every", -1),
    case("train.eval_samples", 1),
    # sample, metric
    case("sample.method", "euler", *sampling.METHODS, mode="sample"),
    case("sample.steps", 0, mode="sample"),
    case("sample.steps", 1001, "1000", mode="sample"),
    case("sample.steps", 1, "2", mode="sample", setup={"sample.method": "dpm_solver"}),
    case("sample.num_samples", 0, mode="sample"),
    case("sample.batch_size", 0, mode="sample"),
    case("sample.eta", -0.5, mode="sample"),
    case("sample.skip_type", "uniform", *sampling.SKIP_TYPES, mode="sample"),
    case("sample.eps_scale_b", 0.0, mode="sample"),
    case("sample.metric", "fid50k", *evaluation.METRICS, mode="eval"),
    case("sample.metric", "digits_fid,fid50k", *evaluation.METRICS, mode="eval"),
    case("sample.inception_weights", 3, mode="eval"),
    # mesh
    case("mesh.data", 0),
    case("mesh.data", -2),
    case("mesh.data", 9, "8", num_devices=NUM_DEVICES),
    case("mesh.fsdp", 3, "8", num_devices=NUM_DEVICES),
    case("mesh.fsdp", -1, setup={"mesh.data": -1}),
    case("mesh.fsdp", 3, "1, 2, 4, 8", num_devices=NUM_DEVICES, setup={"mesh.data": 2}),
    # interval (mode=locate)
    case("interval.num_t", 1, mode="locate"),
    case("interval.estimator", "exact", "debiased_baseline", "naive", mode="locate"),
    case("interval.set_b", "class:0", mode="locate"),  # the same set as set_a
    # unknown fields (typos in a config file; ml_collections refuses them only on the CLI)
    case("train.batchsize", 64, "train.batch_size"),
    case("model.channel_multiplier", (1, 2), "model.channel_mult"),
    case("trian", 1, "train"),
]


@pytest.mark.parametrize(("path", "value", "valid", "mode", "num_devices", "setup"), BAD)
def test_bad_field_is_one_line_naming_it(path, value, valid, mode, num_devices, setup):
    config = _digits()
    for setup_path, setup_value in setup.items():
        _set(config, setup_path, setup_value)
    validate.validate_config(config, num_devices=num_devices, mode=mode)  # good before
    _set(config, path, value)
    message = _assert_one_line_naming(_error(config, mode=mode, num_devices=num_devices), path)
    for v in valid:
        assert v in message, (v, message)


def test_there_are_at_least_thirty_bad_cases():
    assert len(BAD) >= 30


@pytest.mark.parametrize("metric", ["digits_fid", "digits_fid, digits_fid", ("digits_fid",)])
def test_metric_is_one_name_or_a_comma_separated_list(metric):
    config = _digits()
    _set(config, "sample.metric", metric)
    validate.validate_config(config, mode="eval")


@pytest.mark.skipif(
    not {"fid", "sfid"} <= set(getattr(evaluation, "REFERENCE_METRICS", ())),
    reason="needs evaluation's Inception metrics",
)
def test_inception_metrics_need_their_weights_and_reference_statistics():
    config = _digits()
    _set(config, "sample.metric", "digits_fid,fid")
    message = _assert_one_line_naming(_error(config, mode="eval"), "sample.inception_weights")
    assert "fid" in message
    _set(config, "sample.inception_weights", "inception_fid.npz")
    _assert_one_line_naming(_error(config, mode="eval"), "sample.reference_stats")
    _set(config, "sample.reference_stats", "cifar10_reference.npz")
    validate.validate_config(config, mode="eval")


def test_batch_must_split_evenly_over_eight_devices():
    config = _digits()
    config.train.batch_size = 60
    validate.validate_config(config)  # unknown device count: not checked
    validate.validate_config(config, num_devices=4)
    message = _assert_one_line_naming(_error(config, num_devices=8), "train.batch_size")
    assert "60" in message and "56" in message and "64" in message  # the nearest good sizes
    config.train.batch_size = 64
    config.train.grad_accum_steps = 2
    validate.validate_config(config, num_devices=8)
    config.train.grad_accum_steps = 4  # 8 devices × 4 micro-batches = 32 divides 64
    validate.validate_config(config, num_devices=8)
    config.train.batch_size = 48  # 48 / 4 = 12 per micro-batch, not a multiple of 8
    message = _assert_one_line_naming(_error(config, num_devices=8), "train.batch_size")
    assert "train.grad_accum_steps=4" in message and "32" in message


def test_batch_splits_over_data_times_fsdp():
    config = _digits()
    config.train.batch_size = 4
    _set(config, "mesh.data", 2)
    _set(config, "mesh.fsdp", 2)
    validate.validate_config(config, num_devices=NUM_DEVICES)
    _set(config, "mesh.fsdp", 4)  # 2 × 4 = 8 shards > 4 examples
    _assert_one_line_naming(_error(config, num_devices=NUM_DEVICES), "train.batch_size")


# --- Each mode checks only what it uses -----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "ignored", "checked"),
    [
        ("train", {"sample.eta": -1.0, "sample.method": "x"}, "optim.lr"),
        ("sample", {"optim.lr": -1.0, "train.num_steps": 0, "data.split": "test"}, "sample.eta"),
        ("eval", {"model.num_heads": 0, "sample.eta": -1.0}, "sample.metric"),
        ("locate", {"model.num_heads": 0, "loss.target": "x"}, "interval.num_t"),
        ("geometry", {"optim.lr": -1.0, "sample.method": "x"}, "model.num_heads"),
    ],
)
def test_a_mode_ignores_the_sections_it_does_not_use(mode, ignored, checked):
    config = _digits()
    for path, value in ignored.items():
        _set(config, path, value)
    validate.validate_config(config, num_devices=NUM_DEVICES, mode=mode)
    bad = {
        "optim.lr": -1.0,
        "sample.eta": -1.0,
        "sample.metric": "x",
        "interval.num_t": 1,
        "model.num_heads": 0,
    }
    _set(config, checked, bad[checked])
    _assert_one_line_naming(_error(config, mode=mode, num_devices=NUM_DEVICES), checked)


def test_unknown_fields_are_refused_in_every_mode():
    config = _digits()
    _set(config, "optim.learning_rate", 1e-3)
    for mode in validate.MODES:
        message = _assert_one_line_naming(_error(config, mode=mode), "optim.learning_rate")
        assert "optim.lr" in message


def test_missing_field_and_section_are_named():
    config = _digits()
    del config.train["ema_rates"]
    _assert_one_line_naming(_error(config), "train.ema_rates")
    config = _digits()
    del config["optim"]
    _assert_one_line_naming(_error(config), "optim")
    validate.validate_config(config, mode="sample")  # sampling does not read optim


def test_optional_new_fields_may_be_absent():
    config = _digits()
    for path in ("mesh.fsdp", "train.on_nonfinite", "data.on_corrupt"):
        section, field = path.split(".")
        if field in config[section]:
            del config[section][field]
    for mode in validate.MODES:
        validate.validate_config(config, num_devices=NUM_DEVICES, mode=mode)


def test_mode_and_num_devices_arguments_are_checked():
    with pytest.raises(ValueError, match="mode='fit'"):
        validate.validate_config(_digits(), mode="fit")
    with pytest.raises(ValueError, match="num_devices"):
        validate.validate_config(_digits(), num_devices=0)


def test_default_config_and_the_specs_hold_the_same_fields():
    """configs/default.py and the specs that read each section agree in both directions.

    A field added to default.py but read by no spec fails here (nothing would check it), and so
    does a spec field default.py lacks (it could not be set from the command line).
    """
    config = default.get_config()
    sections = {key for key, node in config.items() if isinstance(node, ml_collections.ConfigDict)}
    assert sections == set(validate.SECTION_FIELDS)
    assert set(config.keys()) - sections == {"seed"}
    for section, spec_fields in validate.SECTION_FIELDS.items():
        in_default, in_specs = set(config[section].keys()), set(spec_fields())
        assert in_default == in_specs, (
            section,
            f"only in configs/default.py: {sorted(in_default - in_specs)}",
            f"only in the specs: {sorted(in_specs - in_default)}",
        )


# --- Cost: pure Python, nothing traced or compiled ------------------------------------------


def test_validation_traces_and_compiles_nothing():
    events = []

    def on_duration(event, *args, **kwargs):
        events.append(event)

    def on_event(event, *args, **kwargs):
        events.append(event)

    config = _digits()
    _set(config, "timesteps.t_delta", "auto")  # brings in the interval section too
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        for mode in validate.MODES:
            validate.validate_config(config, num_devices=NUM_DEVICES, mode=mode)
        during = [e for e in events if e.startswith("/jax/core/compile")]
        jax.jit(lambda x: x * 3 + 1)(1.0)  # control: the listeners do see a compile
        control = [e for e in events if e.startswith("/jax/core/compile")]
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
    assert during == [], during
    assert control, "the monitoring listeners saw no compile at all"


# --- The command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--config.optim.lr=-1", "optim.lr"),
        ("--config.train.num_stepz=1", "--config.train.num_stepz: the config has no field "
         "'num_stepz'; did you mean 'num_steps'?"),
        ("--config.trian.num_steps=1", "no field 'trian'; did you mean 'train'?"),
    ],
)  # fmt: skip
def test_cli_refuses_a_bad_config_on_one_line_before_touching_the_workdir(tmp_path, flag, expected):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm_bs.main",
            "--config=configs/digits.py",
            f"--workdir={workdir}",
            flag,
            "--config.train.num_steps=1",  # bounds the run if validation is not wired
        ],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("ddpm-bs:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
