"""The loader benchmark runs on a folder of JPEGs it writes and prints one JSON record each."""

KEYS = {"bench", "loader", "workers", "images_per_s", "min", "max", "images", "batch", "steps"}


def test_bench_loader_smoke_prints_json_lines(run_bench):
    records = run_bench("loader.py", "--smoke", timeout=300)
    assert [r["loader"] for r in records] == ["grain"]
    for record in records:
        assert KEYS <= set(record), record
        assert record["bench"] == "loader" and record["images"] == 64 and record["workers"] == 0
        assert 0 < record["min"] <= record["images_per_s"] <= record["max"]
