"""The timestep benchmark runs and prints one JSON record per sampler."""

KEYS = {"bench", "sampler", "n", "draws_per_s", "ratio_to_uniform", "device", "jax"}


def test_bench_timesteps_smoke_prints_json_lines(run_bench):
    records = run_bench("timesteps.py", "--smoke", timeout=300)
    assert {r["sampler"] for r in records} >= {
        "uniform",
        "bernoulli",
        "loss_aware",
        "ot_gap",
        "ot_rate",
        "reference_jax_random_categorical",
    }
    for record in records:
        assert KEYS <= set(record), record
        assert record["bench"] == "timesteps" and record["n"] == 10_000
        assert record["draws_per_s"] > 0 and record["ratio_to_uniform"] > 0
        low, high = record["seconds_quartiles"]
        assert 0 < low <= record["seconds"] <= high
    assert next(r for r in records if r["sampler"] == "uniform")["ratio_to_uniform"] == 1.0
