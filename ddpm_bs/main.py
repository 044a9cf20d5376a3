"""Command line: `ddpm-bs --config=configs/digits.py --workdir=runs/digits --mode=train`.

Overrides: `--config.train.num_steps=1000`, `--config.timesteps.sampler=bernoulli`, …
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "locate", "sample", "eval", "geometry")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")


def _launched_multiprocess(env) -> bool:
    """Whether this process is one of several (then `jax.distributed.initialize()` must run)."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    counts = (
        env.get(k, "1") for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")
    )
    if any(int(c) > 1 for c in counts if c.isdigit()):
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def _distributed_args(env) -> dict[str, int]:
    """`jax.distributed.initialize` arguments JAX does not read from the environment itself.

    JAX finds the cluster from SLURM, Open MPI or the TPU metadata, and the coordinator from
    JAX_COORDINATOR_ADDRESS; for a hand-launched job (several processes on one host, or hosts
    without a scheduler) JAX_NUM_PROCESSES and JAX_PROCESS_ID complete it.
    JAX_HEARTBEAT_TIMEOUT_SECONDS shortens the wait before the survivors of a dead process stop.
    """
    names = {
        "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID",
        # How long the others wait for a process that stopped answering before they exit
        # with an error (JAX's default: 100 s).
        "heartbeat_timeout_seconds": "JAX_HEARTBEAT_TIMEOUT_SECONDS",
    }
    out = {}
    for arg, name in names.items():
        if env.get(name, "") != "":
            if not env[name].isdigit():
                raise app.UsageError(f"{name}={env[name]!r} must be a non-negative integer.")
            out[arg] = int(env[name])
    return out


class _QuietOrbax:
    """Drops orbax's INFO chatter (a dozen lines per save); its warnings and errors still show."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    import jax

    if _launched_multiprocess(os.environ):
        jax.distributed.initialize(**_distributed_args(os.environ))
    from ddpm_bs import fields, train, validate

    logging.info(
        "JAX devices: %s (process %d of %d)",
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
    )
    config, workdir = _CONFIG.value, _WORKDIR.value
    # Known problems with the inputs (a bad field, a missing file or dataset, a workdir that
    # cannot be used) end in one line naming what to fix; anything else is a bug and keeps its
    # traceback.
    expected = (fields.SetupError, train.TrainingHalted)
    if _MODE.value != "train":  # the analysis modes read the user's files as they go
        expected += (FileNotFoundError, NotADirectoryError, PermissionError)
    try:
        if _MODE.value != "train":  # training validates inside train_and_evaluate
            validate.validate_config(config, num_devices=jax.device_count(), mode=_MODE.value)
        if _MODE.value == "train":
            train.train_and_evaluate(config, workdir)
        elif _MODE.value == "locate":
            from ddpm_bs import interval

            result = interval.run_locate(config, workdir)
            logging.info("t_δ = %d (t_δ/T = %.3f)", result["t_delta"], result["fraction"])
        elif _MODE.value == "sample":
            from ddpm_bs import generate

            generate.run_sample(config, workdir)
        elif _MODE.value == "eval":
            from ddpm_bs import generate

            generate.run_eval(config, workdir)
        elif _MODE.value == "geometry":
            from ddpm_bs import geometry

            geometry.run_geometry(config, workdir)
    except expected as e:
        sys.exit(f"ddpm-bs: {e}")  # One line, no traceback: the message names what to fix.


def _put_config_root_on_path(argv):
    """Config files import their siblings as `configs.x`: make the folder holding configs/ importable."""
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        if path:
            root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":", 1)[0])))
            if root not in sys.path:
                sys.path.insert(0, root)


def _parse_flags(argv):
    """absl's parsing, with a --config.* override that names no field said in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"ddpm-bs: {e}\nPass --help for the flags.", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: the path is not in the config
        text = str(e)
        hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
        name = hint.group(2) if hint else (re.findall(r"\w+", text) or [""])[0]
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and name in a), "")
        print(
            f"ddpm-bs: {flag or 'a --config.* flag'}: the config has no field {name!r}"
            + (f"; did you mean {hint.group(1)!r}?" if hint else "; see configs/default.py."),
            file=sys.stderr,
        )
    sys.exit(2)


def run():
    _put_config_root_on_path(sys.argv)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
