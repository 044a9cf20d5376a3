"""The train-step benchmark runs in its smoke mode and prints one well-formed JSON record, then
its profile's top 10 ops and top 10 op groups.

Only structure and invariants are checked: which op of a measured profile takes the most time
depends on the machine and its load, so no ranking of measured times is asserted.
"""

import importlib
import sys

from support import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import flops  # noqa: E402


def test_bench_train_step_smoke_prints_a_json_line_and_a_profile(run_bench, tmp_path):
    record, *profile = run_bench(
        "train_step.py", "--config=configs/digits.py", "--smoke", f"--profile_dir={tmp_path}"
    )
    assert record["bench"] == "train_step" and record["config"] == "digits(smoke)"
    assert record["img_per_s"] > 0 and record["compile_s"] > 0
    assert record["gflop_per_img"] > 0 and record["peak_mem_gib"] > 0
    # A smoke model is not the network the reference figure was counted on: XLA's count.
    assert record["flop_source"] == "xla"
    assert record["gflop_per_img"] == record["xla_gflop_per_img"]
    per_img = record["peak_mem_gib"] * 1024 / record["batch"]
    assert abs(record["peak_mem_mib_per_img"] - per_img) < 0.01 * per_img + 0.6  # rounding
    assert record["mfu"] is None  # no known peak for a CPU
    assert all(r["bench"] == "train_step_profile" for r in profile)
    ops = [r for r in profile if "op" in r]
    groups = [r for r in profile if "group" in r]
    assert len(ops) + len(groups) == len(profile)
    for ranked in (ops, groups):
        assert [r["rank"] for r in ranked] == list(range(1, 11))
        times = [r["ms_per_call"] for r in ranked]
        assert times == sorted(times, reverse=True) and times[0] > 0 and times[-1] >= 0
        assert all(0 <= r["share"] <= 1 and r["runs_per_call"] > 0 for r in ranked)
        assert sum(r["share"] for r in ranked) <= 1 + 10 * 5e-5  # shares are rounded to 1e-4
        assert len({r.get("op", r.get("group")) for r in ranked}) == 10
    # Only the step's own ops count: every op that names its JAX op comes from the step.
    named = [op["what"].split("| ", 1)[1] for op in ops if op["what"] and "| " in op["what"]]
    assert all(name.startswith("jit(train_step)") for name in named), named
    # A group is a pass and a primitive, or an op without a JAX name, or an opcode.
    assert all(g["group"].split()[0] in ("forward", "backward", "unnamed") or " " not in g["group"]
               for g in groups), groups  # fmt: skip
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))  # the trace is kept


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def test_the_reference_flop_figure_holds_for_its_network_only():
    # The paper's CIFAR-10 ADM, under either config file that builds it: the hand count.
    for name in ("cifar10_adm", "cifar10_adm_bs"):
        assert flops.gflop_per_img(_config(name), 52.3) == (55.6, "reference")
    # Issue 21's 7.66 M model is configs/cifar10_adm.py with model overrides: XLA's count,
    # whatever the config file is called. So is any one network field changed.
    small = _config("cifar10_adm")
    small.model.update(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2)
    small.model.attention_resolutions = (16,)
    assert flops.gflop_per_img(small, 10.3) == (10.3, "xla")
    changes = {
        ("data", "image_size"): 64,
        ("data", "channels"): 1,
        ("model", "channel_mult"): (1, 2, 2),
        ("model", "attention_resolutions"): (16,),
        ("model", "learn_sigma"): False,
        ("model", "num_classes"): 10,
    }
    for (section, field), value in changes.items():
        config = _config("cifar10_adm")
        config[section][field] = value
        assert flops.gflop_per_img(config, 1.0) == (1.0, "xla"), field
    # Fields that do not change the arithmetic keep the reference.
    config = _config("cifar10_adm")
    config.model.dropout, config.model.dtype, config.train.batch_size = 0.1, "bfloat16", 8
    assert flops.gflop_per_img(config, 52.3) == (55.6, "reference")
