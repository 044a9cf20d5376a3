"""The train-step benchmark runs in its smoke mode and prints one well-formed JSON record, then
its profile's top 10 ops."""


def test_bench_train_step_smoke_prints_a_json_line_and_a_profile(run_bench, tmp_path):
    record, *profile = run_bench(
        "train_step.py", "--config=configs/digits.py", "--smoke", f"--profile_dir={tmp_path}"
    )
    assert record["bench"] == "train_step" and record["config"] == "digits(smoke)"
    assert record["img_per_s"] > 0 and record["compile_s"] > 0
    assert record["gflop_per_img"] > 0 and record["peak_mem_gib"] > 0
    assert record["mfu"] is None  # no known peak for a CPU
    assert [op["rank"] for op in profile] == list(range(1, 11))
    assert all(op["bench"] == "train_step_profile" and op["ms_per_call"] > 0 for op in profile)
    assert any("jit(train_step)" in (op["what"] or "") for op in profile)
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))  # the trace is kept
