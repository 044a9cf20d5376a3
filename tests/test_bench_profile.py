"""`bench/xla_profile.py`: the profile summary ranks a trace's XLA ops by their time.

No test asserts the order of two measured times (that depends on the machine's load).
"""

import re
import sys

import jax
import jax.numpy as jnp
import pytest
from support import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import xla_profile  # noqa: E402


def test_a_profile_lists_each_op_of_the_function_once_per_call_with_its_time(tmp_path):
    # Which op takes the most time depends on the machine and its load: only the structure of
    # the ranking and the ops it counts are checked, never the order of two measured times.
    @jax.jit
    def f(x):
        return x @ x, jnp.sum(x)

    @jax.jit
    def other(y):  # another module, running inside the trace: none of its ops may count
        return jnp.cumsum(jnp.sin(y), axis=0)

    x = jax.random.normal(jax.random.key(0), (1024, 1024))
    compiled = f.lower(x).compile()
    jax.block_until_ready(other(x))

    def call():
        other(x)
        return compiled(x)

    records = xla_profile.profile(call, calls=3, trace_dir=tmp_path, hlo_text=compiled.as_text())
    ops = [r for r in records if "op" in r]
    groups = [r for r in records if "group" in r]
    assert len(ops) + len(groups) == len(records)
    for ranked in (ops, groups):
        assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
        times = [r["ms_per_call"] for r in ranked]
        assert times == sorted(times, reverse=True) and times[0] > 0
        assert sum(r["share"] for r in ranked) <= 1.0 + 1e-6
    # f's matmul is listed, described by its opcode, shape and JAX op (as is its group).
    (dot,) = [op for op in ops if "dot_general" in (op["what"] or "")]
    assert "f32[1024,1024]" in dot["what"] and dot["ms_per_call"] > 0
    assert "forward dot_general" in {g["group"] for g in groups}
    # Each op once per call; `other`'s ops, were they counted, would also break the shares.
    assert all(op["runs_per_call"] == 1.0 for op in ops), ops
    assert not any(w in (op["what"] or "") for op in ops for w in ("cumsum", "sin")), ops


def test_describe_ops_reads_opcode_fusion_kind_root_shape_and_the_jax_op_name():
    text = """
%fused_computation.7 (param_0: f32[8,16,64], param_1: f32[8,64,16]) -> f32[8,16,16] {
  %param_0 = f32[8,16,64]{2,1,0} parameter(0)
  ROOT %dot.138 = f32[8,16,16]{2,1,0} dot(%param_0, %param_1), lhs_batch_dims={0}
}

%fused_computation.8 (param_0: f32[2]) -> f32[2] {
  ROOT %add.1 = f32[2]{0} add(%param_0, %param_0), metadata={op_name="jit(f)/add"}
}

ENTRY %main.9 (p0: f32[2]) -> (f32[2], s32[]) {
  %fusion.12 = bf16[128,32,32,256]{3,2,1,0} fusion(%p0, %p1), kind=kLoop, calls=%fc, metadata={op_name="jit(step)/UNet/conv_general_dilated" source_file="x.py"}
  %ynn_fusion.3 = f32[8,16,16]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.7
  %fusion.4 = f32[2]{0} fusion(%a), kind=kLoop, calls=%fused_computation.8
  %copy.1 = f32[3,3,96,64]{1,0,2,3} copy(%p2)
  ROOT %tuple.3 = (f32[2]{0}, s32[]) tuple(%a, %b)
}
"""  # noqa: E501
    assert xla_profile.module_name(text) is None
    assert xla_profile.module_name("HloModule jit_step, is_scheduled=true\n" + text) == "jit_step"
    described = xla_profile.describe_ops(text)
    assert described["fusion.12"] == (
        "fusion[Loop] bf16[128,32,32,256] | jit(step)/UNet/conv_general_dilated"
    )
    assert described["ynn_fusion.3"] == "fusion[Custom:dot] f32[8,16,16]"
    assert described["fusion.4"] == "fusion[Loop:add] f32[2] | jit(f)/add"  # the root's op_name
    assert described["copy.1"] == "copy f32[3,3,96,64]"
    assert described["tuple.3"] == "tuple (f32[2], s32[])"


def test_groups_are_pass_and_primitive_else_the_opcode():
    assert (
        xla_profile.group_of("f.1", "fusion f32[2] | jit(step)/jvp(UNet)/a/conv_general_dilated")
        == "forward conv_general_dilated"
    )
    assert (
        xla_profile.group_of("f.2", "fusion f32[2] | jit(step)/transpose(jvp(UNet))/a/reduce_sum")
        == "backward reduce_sum"
    )
    assert xla_profile.group_of("copy.3", "copy f32[3,3]") == "unnamed copy"
    assert xla_profile.group_of("fusion.12", None) == "fusion"


def test_a_directory_without_a_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb under"):
        xla_profile.top_ops(tmp_path, calls=1)


def test_a_module_the_trace_does_not_name_ranks_all_ops_with_a_warning(tmp_path):
    f = jax.jit(lambda x: x @ x)
    x = jnp.ones((256, 256))
    compiled = f.lower(x).compile()
    text = re.sub(r"^HloModule \S+", "HloModule jit_elsewhere,", compiled.as_text())
    with pytest.warns(UserWarning, match="names no op of module jit_elsewhere"):
        records = xla_profile.profile(
            lambda: compiled(x), calls=1, trace_dir=tmp_path, hlo_text=text
        )
    assert any("dot_general" in (r.get("what") or "") for r in records)
