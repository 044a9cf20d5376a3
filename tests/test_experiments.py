"""experiments/: the sweep runner, its resumability, the report's arithmetic, every command at
the test size."""

import jax
import numpy as np
import pytest

from ddpm_bs import artifacts, validate
from experiments import report, specs, stats, sweep


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
                steps = [1, 2, 3] if name.startswith("laws") else [1, 2]
                assert r["curve"]["step"] == steps and np.all(np.isfinite(r["curve"]["digits_fid"]))
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
    assert (tmp_path / "laws.png").is_file() and (tmp_path / "laws_weighted.png").is_file()
    assert "no verdict (2 of 5 paired seeds)" in tables  # the test size has 2 seeds per law
    assert "noise floor" in tables and "Wall time: 10 of 10 planned runs done" in tables
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


# --------------------------------------------------------------------------------------------
# The `laws` protocol and its statistics (experiments/stats.py, report's laws sections)

_STEPS = (250, 500, 750, 1000, 1250, 1500, 1750, 2000)


def _law_record(label, seed, fids, sampler="uniform", schedule="cosine", **extra):
    return {
        "run": f"{schedule}/{label}/seed{seed}", "seed": seed, "size": "cpu", "kind": "train",
        "settings": {"timesteps.sampler": sampler, **extra.pop("settings", {})},
        "curve": {"step": list(_STEPS), "digits_fid": [float(x) for x in fids]},
        "final_fid": float(fids[-1]), "wall_s": 600.0, "device": "CPU, 2 cores",
        "finished": "2026-11-29 16:00 UTC", "steps": 2000, "batch_size": 64, "image_size": 8,
        "eval_samples": 1797, "eval_sampler": "ddim20", "t_delta": None, **extra,
    }  # fmt: skip


def _uniform_curves(seeds, rng):
    """Decreasing FID curves, a different level per seed (what a seed does to a run)."""
    return {s: 30.0 * np.exp(-np.arange(8) / 3) + 10 + 4 * rng.random() for s in seeds}


def test_area_and_steps_to_reach_are_the_trapezoid_and_the_interpolated_crossing():
    steps, fid = [250, 500, 750, 1000], [40.0, 20.0, 10.0, 10.0]
    # (40+20)/2·250 + (20+10)/2·250 + (10+10)/2·250 = 13,750 over a range of 750
    assert stats.area_under_curve(steps, fid) == pytest.approx(13750 / 750)
    # 15 lies halfway down from 20 (step 500) to 10 (step 750): 500 + 0.5·250
    assert stats.steps_to_reach(steps, fid, 15.0) == pytest.approx(625.0)
    assert stats.steps_to_reach(steps, fid, 10.0) == 750.0  # first at it, not the last
    assert stats.steps_to_reach(steps, fid, 50.0) == 250.0  # at the first evaluation already
    assert stats.steps_to_reach(steps, fid, 5.0) is None
    scores = stats.run_scores(steps, fid, 15.0)
    assert scores["speedup"] == pytest.approx(1000 / 625) and scores["final_fid"] == 10.0
    assert stats.run_scores(steps, fid, 5.0)["speedup"] is None


def test_a_law_two_below_uniform_at_every_seed_differs_by_exactly_minus_two():
    rng = np.random.default_rng(0)
    uniform = {s: (_STEPS, c) for s, c in _uniform_curves(range(5), rng).items()}
    law = {s: (steps, c - 2.0) for s, (steps, c) in uniform.items()}
    scores, ref, diffs = stats.compare(law, uniform)
    for metric in ("final_fid", "auc"):
        assert diffs[metric].mean == pytest.approx(-2.0)
        assert diffs[metric].interval == pytest.approx((-2.0, -2.0))
        assert diffs[metric].effect == "better"
    # Uniform reaches its own final at the last step; the law 2 lower gets there earlier, by
    # the interpolated crossing of its curve with uniform's final, computed here by hand.
    for s, (steps, c) in uniform.items():
        assert ref[s]["steps"] == 2000 and ref[s]["speedup"] == 1.0
        i = int(np.argmax(c - 2.0 <= c[-1]))
        hand = steps[i - 1] + (c[i - 1] - 2 - c[-1]) / (c[i - 1] - c[i]) * 250
        assert scores[s]["steps"] == pytest.approx(hand)
    assert diffs["speedup"].effect == "better" and diffs["speedup"].mean > 0


def test_the_bootstrap_interval_ignores_the_order_of_seeds_and_matches_scipys():
    import scipy.stats

    values = [-1.3, -0.2, -2.1, -0.8, -1.5, 0.4, -1.1]
    interval = stats.bootstrap_interval(values)
    for perm in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
        assert stats.bootstrap_interval([values[i] for i in perm]) == interval
    ref = scipy.stats.bootstrap(
        (np.array(values),), np.mean, n_resamples=10_000, method="percentile", random_state=1
    ).confidence_interval
    # Monte-Carlo error of a 2.5 % quantile of 10,000 resampled means: about 0.03 of their sd.
    tol = 0.1 * np.std(values) / np.sqrt(len(values))
    assert interval == pytest.approx((ref.low, ref.high), abs=tol)


def test_the_bootstrap_interval_covers_the_true_mean_about_as_often_as_it_says():
    # Percentile bootstrap of a mean of n = 10 normal values covers about 91 % (it is narrower
    # than the t interval); 300 data sets give a binomial sd of 1.7 %.
    rng = np.random.default_rng(1)
    covered = [
        lo <= -1.0 <= hi
        for lo, hi in (
            stats.bootstrap_interval(-1.0 + rng.normal(size=10), resamples=2000) for _ in range(300)
        )
    ]
    assert 0.85 <= np.mean(covered) <= 0.98


def test_seed_order_and_record_order_do_not_change_the_laws_table():
    rng = np.random.default_rng(2)
    curves = _uniform_curves(range(10), rng)
    records = [_law_record("uniform", s, c) for s, c in curves.items()]
    records += [
        _law_record("logit_normal", s, curves[s] - 1 + rng.normal(size=8), "logit_normal")
        for s in range(5)
    ]
    table = report._law_rows("laws", records)
    shuffled = [records[i] for i in rng.permutation(len(records))]
    assert report._law_rows("laws", shuffled) == table


def test_laws_table_gives_verdicts_only_from_five_paired_seeds_and_shows_the_noise_floor():
    rng = np.random.default_rng(3)
    curves = _uniform_curves(range(10), rng)
    curves.update({s + 5: curves[s] + 1.0 for s in range(5)})  # seeds 5–9: seeds 0–4 plus 1
    records = [_law_record("uniform", s, c) for s, c in curves.items()]
    records += [_law_record("logit_normal", s, curves[s] - 2.0, "logit_normal") for s in range(5)]
    records += [_law_record("lognormal", s, curves[s] - 2.0, "lognormal") for s in range(4)]
    records += [_law_record("loss_aware", s, curves[s] + 50.0, "loss_aware") for s in range(5)]
    bs = {"timesteps.p": 0.8}
    records += [
        _law_record("bs", s, curves[s], "bernoulli", t_delta=800, settings=bs) for s in range(5)
    ]
    rows = {r["law"]: r for r in report._law_rows("laws", records)["cosine"]}
    assert rows["uniform"]["runs"] == "10 / 10" and rows["uniform"]["d_final"] == "0 (reference)"
    floor = rows["uniform, seeds 5, 6, 7, 8, 9 vs 0, 1, 2, 3, 4 (noise floor, unpaired)"]
    assert floor["d_final"] == "+1.00 [+1.00, +1.00]"
    assert rows["logit_normal"]["d_final"] == "-2.00 [-2.00, -2.00]"
    assert rows["logit_normal"]["verdict"] == "better final FID, better area, better speedup"
    assert rows["lognormal"]["runs"] == "4 / 5"  # the same gain, one seed short: no verdict
    assert rows["lognormal"]["verdict"] == "no verdict (4 of 5 paired seeds)"
    assert rows["loss_aware"]["reached"] == "0 of 5" and rows["loss_aware"]["d_speedup"] is None
    assert rows["loss_aware"]["verdict"] == (
        "worse final FID, worse area, uniform's final FID not reached at 5 of 5 seeds"
    )
    # p = 0.8 at t_δ = 800 is uniform but at t_δ: TV 0.001; the same curves: no difference.
    assert rows["bs"]["tv"] == "0.001" and rows["bs"]["verdict"] == "no difference"
    assert rows["bs"]["d_final"] == "+0.00 [+0.00, +0.00]"


def test_the_laws_protocol_at_the_cpu_size_can_tell_laws_apart():
    from scipy.stats import poisson

    size = specs.SIZES["cpu"]
    runs = specs.laws(size)
    assert {"uniform", "bs", "bs_p0.9_auto", "logit_normal", "lognormal", "loss_aware"} <= set(
        specs.LAWS
    )
    by_law = {}
    for run in runs:
        by_law.setdefault(run.name.split("/")[1], []).append(run.settings["seed"])
    assert by_law.pop("uniform") == list(range(10))  # two disjoint sets of 5: the noise floor
    assert all(seeds == [0, 1, 2, 3, 4] for seeds in by_law.values())
    config = runs[0].config(size)
    tc = config.train
    assert tc.num_steps == 2000 and tc.eval_samples >= 1797
    assert len(range(tc.eval_every, tc.num_steps + 1, tc.eval_every)) >= 8
    assert config.diffusion.schedule == "cosine" and size.law_schedules == ("cosine",)
    # Paired by seed: two laws' runs of one seed differ only in timesteps.*.
    flat = {}
    for run in runs:
        if run.settings["seed"] == 3:
            c = run.config(size).to_dict()
            flat[run.name] = {f"{k}.{f}": v for k, sec in c.items() if isinstance(sec, dict)
                              for f, v in sec.items()} | {"seed": c["seed"]}  # fmt: skip
    base = flat.pop("cosine/uniform/seed3")
    for name, other in flat.items():
        changed = {k for k in base.keys() | other.keys() if base.get(k) != other.get(k)}
        assert changed and all(k.startswith("timesteps.") for k in changed), name
    # Loss-aware's history fills within the first quarter of the run (draws uniform until then):
    # P(every one of T timesteps has ≥ H of the 64·s uniform draws), Poisson per timestep.
    la = next(r for r in runs if "/loss_aware/" in r.name).config(size)
    T, H = la.diffusion.num_timesteps, la.timesteps.history
    assert H * T <= tc.num_steps * tc.batch_size
    draws = tc.batch_size * tc.num_steps / 4 / T
    assert poisson.sf(H - 1, draws) ** T >= 0.95


def test_laws_weighted_combines_the_named_law_and_shares_the_unweighted_runs():
    size = specs.SIZES["cpu"]
    laws = {r.name: r for r in specs.laws(size)}
    runs = {r.name: r for r in specs.laws_weighted(size, "lognormal")}
    assert len(runs) == 3 * 2 * 5
    same = runs["cosine/none/lognormal/seed2"].config(size)
    assert sweep.workdir_for(same, sweep.ROOT) == sweep.workdir_for(
        laws["cosine/lognormal/seed2"].config(size), sweep.ROOT
    )
    c = runs["cosine/min_snr/lognormal/seed2"].config(size)
    assert (c.loss.weighting, c.loss.min_snr_gamma, c.timesteps.sampler) == (
        "min_snr",
        5.0,
        "lognormal",
    )
    assert runs["cosine/p2/uniform/seed4"].config(size).loss.weighting == "p2"
    assert specs.BEST_LAW in specs.LAWS
    with pytest.raises(ValueError, match="--law='uniform' is not a law to combine"):
        specs.laws_weighted(size, "uniform")


def test_law_is_refused_for_other_experiments(tmp_path, capsys):
    assert sweep.main(["speedup", "--law=lognormal", f"--out={tmp_path}"]) == 2
    assert "--law applies to laws_weighted only" in capsys.readouterr().err
    assert sweep.main(["laws_weighted", "--law=nope", "--size=test", f"--out={tmp_path}"]) == 2
    assert "--law='nope' is not a law to combine" in capsys.readouterr().err
    assert sweep.main(["laws", "--only=*/nope/*", "--size=test", f"--out={tmp_path}"]) == 2
    assert "--only='*/nope/*' matches no run of laws" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_only_runs_the_matching_runs_and_a_later_full_sweep_skips_them(tmp_path, monkeypatch):
    trained = []

    def fake_train(config, workdir):
        trained.append((config.seed, config.timesteps.sampler))
        artifacts.append_jsonl(
            [{"step": s, "eval/digits_fid": 10.0 / s} for s in (1, 2, 3)],
            f"{workdir}/{artifacts.METRICS_FILE}",
        )
        return type("State", (), {"step": np.int32(config.train.num_steps)})()

    monkeypatch.setattr(sweep.train, "train_and_evaluate", fake_train)
    out = tmp_path / "out"
    records = sweep.run_experiment("laws", "test", out, only="cosine/uniform/seed1")
    assert [r["run"] for r in records] == ["cosine/uniform/seed1"] and trained == [(1, "uniform")]
    monkeypatch.setattr(specs, "LAWS", {"uniform": specs.UNIFORM})  # no locating in this test
    records = sweep.run_experiment("laws", "test", out)
    assert [r["run"] for r in records] == [f"cosine/uniform/seed{s}" for s in range(4)]
    assert [seed for seed, _ in trained] == [1, 0, 2, 3]  # seed 1 trained once
