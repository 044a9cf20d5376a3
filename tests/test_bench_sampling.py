"""The sampling benchmark runs in its smoke mode and prints one well-formed JSON line per figure."""


def test_bench_sampling_smoke_prints_a_json_line_per_method_and_inception(run_bench, tmp_path):
    records = run_bench(
        "sampling.py",
        "--config=configs/digits.py",
        "--smoke",
        "--inception_batch=64",
        f"--profile_dir={tmp_path}",
    )
    sampling = [r for r in records if r["bench"] == "sampling"]
    assert [r["method"] for r in sampling] == ["ddim", "dpm_solver++"]
    for r in sampling:
        assert r["config"] == "digits(smoke)"
        assert r["batch"] == 8 and r["steps"] == 4 and r["nfe"] == 4
        assert r["img_per_s"] > 0 and r["min_per_50k"] > 0 and r["compile_s"] > 0
    for method in ("ddim", "dpm_solver++"):
        profile = [r for r in records if r["bench"] == "sampling_profile" and r["method"] == method]
        ops = [r for r in profile if "op" in r]
        assert [op["rank"] for op in ops] == list(range(1, 11)) and len(profile) > 10
        assert any("UNet" in (op["what"] or "") for op in ops)
    (inception,) = [r for r in records if r["bench"] == "inception_features"]
    assert inception["config"] == "digits(smoke)" and inception["batch"] == 2  # smoke caps it
    assert inception["image_shape"] == [8, 8, 1] and inception["img_per_s"] > 0
