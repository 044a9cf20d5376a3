"""experiments/: the sweep runner, its resumability, the report's arithmetic, every command at
the test size."""

import jax
import numpy as np
import pytest

from ddpm_bs import artifacts, validate
from experiments import report, specs, sweep


def test_speedup_is_base_steps_to_its_best_over_new_steps_to_that_score():
    steps = [100, 200, 300, 400]
    base = [50.0, 30.0, 20.0, 21.0]  # best 20 at step 300
    new = [40.0, 19.5, 15.0, 14.0]  # ≤ 20 first at step 200
    assert report.speedup(steps, base, steps, new) == {
        "target": 20.0,
        "base_steps": 300,
        "new_steps": 200,
        "ratio": 1.5,
    }
    never = report.speedup(steps, base, steps, [60.0, 50.0, 40.0, 20.5])
    assert never["new_steps"] is None and never["ratio"] is None
    assert report.first_step_reaching(steps, base, 30.0) == 200


def test_json_lines_survive_a_crash_mid_append(tmp_path):
    path = tmp_path / "runs.jsonl"
    artifacts.append_jsonl([{"run": "a"}], path)
    with open(path, "a") as f:
        f.write('{"run": "b", "fi')  # killed while writing
    assert artifacts.read_jsonl(path) == [{"run": "a"}]
    artifacts.append_jsonl([{"run": "c"}], path)
    assert artifacts.read_jsonl(path) == [{"run": "a"}, {"run": "c"}]
    path.write_text('{"run": "a"}\nnot json\n{"run": "c"}\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        artifacts.read_jsonl(path)


def test_mean_curve_averages_seeds_and_refuses_other_eval_steps():
    def rec(name, steps, fid):
        return {"run": name, "curve": {"step": steps, "digits_fid": fid}}

    steps, mean, std = report.mean_curve(
        [rec("a", [1, 2], [4.0, 2.0]), rec("b", [1, 2], [6.0, 2.0])]
    )
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_allclose(mean, [5.0, 2.0])
    np.testing.assert_allclose(std, [1.0, 0.0])
    with pytest.raises(ValueError, match="b: evaluated at other steps"):
        report.mean_curve([rec("a", [1, 2], [1.0, 1.0]), rec("b", [1, 3], [1.0, 1.0])])


def test_seed_summary_pairs_each_setting_with_the_reference_at_the_same_seed():
    def rec(run, seed, final, sampler="bernoulli"):
        settings = {"timesteps.sampler": sampler}
        return {"run": f"{run}/seed{seed}", "seed": seed, "final_fid": final, "wall_s": 60.0,
                "t_delta": 800, "settings": settings}  # fmt: skip

    records = [
        rec("uniform", 0, 10.0, "uniform"),
        rec("uniform", 1, 12.0, "uniform"),
        rec("p=0.3", 0, 9.0),
        rec("p=0.3", 1, 12.5),
        rec("p=0.5", 2, 11.0),  # no uniform run at seed 2: nothing to pair
    ]
    lines = report._seed_summary(records)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:-1]]
    assert rows[0][:5] == ["uniform", "2", "11.00 ± 1.41", "0 (reference)",
                           "10.00, 12.00"]  # fmt: skip
    # p=0.3: finals 9 and 12.5 (mean 10.75, sd 2.47); paired −1.0 and +0.5 (mean −0.25, sd 1.06)
    assert rows[1][:6] == ["p=0.3", "2", "10.75 ± 2.47", "-0.25 ± 1.06", "9.00, 12.50", "800"]
    assert rows[2][:4] == ["p=0.5", "1", "11.00", "—"]


@pytest.mark.parametrize("size", sorted(specs.SIZES))
def test_every_run_of_every_size_is_a_valid_config(size):
    spec = specs.SIZES[size]
    for name, experiment in specs.EXPERIMENTS.items():
        runs = experiment(spec)
        assert runs and len({r.name for r in runs}) == len(runs), name
        for run in runs:
            assert run.kind in validate.MODES
            validate.validate_config(
                run.config(spec), num_devices=jax.device_count(), mode=run.kind
            )


def test_the_report_sizes_cover_the_papers_grids():
    for size in ("cpu", "gpu"):
        s = specs.SIZES[size]
        assert len(s.seeds) >= 3 and set(s.schedules) == {"linear", "cosine"}
        assert s.p_values == (0.3, 0.5, 0.7, 0.8, 0.9)
        assert s.t_fractions == (0.5, 0.6, 0.7, 0.8, 0.9)
        assert set(s.weightings) == {"p2", "min_snr", "debias"}
        assert set(s.timestep_samplers) == {"lognormal", "logit_normal", "loss_aware"}
        assert s.sampler_steps == (10, 25, 50, 100)
    bs = specs.config_for(specs.SIZES["cpu"], specs.BS)
    assert (bs.timesteps.sampler, bs.timesteps.p, bs.timesteps.t_delta) == ("bernoulli", 0.8, 800)
    assert bs.diffusion.num_timesteps == 1000


def test_a_run_two_experiments_share_trains_once():
    spec = specs.SIZES["cpu"]
    speedup = {r.name: r for r in specs.speedup(spec)}
    ablation = {r.name: r for r in specs.ablations(spec)}
    same = [("cosine/bs/seed0", "p=0.8/seed0"), ("cosine/uniform/seed0", "uniform/seed0")]
    for a, b in same:
        ca = specs.config_for(spec, speedup[a].settings)
        cb = specs.config_for(spec, ablation[b].settings)
        assert sweep.workdir_for(ca, sweep.ROOT) == sweep.workdir_for(cb, sweep.ROOT)


def test_an_interrupted_training_run_is_resumed_not_recorded(tmp_path, monkeypatch, capsys):
    """SIGTERM ends ddpm-bs's loop early: the sweep stops without a record, and a rerun goes on."""
    calls = []

    def fake_train(config, workdir):
        calls.append(workdir)
        stopped = len(calls) == 1
        step = 1 if stopped else config.train.num_steps
        artifacts.append_jsonl(
            [{"step": s, "eval/digits_fid": 10.0 / s, "loss": 1.0} for s in range(1, step + 1)],
            f"{workdir}/{artifacts.METRICS_FILE}",
        )
        return type("State", (), {"step": np.int32(step)})()

    monkeypatch.setattr(sweep.train, "train_and_evaluate", fake_train)
    argv = ["speedup", "--size=test", f"--out={tmp_path}"]
    assert sweep.main(argv) == 0
    assert "stopped at step 1; rerun the same command to resume" in capsys.readouterr().err
    assert artifacts.read_jsonl(tmp_path / "speedup.jsonl") == []
    assert sweep.main(argv) == 0
    records = artifacts.read_jsonl(tmp_path / "speedup.jsonl")
    assert [r["run"] for r in records] == ["cosine/uniform/seed0", "cosine/bs/seed0"]
    assert calls[0] == calls[1]  # the same workdir: ddpm-bs resumes from its checkpoint
    assert records[0]["curve"] == {"step": [1, 2], "digits_fid": [10.0, 5.0]}
    assert sweep.main(argv) == 0 and len(calls) == 3  # finished runs are not run again


def test_report_refuses_a_file_without_markers(tmp_path):
    doc = tmp_path / "REPORT.md"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- tables:cpu --> … <!-- /tables:cpu --> markers"):
        report.replace_between_markers(doc, "cpu", "tables")
    assert doc.read_text() == "no markers\n"


def test_unknown_experiment_is_refused_with_the_valid_names(tmp_path, capsys):
    assert sweep.main(["speedups", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "experiment 'speedups' is unknown" in err and "ot_decay" in err


def test_every_experiment_runs_at_the_test_size_and_the_report_is_written(tmp_path, conv_denoiser):
    # The plumbing is under test, not the network: the U-Net is swapped for two convolutions.
    assert sweep.main(["all", "--size=test", f"--out={tmp_path}"]) == 0
    for name, experiment in specs.EXPERIMENTS.items():
        records = artifacts.read_jsonl(tmp_path / f"{name}.jsonl")
        assert [r["run"] for r in records] == [r.name for r in experiment(specs.SIZES["test"])]
        for r in records:
            assert r["device"] and r["wall_s"] >= 0 and r["size"] == "test"
            if r["kind"] == "train":
                assert r["curve"]["step"] == [1, 2] and np.all(
                    np.isfinite(r["curve"]["digits_fid"])
                )
            elif r["kind"] == "sample":
                assert r["digits_fid"] > 0 and r["num_samples"] == 16
            else:
                assert 1 <= r["t_delta"] <= 1000 and r["ratio"][0] == pytest.approx(1.0)
    auto = next(r for r in artifacts.read_jsonl(tmp_path / "ablations.jsonl") if "auto" in r["run"])
    assert isinstance(auto["t_delta"], int)  # located with optimal transport, then trained with
    tables = report.write_tables(tmp_path)
    for title, _ in report.SECTIONS.values():
        assert f"### {title}" in tables
    assert "Not run yet" not in tables
    assert (tmp_path / "speedup.png").is_file() and (tmp_path / "ot_decay.png").is_file()
    # The report's prose keeps its words; the tables between the markers are rewritten.
    doc = tmp_path / "doc" / "REPORT.md"
    doc.parent.mkdir()
    doc.write_text("# Words\n<!-- tables:test -->\nold\n<!-- /tables:test -->\nMore words.\n")
    assert report.main(["--size=test", f"--out={tmp_path}", f"--into={doc}"]) == 0
    text = doc.read_text()
    assert text.startswith("# Words\n<!-- tables:test -->\n") and text.endswith("More words.\n")
    assert "old" not in text and "![speedup](../speedup.png)" in text
    # Rerun: every record is there, so nothing trains again.
    before = {p.name: p.read_text() for p in tmp_path.glob("*.jsonl")}
    assert sweep.main(["all", "--size=test", f"--out={tmp_path}"]) == 0
    assert {p.name: p.read_text() for p in tmp_path.glob("*.jsonl")} == before
