"""The train-step benchmark runs in its smoke mode and prints one well-formed JSON record."""


def test_bench_train_step_smoke_prints_a_json_line(run_bench):
    (record,) = run_bench("train_step.py", "--config=configs/digits.py", "--smoke")
    assert record["bench"] == "train_step" and record["config"] == "digits(smoke)"
    assert record["img_per_s"] > 0 and record["compile_s"] > 0
    assert record["gflop_per_img"] > 0 and record["peak_mem_gib"] > 0
    assert record["mfu"] is None  # no known peak for a CPU
