"""The train-step benchmark runs in its smoke mode and prints one well-formed JSON record, then
its profile's top 10 ops."""


def test_bench_train_step_smoke_prints_a_json_line_and_a_profile(run_bench, tmp_path):
    record, *profile = run_bench(
        "train_step.py", "--config=configs/digits.py", "--smoke", f"--profile_dir={tmp_path}"
    )
    assert record["bench"] == "train_step" and record["config"] == "digits(smoke)"
    assert record["img_per_s"] > 0 and record["compile_s"] > 0
    assert record["gflop_per_img"] > 0 and record["peak_mem_gib"] > 0
    per_img = record["peak_mem_gib"] * 1024 / record["batch"]
    assert abs(record["peak_mem_mib_per_img"] - per_img) < 0.01 * per_img + 0.6  # rounding
    assert record["mfu"] is None  # no known peak for a CPU
    assert all(r["bench"] == "train_step_profile" and r["ms_per_call"] > 0 for r in profile)
    ops = [r for r in profile if "op" in r]
    groups = [r for r in profile if "group" in r]
    assert [r["rank"] for r in ops] == [r["rank"] for r in groups] == list(range(1, 11))
    assert any("jit(train_step)" in (op["what"] or "") for op in ops)
    # Over all ops, convolutions of both passes are among the largest groups of a U-Net step.
    top = {g["group"] for g in groups[:5]}
    assert {"forward conv_general_dilated", "backward conv_general_dilated"} <= top, top
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))  # the trace is kept
