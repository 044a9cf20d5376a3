"""The W₂-curve benchmark runs and prints one JSON record per figure, agreeing with POT."""

KEYS = {"bench", "estimator", "timesteps", "n", "dim", "seconds", "device", "jax"}


def test_bench_interval_smoke_prints_json_lines(run_bench):
    records = run_bench("interval.py", "--smoke", timeout=300)
    by_estimator = {r["estimator"]: r for r in records}
    assert set(by_estimator) == {"naive", "debiased_baseline", "reference_ott_per_t"}
    for record in records:
        assert KEYS <= set(record), record
        assert record["bench"] == "interval" and record["n"] == 48 and record["timesteps"] == 5
        assert record["seconds"] > 0
        assert record["max_rel_diff_transport"] < 1e-2  # same problems, same ε as POT
    for name in ("naive", "debiased_baseline"):
        assert by_estimator[name]["speedup_vs_pot"] > 0
        assert by_estimator[name]["max_abs_diff_ratio"] < 0.05
    assert by_estimator["debiased_baseline"]["solves"] == 15
