"""OpenAI guided-diffusion / improved-diffusion checkpoints as `ddpm_bs.models.unet.UNet` params.

The released ADM models (guided-diffusion's `64x64_diffusion.pt`, `256x256_diffusion_uncond.pt`,
the LSUN models, …; improved-diffusion's CIFAR-10 and ImageNet-64 models) are PyTorch
`state_dict`s of `UNetModel`. Our `UNet` has the same layers in the same order, so a
checkpoint converts by renaming and re-laying out each tensor:

  Conv2d weight [O, I, kh, kw]          -> Conv kernel [kh, kw, I, O]   (OIHW -> HWIO)
  Linear weight [O, I]                  -> Dense kernel [I, O]
  Conv1d weight [O, I, 1] (attention)   -> Dense kernel [I, O]          (qkv, proj_out)
  GroupNorm weight, bias                -> scale, bias
  Embedding weight [classes, E]         -> embedding [classes, E]

The qkv channel order (legacy: head-major; new: q/k/v-major) is the same in both frameworks
(see `layers.AttentionBlock`), so qkv needs no permutation; the checkpoint does not record
which order it was trained with, so `use_new_attention_order` must be set from its flags.
Nor does it record the number of heads or the timestep scaling (widths, depth, conditioning
and scale-shift norm show in the shapes, which are checked): take the model's flags from the
README of the repository that released it and pass them through `unet_kwargs_from_flags`
(`config_overrides_from_flags` for a config).

    python -m ddpm_bs.models.guided_diffusion --pt=64x64_diffusion.pt \
        --flags="--attention_resolutions 32,16,8 --class_cond True ..." --out=adm64.npz

writes the parameters as a flat .npz (keys like `down0_res0/conv_in/kernel`), readable with
`load_params`; with `--config=... --workdir=...` instead of `--out` it writes a step-0
training checkpoint, which `--mode=sample` samples from and `--mode=train` fine-tunes.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np
from flax import traverse_util

from ddpm_bs.models import unet

# guided-diffusion's script_util.model_and_diffusion_defaults (the flags a model reads).
# improved-diffusion's differ only in rescale_timesteps=True (see `config_overrides_from_flags`).
GUIDED_DIFFUSION_DEFAULTS = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
# improved-diffusion's: rescale_timesteps and rescale_learned_sigmas on (its models then see
# t·1000/diffusion_steps), and sigma_small (the fixed variance when σ is not learned).
IMPROVED_DIFFUSION_DEFAULTS = {
    **GUIDED_DIFFUSION_DEFAULTS,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "sigma_small": False,
}
NUM_CLASSES = 1000  # script_util.NUM_CLASSES: class_cond models are ImageNet's.

# Torch submodule -> (our submodule, layer kind), per block type.
_RES_BLOCK = (
    ("in_layers.0", "norm_in", "norm"),
    ("in_layers.2", "conv_in", "conv"),
    ("emb_layers.1", "emb_proj", "linear"),
    ("out_layers.0", "norm_out", "norm"),
    ("out_layers.3", "conv_out", "conv"),
    ("skip_connection", "skip", "conv"),
)
_ATTENTION_BLOCK = (
    ("norm", "norm", "norm"),
    ("qkv", "qkv", "conv1d"),
    ("proj_out", "proj_out", "conv1d"),
)
_RESAMPLE = {"down": (("op", "conv", "conv"),), "up": (("conv", "conv", "conv"),)}
# Torch parameter -> (our parameter, re-layout), per layer kind.
_LEAVES = {
    "conv": (("weight", "kernel", (2, 3, 1, 0)), ("bias", "bias", None)),
    "linear": (("weight", "kernel", (1, 0)), ("bias", "bias", None)),
    "conv1d": (("weight", "kernel", "conv1d"), ("bias", "bias", None)),
    "norm": (("weight", "scale", None), ("bias", "bias", None)),
    "embed": (("weight", "embedding", None),),
}


def _layers(model: unet.UNet) -> list[tuple[str, str, str]]:
    """(torch module, our module path, kind) for every layer of `model`, in UNetModel's order.

    Kinds: the layer kinds of `_LEAVES`, or 'res', 'attn', 'down', 'up' (blocks). Mirrors the
    loops of `UNet.__call__` and guided-diffusion's `UNetModel.__init__` side by side: the
    torch index k counts TimestepEmbedSequential blocks, ours names level and position.
    """
    channel_mult = model.resolved_channel_mult
    attention_ds = {model.image_size // r for r in model.attention_resolutions}
    resample = "res" if model.resblock_updown else None
    out = [
        ("time_embed.0", "time_embed/dense_0", "linear"),
        ("time_embed.2", "time_embed/dense_1", "linear"),
        ("input_blocks.0.0", "in_conv", "conv"),
    ]
    if model.num_classes is not None:
        out.append(("label_emb", "label_embed", "embed"))
    k, ds = 1, 1
    for level in range(len(channel_mult)):
        for i in range(model.num_res_blocks):
            out.append((f"input_blocks.{k}.0", f"down{level}_res{i}", "res"))
            if ds in attention_ds:
                out.append((f"input_blocks.{k}.1", f"down{level}_attn{i}", "attn"))
            k += 1
        if level != len(channel_mult) - 1:
            out.append((f"input_blocks.{k}.0", f"down{level}_resample", resample or "down"))
            k, ds = k + 1, ds * 2
    out += [
        ("middle_block.0", "mid_res0", "res"),
        ("middle_block.1", "mid_attn", "attn"),
        ("middle_block.2", "mid_res1", "res"),
    ]
    k = 0
    for level in reversed(range(len(channel_mult))):
        for i in range(model.num_res_blocks + 1):
            j = 0
            out.append((f"output_blocks.{k}.{j}", f"up{level}_res{i}", "res"))
            if ds in attention_ds:
                j += 1
                out.append((f"output_blocks.{k}.{j}", f"up{level}_attn{i}", "attn"))
            if level and i == model.num_res_blocks:
                j += 1
                out.append((f"output_blocks.{k}.{j}", f"up{level}_resample", resample or "up"))
                ds //= 2
            k += 1
    out += [("out.0", "out_norm", "norm"), ("out.2", "out_conv", "conv")]
    return out


def _leaf_map(model: unet.UNet) -> dict[str, tuple[str, Any]]:
    """Torch state_dict key -> (our 'a/b/kernel' path, re-layout) for every possible param."""
    blocks = {"res": _RES_BLOCK, "attn": _ATTENTION_BLOCK, **_RESAMPLE}
    out = {}
    for torch_name, ours, kind in _layers(model):
        for sub_torch, sub_ours, sub_kind in blocks.get(kind, (("", "", kind),)):
            t = f"{torch_name}.{sub_torch}" if sub_torch else torch_name
            o = f"{ours}/{sub_ours}" if sub_ours else ours
            for leaf_torch, leaf_ours, layout in _LEAVES[sub_kind]:
                out[f"{t}.{leaf_torch}"] = (f"{o}/{leaf_ours}", layout)
    return out


def _relayout(value: np.ndarray, layout: Any) -> np.ndarray:
    if layout == "conv1d":
        return value.reshape(value.shape[:2]).T if value.ndim == 3 else value
    return value if layout is None else np.transpose(value, layout)


def _flat(tree: Any) -> dict[str, Any]:
    """{'a/b/kernel': leaf} for a nested params dict (FrozenDict or dict)."""
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def convert_state_dict(state_dict: Mapping[str, Any], model: unet.UNet) -> dict[str, Any]:
    """guided-diffusion `UNetModel` state_dict -> `model`'s params (float32 numpy tree).

    Args:
      state_dict: torch tensors or numpy arrays by guided-diffusion key
        (`input_blocks.1.0.in_layers.2.weight`, …), as `load_state_dict` returns.
      model: the `UNet` built with the checkpoint's flags (`unet_kwargs_from_flags`).

    Returns:
      The params pytree `model.apply({'params': ...}, ...)` takes, in `model.param_dtype`.

    Raises:
      ValueError: keys the config expects but the checkpoint lacks, keys it has but the config
        does not build, or a tensor whose shape does not fit, each named.
    """
    expected = _flat(unet.abstract_params(model))
    leaf_map = {
        t: (ours, layout) for t, (ours, layout) in _leaf_map(model).items() if ours in expected
    }
    given = {k: v for k, v in state_dict.items()}
    missing = sorted(set(leaf_map) - set(given), key=_key_order)
    unexpected = sorted(set(given) - set(leaf_map), key=_key_order)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the UNet: {_listing(unexpected)}")
        hint = ""
        if "label_emb.weight" in unexpected:
            hint = " The checkpoint is class-conditional: pass --class_cond True."
        elif "label_emb.weight" in missing:
            hint = " The checkpoint is unconditional: pass --class_cond False."
        raise ValueError(
            f"guided-diffusion checkpoint does not fit the UNet config ({'; '.join(parts)})."
            f"{hint} Take the flags the checkpoint was released with (image_size, "
            "num_channels, num_res_blocks, channel_mult, attention_resolutions, "
            "resblock_updown, …) through unet_kwargs_from_flags."
        )
    flat = {}
    for key, (ours, layout) in leaf_map.items():
        value = given[key]
        value = np.asarray(value.float().numpy() if hasattr(value, "numpy") else value)
        value = _relayout(value, layout)
        want = expected[ours]
        if value.shape != tuple(want.shape):
            raise ValueError(
                f"guided-diffusion checkpoint key {key!r} has shape "
                f"{tuple(np.shape(given[key]))}, which lays out as {value.shape} for "
                f"{ours!r}, but the UNet config needs {tuple(want.shape)}: check the flags "
                "that size it (num_channels, channel_mult, num_head_channels, learn_sigma)."
            )
        flat[ours] = value.astype(want.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def _key_order(key: str) -> tuple:
    """Sorts state_dict keys as the network runs (input_blocks.10 after input_blocks.9)."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A guided-diffusion checkpoint's tensors as float32 numpy arrays by state_dict key.

    `.pt`: read with torch (`weights_only=True`: tensors only, no code runs); needs the
    `torch` package. `.npz`: arrays by state_dict key; when some keys start with `param/`
    (as in the test fixtures), only those, without the prefix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"guided-diffusion checkpoint {path!r} does not exist.")
    if path.endswith(".npz"):
        with np.load(path) as f:
            prefixed = any(k.startswith("param/") for k in f.files)
            return {
                k.removeprefix("param/"): f[k].astype(np.float32)
                for k in f.files
                if k.startswith("param/") or not prefixed
            }
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path!r} needs PyTorch: pip install torch (the CPU wheel is enough), "
            "or convert the checkpoint to .npz where torch is installed."
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"{path!r} is not a state_dict of tensors (guided-diffusion saves "
            "model.state_dict() with torch.save)."
        )
    return {k: v.float().numpy() for k, v in state.items()}


# --- Flags ------------------------------------------------------------------------------------


def parse_flags(
    flags: str | Mapping[str, Any], *, improved_diffusion: bool = False
) -> dict[str, Any]:
    """guided-diffusion's model flags ("--image_size 64 --class_cond True …" or a dict),
    completed with its defaults (improved-diffusion's with `improved_diffusion`) and typed as
    its argparse types them.

    Raises:
      ValueError: an unknown flag (a typo would otherwise be ignored) or a bad value.
    """
    if isinstance(flags, str):
        tokens = shlex.split(flags)
        given: dict[str, Any] = {}
        while tokens:
            name = tokens.pop(0)
            if "=" in name:
                name, value = name.split("=", 1)
            elif tokens:
                value = tokens.pop(0)
            else:
                raise ValueError(f"guided-diffusion flag {name!r} has no value")
            given[name.removeprefix("--")] = value
    else:
        given = dict(flags)
    defaults = IMPROVED_DIFFUSION_DEFAULTS if improved_diffusion else GUIDED_DIFFUSION_DEFAULTS
    out = dict(defaults)
    for name, value in given.items():
        if name not in defaults:
            raise ValueError(
                f"guided-diffusion flag --{name} is not a model or diffusion flag; known: "
                f"{', '.join(sorted(defaults))}"
            )
        default = defaults[name]
        if isinstance(default, bool) and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "t", "f", "y", "n"):
                raise ValueError(f"guided-diffusion flag --{name}={value!r} is not a boolean")
            value = value.lower() in ("true", "1", "yes", "t", "y")
        out[name] = type(default)(value)
    return out


def unet_kwargs_from_flags(
    flags: str | Mapping[str, Any], *, improved_diffusion: bool = False
) -> dict[str, Any]:
    """`unet.UNet` keyword arguments for the model guided-diffusion's `create_model` builds.

    `attention_resolutions` stay in pixels (our convention and the flag's); an empty
    `channel_mult` takes the per-resolution default (also improved-diffusion's 32x32 one).
    """
    f = parse_flags(flags, improved_diffusion=improved_diffusion)
    mult = f["channel_mult"]
    return dict(
        image_size=f["image_size"],
        in_channels=3,
        model_channels=f["num_channels"],
        learn_sigma=f["learn_sigma"],
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=tuple(int(r) for r in f["attention_resolutions"].split(",")),
        dropout=f["dropout"],
        channel_mult=(
            tuple(int(m) for m in mult.split(","))
            if mult
            else unet.default_channel_mult(f["image_size"])
        ),
        conv_resample=True,
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )


def config_overrides_from_flags(
    flags: str | Mapping[str, Any], *, improved_diffusion: bool = False
) -> dict[str, Any]:
    """`--config.<field>` values (dotted field -> value) that describe the flags' model.

    Raises:
      ValueError: a flag the config cannot express yet (it names the flag): a separate
        num_heads_upsample, or timesteps rescaled to 1000 (rescale_timesteps with
        diffusion_steps ≠ 1000, improved-diffusion's default) — the network would see other
        inputs than it was trained on.
    """
    f = parse_flags(flags, improved_diffusion=improved_diffusion)
    k = unet_kwargs_from_flags(f, improved_diffusion=improved_diffusion)
    if f["num_heads_upsample"] not in (-1, f["num_heads"]):
        raise ValueError(
            "guided-diffusion flag --num_heads_upsample differs from --num_heads; the config "
            "has no field for it"
        )
    if f["rescale_timesteps"] and f["diffusion_steps"] != 1000:
        raise ValueError(
            f"guided-diffusion flags --rescale_timesteps True --diffusion_steps "
            f"{f['diffusion_steps']}: the model was trained on t·1000/{f['diffusion_steps']}, "
            "and ddpm_bs feeds it t; pass --rescale_timesteps False only if it was trained so"
        )
    return {
        "data.image_size": k["image_size"],
        "data.channels": 3,
        "data.class_conditional": f["class_cond"],
        "model.model_channels": k["model_channels"],
        "model.channel_mult": k["channel_mult"],
        "model.num_res_blocks": k["num_res_blocks"],
        "model.attention_resolutions": k["attention_resolutions"],
        "model.num_heads": k["num_heads"],
        "model.num_head_channels": k["num_head_channels"],
        "model.dropout": k["dropout"],
        "model.use_scale_shift_norm": k["use_scale_shift_norm"],
        "model.resblock_updown": k["resblock_updown"],
        "model.use_new_attention_order": k["use_new_attention_order"],
        "model.learn_sigma": k["learn_sigma"],
        "model.num_classes": k["num_classes"] or 0,
        "diffusion.schedule": f["noise_schedule"],
        "diffusion.num_timesteps": f["diffusion_steps"],
        "loss.target": "x0" if f["predict_xstart"] else "eps",
    }


# --- Files ------------------------------------------------------------------------------------


def save_params(params: Any, path: str) -> None:
    """Writes a params tree as a flat .npz (keys 'a/b/kernel'), atomically."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in _flat(params).items()})
    os.replace(tmp, path)


def load_params(path: str) -> dict[str, Any]:
    """The params tree `save_params` wrote."""
    with np.load(path) as f:
        return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


def write_checkpoint(config: Any, workdir: str, params: Any) -> int:
    """Writes a step-0 training checkpoint of `config` in `workdir` holding `params` as the
    trained and every EMA params: `--mode=sample` then samples from them and `--mode=train`
    fine-tunes them (a fresh optimizer). Returns the step written (0).

    Raises:
      ValueError: `params` do not fit the config's model (the first differing array named),
        or the workdir already holds a checkpoint (nothing is overwritten).
    """
    from ddpm_bs import checkpointing, state

    init_fn = state.build(config).init_fn()
    init_key = state.run_keys(config.seed).init
    abstract, shardings = state.abstract_state(init_fn, init_key, state.build_mesh(config))
    want = {k: tuple(v.shape) for k, v in _flat(abstract.params).items()}
    got = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
    if want != got:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ValueError(
            f"the converted params do not fit the config's model: {diff[0]} is "
            f"{got.get(diff[0], 'absent')} in the params and {want.get(diff[0], 'absent')} in "
            "the model; set the config from config_overrides_from_flags(flags)"
        )
    ckpt = checkpointing.Checkpoints(workdir, asynchronous=False)
    try:
        if ckpt.latest_step() is not None:
            raise ValueError(
                f"--workdir={workdir} already holds a checkpoint (step {ckpt.latest_step()}); "
                "choose an empty --workdir"
            )
        fresh = jax.jit(init_fn, out_shardings=shardings)(init_key)
        params = jax.device_put(params, shardings.params)
        fresh = fresh.replace(params=params, ema_params=(params,) * len(fresh.ema_params))
        ckpt.save(0, fresh, {"step": 0})
        ckpt.wait()
    finally:
        ckpt.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m ddpm_bs.models.guided_diffusion --pt=... --flags="..." --out=params.npz`."""
    import argparse

    parser = argparse.ArgumentParser(description="Convert a guided-diffusion checkpoint.")
    parser.add_argument("--pt", required=True, help="guided-diffusion .pt (or .npz) checkpoint")
    parser.add_argument("--flags", required=True, help="its MODEL_FLAGS and DIFFUSION_FLAGS")
    parser.add_argument("--out", help="write the params here as .npz")
    parser.add_argument("--config", help="ddpm_bs config file for --workdir (configs/*.py)")
    parser.add_argument("--workdir", help="write a step-0 checkpoint here")
    parser.add_argument(
        "--improved_diffusion",
        action="store_true",
        help="the flags use improved-diffusion's defaults",
    )
    args = parser.parse_args(argv)
    if bool(args.config) != bool(args.workdir) or not (args.out or args.workdir):
        parser.error("pass --out, or --config with --workdir")
    model = unet.UNet(
        **unet_kwargs_from_flags(args.flags, improved_diffusion=args.improved_diffusion)
    )
    params = convert_state_dict(load_state_dict(args.pt), model)
    if args.out:
        save_params(params, args.out)
        print(f"Wrote {args.out} ({unet.parameter_count(params) / 1e6:.2f} M parameters)")
    if args.workdir:
        overrides = config_overrides_from_flags(
            args.flags, improved_diffusion=args.improved_diffusion
        )
        config = _load_config(args.config)
        for field, value in overrides.items():
            section, name = field.split(".")
            config[section][name] = value
        write_checkpoint(config, args.workdir, params)
        flags = " ".join(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items())
        print(f"Wrote a step-0 checkpoint to {args.workdir}. Sample from it, or fine-tune it:")
        print(f"  ddpm-bs --config={args.config} --workdir={args.workdir} --mode=sample {flags}")


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "'(" + ",".join(str(v) for v in value) + ",)'"
    return str(value)


def _load_config(spec: str) -> Any:
    """`configs/x.py` or `configs/x.py:arg` (as ddpm-bs's --config) -> its get_config()."""
    import importlib.util
    import sys

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec}: {path} does not exist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)  # config files import their siblings as configs.x
    module_spec = importlib.util.spec_from_file_location("_guided_diffusion_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


if __name__ == "__main__":
    main()
