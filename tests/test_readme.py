"""The README's code runs, and its test command is the one CI runs."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(heading, lang):
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    commands = [b.strip() for b in _blocks("## Quick start", "bash")]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "configs/digits.py" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_loss_snippet_trains_a_toy_model():
    first, second = _blocks("## Use the samplers in your own JAX code", "python")
    namespace = {"my_model": lambda params, xt, t: params * xt}
    exec(first, namespace)
    exec(second, namespace)
    x0 = jax.random.uniform(jax.random.key(1), (16, 4, 4, 1), minval=-1, maxval=1)
    loss, grad = jax.jit(jax.value_and_grad(namespace["loss_fn"]))(
        jnp.float32(0.5), x0, jax.random.key(2)
    )
    assert np.isfinite(float(loss)) and np.isfinite(float(grad)) and float(grad) != 0.0
