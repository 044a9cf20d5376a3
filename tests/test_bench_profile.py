"""`bench/xla_profile.py`: the profile summary ranks a trace's XLA ops by their time."""

import sys

import jax
import jax.numpy as jnp
import pytest
from support import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import xla_profile  # noqa: E402


def test_a_matmul_heavy_function_ranks_its_matmul_first_with_per_call_times(tmp_path):
    # A 1024² matmul is 2.1 GFLOP (≈ 20 ms here); the sum reads 1 M floats (≈ 0.3 ms), so
    # the dot must come first, with most of the time, however the machine is loaded.
    @jax.jit
    def f(x):
        return x @ x, jnp.sum(x)

    x = jax.random.normal(jax.random.key(0), (1024, 1024))
    compiled = f.lower(x).compile()
    ops = xla_profile.profile(
        lambda: compiled(x), calls=3, trace_dir=tmp_path, hlo_text=compiled.as_text()
    )
    assert [op["rank"] for op in ops] == list(range(1, len(ops) + 1))
    times = [op["ms_per_call"] for op in ops]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert "dot_general" in ops[0]["what"] and "f32[1024,1024]" in ops[0]["what"]
    assert ops[0]["share"] > 0.8 and sum(op["share"] for op in ops) <= 1.0 + 1e-6
    assert all(op["runs_per_call"] == 1.0 for op in ops)  # each op once per call, 3 calls


def test_describe_ops_reads_opcode_fusion_kind_shape_and_the_jax_op_name():
    text = """
  %fusion.12 = bf16[128,32,32,256]{3,2,1,0} fusion(%p0, %p1), kind=kLoop, calls=%fc, metadata={op_name="jit(step)/UNet/conv_general_dilated" source_file="x.py"}
  ROOT %tuple.3 = (f32[2]{0}, s32[]) tuple(%a, %b)
  %copy.1 = f32[3,3,96,64]{1,0,2,3} copy(%p2)
"""  # noqa: E501
    assert xla_profile.describe_ops(text) == {
        "fusion.12": "fusion[Loop] bf16[128,32,32,256] | jit(step)/UNet/conv_general_dilated",
        "tuple.3": "tuple (f32[2], s32[])",
        "copy.1": "copy f32[3,3,96,64]",
    }


def test_a_directory_without_a_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb under"):
        xla_profile.top_ops(tmp_path, calls=1)
