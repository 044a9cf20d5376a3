"""The sampling benchmark runs in its smoke mode and prints one well-formed JSON line per method."""


def test_bench_sampling_smoke_prints_a_json_line_per_method(run_bench):
    records = run_bench("sampling.py", "--config=configs/digits.py", "--smoke")
    assert [r["method"] for r in records] == ["ddim", "dpm_solver++"]
    for r in records:
        assert r["bench"] == "sampling" and r["config"] == "digits(smoke)"
        assert r["batch"] == 8 and r["steps"] == 4 and r["nfe"] == 4
        assert r["img_per_s"] > 0 and r["min_per_50k"] > 0 and r["compile_s"] > 0
