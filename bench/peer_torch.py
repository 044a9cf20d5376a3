"""Side by side on one machine: this project's train step against PyTorch guided-diffusion's.

Both implementations build the same model and step from one config: the U-Net (ADM), uniform
timesteps, q_sample, the hybrid loss (MSE on ε + the VLB on the learned σ), global-norm
clipping, AdamW and one EMA, at the same batch of synthetic images in [−1, 1]. guided-diffusion
is not vendored: its code is imported from the checkout the user names (`--guided_diffusion`,
the repository root of openai/guided-diffusion); without it, or without torch, the peer is
skipped with a message and only this project's step is timed.

The timed repeats alternate (ours, then the peer's, then ours …) so that load from other work on
the machine falls on both alike. One JSON line per figure:

    {"bench": "peer_torch", "impl": "ddpm_bs", "img_per_s": ..., "step_ms": ..., ...}
    {"bench": "peer_torch", "impl": "guided_diffusion", "img_per_s": ..., ...}
    {"bench": "peer_torch", "impl": "ratio", "ratio": ..., "pair_ratios": [...], ...}

`ratio` is ddpm_bs img/s over guided-diffusion img/s from the medians; `pair_ratios` are the
ratios of each alternating pair (their spread is the noise of the comparison).

The default configuration is issue 21's small ADM (7.66 M parameters): 32×32×3, 64 channels,
mult 1,2,2, 2 res blocks, attention at 16 with 4 heads, dropout 0.1, learned σ, cosine, T=1000,
batch 32, float32. `--nosmall` keeps the config file's model (override it with --config.*):

    python bench/peer_torch.py --guided_diffusion=/tmp/guided-diffusion
    python bench/peer_torch.py --guided_diffusion=/tmp/guided-diffusion --nosmall --batch=8
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import default  # noqa: E402
from ddpm_bs import train  # noqa: E402
from ddpm_bs.models import layers  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10_adm.py", "Config file.")
_PEER = flags.DEFINE_string(
    "guided_diffusion", None, "Root of an openai/guided-diffusion checkout (the peer's code)."
)
_SMALL = flags.DEFINE_bool("small", True, "Issue 21's 7.66 M ADM (overrides the model fields).")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size of both steps.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating timed repeats of each step.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads for the peer.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny config, 1 step, 1 repeat (what the test runs).")
_AB_CONV = flags.DEFINE_bool(
    "ab_conv",
    False,
    "Also time ddpm_bs with plain lax convolutions (impl 'ddpm_bs_lax_conv'), interleaved: "
    "the A/B of layers.conv_general_dilated's CPU kernel gradient.",
)

# Issue 21's side-by-side configuration; the rest (cosine, T=1000, learned σ, AdaGN,
# resblock_updown, float32) is configs/cifar10_adm.py's.
SMALL = {
    "model_channels": 64,
    "channel_mult": (1, 2, 2),
    "num_res_blocks": 2,
    "attention_resolutions": (16,),
    "num_heads": 4,
    "dropout": 0.1,
}


def guided_diffusion_args(config) -> dict:
    """guided-diffusion's `create_model_and_diffusion` arguments for a ddpm_bs config.

    Raises ValueError for a config the peer has no equivalent of.
    """
    m, d = config.model, config.diffusion
    if config.loss.target != "eps" or config.loss.weighting != "none":
        raise ValueError(
            f"loss.target={config.loss.target!r}, loss.weighting={config.loss.weighting!r}: "
            "guided-diffusion trains ε with no weighting; use target='eps', weighting='none'."
        )
    if config.timesteps.sampler != "uniform" or m.dtype != "float32":
        raise ValueError(
            f"timesteps.sampler={config.timesteps.sampler!r}, model.dtype={m.dtype!r}: the "
            "peer is compared on uniform timesteps in float32."
        )
    return {
        "image_size": config.data.image_size,
        "class_cond": bool(m.num_classes),
        "learn_sigma": m.learn_sigma,
        "num_channels": m.model_channels,
        "num_res_blocks": m.num_res_blocks,
        "channel_mult": ",".join(str(c) for c in m.channel_mult),
        "num_heads": m.num_heads,
        "num_head_channels": m.num_head_channels,
        "num_heads_upsample": -1,
        "attention_resolutions": ",".join(str(r) for r in m.attention_resolutions),
        "dropout": m.dropout,
        "diffusion_steps": d.num_timesteps,
        "noise_schedule": d.schedule,
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": m.use_scale_shift_norm,
        "resblock_updown": m.resblock_updown,
        "use_fp16": False,
        "use_new_attention_order": False,
    }


def ours(config, image: np.ndarray):
    """(step, parameter count): `step()` runs this project's compiled train step once."""
    trainer = train.Trainer(config)
    carry = {"state": trainer.init()}
    b = image.shape[0]
    batch = jax.device_put(
        {"image": jnp.asarray(image), "label": jnp.zeros((b,), jnp.int32)}, trainer.batch_sharding
    )
    start = time.perf_counter()
    compiled = trainer.step.lower(carry["state"], batch, trainer.train_key).compile()
    compile_s = time.perf_counter() - start

    def step():
        carry["state"], metrics = compiled(carry["state"], batch, trainer.train_key)
        jax.block_until_ready((carry["state"], metrics))

    params = sum(x.size for x in jax.tree.leaves(carry["state"].params))
    return step, params, compile_s


def peer(config, image: np.ndarray, root: str | None):
    """(step, parameter count), or a string saying why the peer cannot run here."""
    if not root:
        return "no --guided_diffusion=PATH given (the root of an openai/guided-diffusion checkout)"
    if not (Path(root) / "guided_diffusion" / "script_util.py").is_file():
        return f"--guided_diffusion={root} has no guided_diffusion/script_util.py"
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install torch)"
    sys.path.insert(0, str(Path(root).resolve()))
    from guided_diffusion import nn as gd_nn
    from guided_diffusion import resample, script_util

    torch.set_num_threads(_THREADS.value)
    torch.manual_seed(config.seed)
    model, diffusion = script_util.create_model_and_diffusion(**guided_diffusion_args(config))
    model.train()
    sampler = resample.create_named_schedule_sampler("uniform", diffusion)
    o = config.optim
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    emas = [[p.detach().clone() for p in params] for _ in config.train.ema_rates]
    x0 = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))

    def step():  # guided-diffusion's TrainLoop.run_step without the logging and MPI
        t, weights = sampler.sample(x0.shape[0], x0.device)
        terms = diffusion.training_losses(model, x0, t)
        loss = (terms["loss"] * weights).mean()
        opt.zero_grad()
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        for rate, ema in zip(config.train.ema_rates, emas, strict=True):
            gd_nn.update_ema(ema, params, rate=rate)

    return step, sum(p.numel() for p in params), torch.__version__


def timed(step, steps: int) -> float:
    """Seconds per step over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def summary(times: list[float], batch: int) -> dict:
    img_per_s = sorted(batch / s for s in times)
    return {
        "img_per_s": round(statistics.median(img_per_s), 3),
        "img_per_s_min": round(img_per_s[0], 3),
        "img_per_s_max": round(img_per_s[-1], 3),
        "step_ms": round(statistics.median(times) * 1e3, 1),
    }


def main(argv):
    del argv
    config = _CONFIG.value
    if _SMALL.value:
        config.model.update(SMALL)
    config.train.batch_size = _BATCH.value
    if _SMOKE.value:
        config = default.smoke(config)
    steps, repeats = (1, 1) if _SMOKE.value else (_STEPS.value, _REPEATS.value)
    b = config.train.batch_size
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (b, config.data.image_size, config.data.image_size, 3))
    image = image[..., : config.data.channels].astype(np.float32)

    common = {"bench": "peer_torch", "batch": b, "dtype": config.model.dtype}
    common["config"] = "adm_7m" if _SMALL.value else "config"
    common["config"] += "(smoke)" if _SMOKE.value else ""
    step_ours, params_ours, compile_s = ours(config, image)
    step_lax = None
    if _AB_CONV.value:
        faster_conv = layers.conv_general_dilated
        layers.conv_general_dilated = jax.lax.conv_general_dilated  # traced in ours()
        try:
            step_lax, _, compile_lax_s = ours(config, image)
        finally:
            layers.conv_general_dilated = faster_conv
    got = peer(config, image, _PEER.value)
    if isinstance(got, str):
        print(f"peer_torch: skipping guided-diffusion: {got}", file=sys.stderr, flush=True)
        step_peer = None
    else:
        step_peer, params_peer, torch_version = got

    step_ours()  # warm-up
    for step in (step_lax, step_peer):
        if step:
            step()
    times_ours, times_lax, times_peer = [], [], []
    for _ in range(repeats):
        times_ours.append(timed(step_ours, steps))
        if step_lax:
            times_lax.append(timed(step_lax, steps))
        if step_peer:
            times_peer.append(timed(step_peer, steps))

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    record = {**common, "impl": "ddpm_bs", **summary(times_ours, b), "params": params_ours}
    record.update(compile_s=round(compile_s, 1), device=kind, jax=jax.__version__)
    print(json.dumps(record), flush=True)
    if step_lax:
        record = {**common, "impl": "ddpm_bs_lax_conv", **summary(times_lax, b)}
        record["compile_s"] = round(compile_lax_s, 1)
        record["speedup_of_ddpm_bs"] = round(
            statistics.median(times_lax) / statistics.median(times_ours), 3
        )
        record["pair_speedups"] = sorted(
            round(a / o, 3) for o, a in zip(times_ours, times_lax, strict=True)
        )
        print(json.dumps(record), flush=True)
    if not step_peer:
        print(json.dumps({**common, "impl": "guided_diffusion", "skipped": got}), flush=True)
        return
    record = {**common, "impl": "guided_diffusion", **summary(times_peer, b)}
    record.update(params=params_peer, torch=torch_version, torch_threads=_THREADS.value)
    print(json.dumps(record), flush=True)
    pairs = sorted(p / o for o, p in zip(times_ours, times_peer, strict=True))
    ratio = statistics.median(times_peer) / statistics.median(times_ours)
    record = {**common, "impl": "ratio", "ratio": round(ratio, 3)}
    record["pair_ratios"] = [round(r, 3) for r in pairs]
    record["same_params"] = params_ours == params_peer
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    app.run(main)
