"""Tables and figures of `experiments/REPORT.md` from the sweep's JSON lines.

    python -m experiments.report --size=cpu [--into=experiments/REPORT.md] [--answer_into=README.md]

Reads `experiments/results/<size>/<experiment>.jsonl` and writes, beside them, `tables.md`
(every table of the report, with seeds, steps, wall time and device) and one PNG per figure.
With --into, the same tables also replace the text between `<!-- tables:<size> -->` and
`<!-- /tables:<size> -->` in that file (the report's prose stays as written).
With --answer_into, the `laws` answer table replaces the text between `<!-- laws:<size> -->`
and `<!-- /laws:<size> -->` (the README's "Which timestep law should I use?").
Experiments not run yet are listed as such. Speedup is measured as in the paper: the steps
ADM needs to reach its best digits-FID, over the steps ADM-BS needs to reach that score; the
`laws` sections compare over seeds with intervals (`experiments/stats.py`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddpm_bs import artifacts, timesteps
from experiments import specs, stats, sweep


def first_step_reaching(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first step whose value is ≤ target, or None if no value reaches it."""
    for step, value in zip(steps, values, strict=True):
        if value <= target:
            return int(step)
    return None


def speedup(
    base_steps: Sequence[int], base: Sequence[float], new_steps: Sequence[int], new: Sequence[float]
) -> dict[str, Any]:
    """How much sooner `new` reaches the best value of `base` (lower is better).

    Returns {'target': base's best, 'base_steps': the step it is first reached,
    'new_steps': the first step of `new` at or below it (None if never), 'ratio':
    base_steps / new_steps (None if never reached)}.
    """
    target = float(np.min(base))
    at = first_step_reaching(base_steps, base, target)
    reached = first_step_reaching(new_steps, new, target)
    return {
        "target": target,
        "base_steps": at,
        "new_steps": reached,
        "ratio": at / reached if reached else None,
    }


def mean_curve(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean FID, std FID) over the records' seeds at their common evaluation steps."""
    steps = records[0]["curve"]["step"]
    for r in records:
        if r["curve"]["step"] != steps:
            raise ValueError(f"{r['run']}: evaluated at other steps than {records[0]['run']}.")
    values = np.array([r["curve"]["digits_fid"] for r in records], dtype=np.float64)
    return np.asarray(steps), values.mean(0), values.std(0)


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _provenance(records: list[dict[str, Any]]) -> str:
    wall = sum(r.get("wall_s") or 0.0 for r in records)
    devices = sorted({r["device"] for r in records})
    dates = sorted(r["finished"] for r in records)
    seeds = sorted({r["seed"] for r in records if "seed" in r})
    parts = [f"{len(records)} runs", f"device: {', '.join(devices)}"]
    if seeds:
        parts.append(f"seeds {', '.join(map(str, seeds))}")
    train = [r for r in records if r["kind"] == "train"]
    if train:
        r = train[0]
        parts.append(
            f"{r['steps']} steps × batch {r['batch_size']} at {r['image_size']}×{r['image_size']}, "
            f"digits-FID of {r['eval_samples']} {r['eval_sampler'].upper()} samples"
        )
    parts.append(f"wall {wall / 60:.1f} min in all (shared runs counted once per experiment)")
    parts.append(f"finished {dates[0]} – {dates[-1]}")
    return "*" + "; ".join(parts) + ".*"


def _by_name(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in records}


# --------------------------------------------------------------------------------------------
# One section per experiment: (markdown lines, figures written)


def ot_decay(records, out: pathlib.Path, link: str) -> list[str]:
    from matplotlib.figure import Figure

    rows = [
        [
            r["run"].split("/")[-1],
            r["schedule"],
            r["decay_rate"],
            r["t_delta"],
            r["fraction"],
            r["t_delta_from_rate"],
        ]
        for r in records
    ]
    schedules = sorted({r["schedule"] for r in records})
    fig = Figure(figsize=(5 * len(schedules), 3.6))
    for i, schedule in enumerate(schedules):
        ax = fig.add_subplot(1, len(schedules), i + 1)
        for r in records:
            if r["schedule"] == schedule:
                (line,) = ax.plot(r["timesteps"], r["ratio"], label=r["run"].split("/")[-1])
                k, s = r["decay_rate"], np.asarray(r["s"])
                ax.plot(r["timesteps"], np.exp(-k * s), ls=":", color=line.get_color())
        ax.axhline(0.1, color="k", lw=0.8, ls="--")
        ax.set(title=f"{schedule}: W₂(t)/W₂(0) (dotted: e^(−K·s(t)) fit)", xlabel="t", yscale="log")
        ax.legend(fontsize=7, title="classes", title_fontsize=7)
    fig.tight_layout()
    artifacts.save_figure(fig, str(out / "ot_decay.png"), dpi=100)
    return [
        f"![OT decay]({link}ot_decay.png)",
        "",
        *_table(
            ["classes", "schedule", "fitted K", "t_δ (W₂ ratio < δ)", "t_δ/T", "t_δ from K"], rows
        ),
    ]


def _curve(record):
    return record["curve"]["step"], record["curve"]["digits_fid"]


def _speedup_rows(records):
    """A row per schedule over the seeds both methods finished (paired by seed)."""
    rows, curves = [], {}
    for schedule in sorted({r["settings"]["diffusion.schedule"] for r in records}):
        group = {}
        for method in specs.METHODS:
            runs = [r for r in records if r["run"].startswith(f"{schedule}/{method}/")]
            group[method] = {r["seed"]: r for r in runs}
        seeds = sorted(set(group["uniform"]) & set(group["bs"]))
        if not seeds:
            continue
        group = {m: [g[s] for s in seeds] for m, g in group.items()}
        (bs, bm, bsd), (ns, nm, nsd) = mean_curve(group["uniform"]), mean_curve(group["bs"])
        curves[schedule] = ((bs, bm, bsd), (ns, nm, nsd))
        mean = speedup(bs, bm, ns, nm)
        per_seed = [
            speedup(*_curve(u), *_curve(b))["ratio"]
            for u, b in zip(group["uniform"], group["bs"], strict=True)
        ]
        rows.append(
            [
                schedule,
                len(group["uniform"]),
                f"{bm.min():.2f} ± {bsd[np.argmin(bm)]:.2f}",
                f"{nm.min():.2f} ± {nsd[np.argmin(nm)]:.2f}",
                f"{bm[-1]:.2f} / {nm[-1]:.2f}",
                mean["base_steps"],
                mean["new_steps"],
                _fmt(mean["ratio"]) + ("×" if mean["ratio"] else " (not reached)"),
                ", ".join(_fmt(x) for x in per_seed),
            ]
        )
    return rows, curves


def speedup_section(records, out: pathlib.Path, link: str) -> list[str]:
    from matplotlib.figure import Figure

    rows, curves = _speedup_rows(records)
    fig = Figure(figsize=(5 * max(1, len(curves)), 3.6))
    for i, (schedule, pair) in enumerate(sorted(curves.items())):
        ax = fig.add_subplot(1, len(curves), i + 1)
        for label, (steps, mean, std) in zip(("ADM (uniform)", "ADM-BS"), pair, strict=True):
            ax.plot(steps, mean, marker="o", ms=3, label=label)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set(
            title=f"{schedule} schedule", xlabel="training step", ylabel="digits-FID", yscale="log"
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, str(out / "speedup.png"), dpi=100)
    header = [
        "schedule",
        "seeds",
        "ADM best (mean ± sd)",
        "BS best",
        "final ADM / BS",
        "ADM steps to its best",
        "BS steps to it",
        "speedup (seed mean)",
        "speedup per seed",
    ]
    return [f"![speedup]({link}speedup.png)", "", *_table(header, rows)]


def _seed_summary(records, reference: str = "uniform") -> list[str]:
    """A row per setting (the run name less its /seedN): its seeds, final digits-FID (mean ± sd
    over seeds), and the paired difference from `reference` at the same seed (mean ± sd; < 0 is
    better). Pairing by seed takes out what a seed does to both runs (init, data order)."""
    settings: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        settings.setdefault(r["run"].rsplit("/", 1)[0], {})[r["seed"]] = r
    ref = settings.get(reference, {})

    def mean_sd(values):  # "+1.23 ± 0.45" (sd over seeds), "+1.23" for one seed
        values = np.asarray(values, dtype=np.float64)
        if not values.size:
            return None
        sd = f" ± {values.std(ddof=1):.2f}" if values.size > 1 else ""
        return f"{values.mean():+.2f}{sd}"

    rows = []
    for setting, runs in settings.items():
        seeds = sorted(runs)
        finals = [runs[s]["final_fid"] for s in seeds]
        paired = [runs[s]["final_fid"] - ref[s]["final_fid"] for s in seeds if s in ref]
        t_deltas = sorted(
            {
                runs[s]["t_delta"]
                for s in seeds
                if runs[s]["settings"].get("timesteps.sampler") == "bernoulli"
            }
        )
        rows.append(
            [
                setting,
                len(seeds),
                mean_sd(finals).lstrip("+"),
                mean_sd(paired) if setting != reference else "0 (reference)",
                ", ".join(f"{x:.2f}" for x in finals),
                ", ".join(map(str, t_deltas)) or None,
                sum(runs[s]["wall_s"] for s in seeds) / 60,
            ]
        )
    header = [
        "setting",
        "seeds",
        "final digits-FID",
        f"paired difference from {reference}",
        "final per seed",
        "t_δ",
        "wall min",
    ]
    return _table(header, rows)


def ablations(records, out: pathlib.Path, link: str) -> list[str]:
    return _seed_summary(records)


def combinations(records, out: pathlib.Path, link: str) -> list[str]:
    by = _by_name(records)
    rows = []
    for name, r in by.items():
        weighting, method, seed = name.split("/")
        if method == "uniform":
            b = by.get(f"{weighting}/bs/{seed}")
            rows.append(
                [
                    weighting,
                    r["seed"],
                    r["best_fid"],
                    b and b["best_fid"],
                    r["final_fid"],
                    b and b["final_fid"],
                ]
            )
    header = ["weighting", "seed", "best FID alone", "best FID + BS", "final alone", "final + BS"]
    return _table(header, rows)


def samplers(records, out: pathlib.Path, link: str) -> list[str]:
    methods = list(dict.fromkeys(r["run"].split("/")[1] for r in records))
    steps = sorted({r["steps"] for r in records})
    by = _by_name(records)
    rows = []
    for model in specs.METHODS:
        for n in steps:
            rows.append(
                [
                    f"{'ADM-BS' if model == 'bs' else 'ADM'}",
                    n,
                    *[by.get(f"{model}/{m}/{n}", {}).get("digits_fid") for m in methods],
                ]
            )
    return _table(["model", "NFE", *methods], rows)


def timestep_samplers(records, out: pathlib.Path, link: str) -> list[str]:
    return _seed_summary(records)


# --------------------------------------------------------------------------------------------
# Timestep laws on the longer protocol (`laws`, `laws_weighted`): paired by seed, with intervals.


def _split_name(name: str) -> tuple[str, str, int]:
    """'cosine/min_snr/ot_gap/seed3' → ('cosine', 'min_snr/ot_gap', 3)."""
    schedule, rest = name.split("/", 1)
    label, seed = rest.rsplit("/seed", 1)
    return schedule, label, int(seed)


def _grouped(names_and_records, order=()) -> dict[str, dict[str, dict[int, Any]]]:
    """schedule → label → seed → item, from (run name, item) pairs; schedules and seeds
    sorted, labels in `order` (the plan's), then any others as they come."""
    groups: dict[str, dict[str, dict[int, Any]]] = {}
    for name, item in names_and_records:
        schedule, label, seed = _split_name(name)
        groups.setdefault(schedule, {}).setdefault(label, {})[seed] = item
    rank = {label: i for i, label in enumerate(order)}
    return {
        schedule: {
            label: dict(sorted(by_label[label].items()))
            for label in sorted(by_label, key=lambda x: rank.get(x, len(rank)))
        }
        for schedule, by_label in sorted(groups.items())
    }


def _planned(experiment: str, records) -> dict[str, dict[str, int]]:
    """schedule → label → runs planned, at the records' size (laws_weighted: for each law run)."""
    size = specs.SIZES[records[0]["size"]]
    if experiment == "laws":
        runs = specs.laws(size)
    else:
        found = {_split_name(r["run"])[1].split("/")[1] for r in records} - {"uniform"}
        runs = [run for law in sorted(found) for run in specs.laws_weighted(size, law)]
    groups = _grouped((run.name, run) for run in runs)
    return {schedule: {k: len(v) for k, v in g.items()} for schedule, g in groups.items()}


def _interval(d: stats.Difference) -> str | None:
    if d.mean is None:
        return None
    lo, hi = d.interval
    text = f"{d.mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    n = len(d.missing) + len(d.seeds)
    return text + (f" (not reached at {len(d.missing)} of {n} seeds)" if d.missing else "")


def _verdict(diffs: dict[str, stats.Difference]) -> str:
    """'better final FID, worse AUC', 'no difference', or why there is no verdict yet."""
    n = len(diffs["final_fid"].seeds)
    if n < stats.MIN_SEEDS:
        return f"no verdict ({n} of {stats.MIN_SEEDS} paired seeds)"
    names = {"final_fid": "final FID", "auc": "area", "speedup": "speedup"}
    parts = [f"{d.effect} {names[m]}" for m, d in diffs.items() if d.effect in ("better", "worse")]
    missing = diffs["speedup"].missing
    if missing:
        parts.append(f"uniform's final FID not reached at {len(missing)} of {n} seeds")
    return ", ".join(parts) or "no difference"


def _tv_from_uniform(runs: dict[int, dict[str, Any]]) -> str | None:
    """Total-variation distance of a Bernoulli law from uniform, at each seed's t_δ."""
    tvs = set()
    for r in runs.values():
        if r["settings"].get("timesteps.sampler") == "bernoulli":
            T = 1000  # diffusion.num_timesteps in every run of specs
            probs = timesteps.bernoulli(T, r["t_delta"], r["settings"]["timesteps.p"]).probs
            tvs.add(round(0.5 * float(np.abs(probs - 1 / T).sum()), 3))
    if not tvs:
        return None
    return f"{min(tvs):.3f}" + (f"–{max(tvs):.3f}" if len(tvs) > 1 else "")


def _law_row(label, runs, reference, planned) -> dict[str, Any]:
    """One law's row: runs done, scores, paired differences from `reference` and a verdict."""
    law, _, diffs = stats.compare(
        {s: _curve(r) for s, r in runs.items()}, {s: _curve(r) for s, r in reference.items()}
    )
    finals = [r["final_fid"] for r in runs.values()]
    reached = [s for s, x in law.items() if x["steps"] is not None]
    speedups = [law[s]["speedup"] for s in reached]
    return {
        "law": label,
        "runs": f"{len(runs)} / {planned}",
        "final": f"{np.mean(finals):.2f} ({min(finals):.2f}–{max(finals):.2f})",
        "d_final": _interval(diffs["final_fid"]),
        "d_auc": _interval(diffs["auc"]),
        "reached": f"{len(reached)} of {len(law)}",
        "speedup": f"{np.mean(speedups):.2f}×" if speedups else None,
        "d_speedup": _interval(diffs["speedup"]),
        "tv": _tv_from_uniform(runs),
        "verdict": _verdict(diffs),
        "wall": np.mean([r["wall_s"] for r in runs.values()]) / 60,
    }


_LAW_COLUMNS = {
    "law": "law",
    "runs": "runs done / planned",
    "final": "final FID, mean (min–max)",
    "d_final": "Δ final FID [95 % CI]",
    "d_auc": "Δ area [95 % CI]",
    "reached": "seeds reaching uniform's final",
    "speedup": "speedup, mean",
    "d_speedup": "Δ speedup [95 % CI]",
    "tv": "TV from uniform",
    "verdict": "verdict",
    "wall": "wall min / run",
}
_ANSWER_COLUMNS = ("law", "runs", "d_final", "d_auc", "speedup", "verdict")


def _law_rows(experiment: str, records) -> dict[str, list[dict[str, Any]]]:
    """schedule → rows: each law against uniform (laws_weighted: against uniform with the same
    weighting) over the paired seeds, and uniform's two disjoint seed sets (the noise floor)."""
    size = specs.SIZES[records[0]["size"]]
    planned = _planned(experiment, records)
    order = [label for g in planned.values() for label in g]
    tables = {}
    for schedule, groups in _grouped(((r["run"], r) for r in records), order).items():
        rows = []
        for label, runs in groups.items():
            *weighting, law = label.split("/")
            ref_label = "/".join((*weighting, "uniform"))
            reference = {s: r for s, r in groups.get(ref_label, {}).items() if s in size.law_seeds}
            mine = {s: r for s, r in runs.items() if s in size.law_seeds}
            if not mine:
                continue
            row = _law_row(label, mine, reference, planned[schedule][label])
            if law == "uniform":
                row.update(d_final="0 (reference)", d_auc=None, d_speedup=None, verdict="")
                row["runs"] = f"{len(runs)} / {planned[schedule][label]}"
                others = sorted(s for s in runs if s not in size.law_seeds)
                if others:  # seeds 5–9 against 0–4, pair by pair: nothing shared but the law
                    pairs = dict(zip(sorted(size.law_seeds), others, strict=False))
                    floor = {a: runs[b] for a, b in pairs.items() if a in reference}
                    noise = _law_row(label, floor, reference, len(others))
                    noise["law"] = (
                        f"{label}, seeds {', '.join(map(str, others))} vs "
                        f"{', '.join(map(str, sorted(floor)))} (noise floor, unpaired)"
                    )
                    noise["runs"] = f"{len(others)} / {len(others)}"
                    rows.append(row)
                    rows.append(noise)
                    continue
            rows.append(row)
        tables[schedule] = rows
    return tables


def _render(rows: list[dict[str, Any]], columns) -> list[str]:
    return _table([_LAW_COLUMNS[c] for c in columns], [[r[c] for c in columns] for r in rows])


def _law_figure(experiment: str, records, out: pathlib.Path) -> str:
    """FID against steps per law: mean over the paired seeds, band min–max over them."""
    from matplotlib.figure import Figure

    size = specs.SIZES[records[0]["size"]]
    groups = _grouped((r["run"], r) for r in records if r["seed"] in size.law_seeds)
    fig = Figure(figsize=(6.5 * len(groups), 4.2))
    for i, (schedule, by_label) in enumerate(sorted(groups.items())):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for label, runs in by_label.items():
            curves = [_curve(r) for r in runs.values()]
            steps = curves[0][0]
            if any(c[0] != steps for c in curves):
                raise ValueError(f"{schedule}/{label}: seeds evaluated at different steps.")
            values = np.array([c[1] for c in curves], np.float64)
            ax.plot(steps, values.mean(0), marker="o", ms=3, label=f"{label} ({len(curves)})")
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
        ax.set(
            title=f"{schedule}: mean over seeds, band min–max",
            xlabel="training step",
            ylabel="digits-FID",
            yscale="log",
        )
        ax.legend(fontsize=7, title="law (seeds)", title_fontsize=7)
    fig.tight_layout()
    name = f"{experiment}.png"
    artifacts.save_figure(fig, str(out / name), dpi=100)
    return name


def _wall_line(experiment: str, records) -> str:
    """Wall time per run and for the experiment so far, and the rest at that rate."""
    walls = np.array([r["wall_s"] for r in records]) / 60
    planned = sum(sum(g.values()) for g in _planned(experiment, records).values())
    return (
        f"Wall time: {len(records)} of {planned} planned runs done, {walls.sum() / 60:.1f} h "
        f"in all, {walls.mean():.1f} min per run (range {walls.min():.1f}–{walls.max():.1f}) "
        f"on {', '.join(sorted({r['device'] for r in records}))}; all {planned} runs would take "
        f"about {walls.mean() * planned / 60:.1f} h at that rate."
    )


_LAW_METHOD = (
    "Each law is compared with uniform at the same seed (same initialisation, data order, "
    "noise and evaluation samples; only the timestep law differs). Per run: the final "
    "digits-FID; the area under its FID-vs-steps curve (trapezoid over the evaluations, "
    "divided by the step range); the steps to reach uniform's final FID at that seed "
    "(interpolated linearly between evaluations); speedup = last step / those steps. "
    "Δ = law − uniform at each seed; [95 % CI] is the percentile bootstrap interval of the mean "
    f"Δ over seeds ({stats.RESAMPLES:,} resamples, generator seed {stats.BOOTSTRAP_SEED}). A law "
    f"is better or worse only where that interval excludes zero, with ≥ {stats.MIN_SEEDS} "
    "paired seeds; fewer is no verdict. The noise-floor row compares uniform's extra seeds "
    "with its paired ones, pair by pair: two sets of the same law that share nothing."
)


def laws_section(records, out: pathlib.Path, link: str, experiment: str = "laws") -> list[str]:
    figure = _law_figure(experiment, records, out)
    lines = [f"![{experiment}]({link}{figure})", "", _LAW_METHOD, ""]
    for schedule, rows in _law_rows(experiment, records).items():
        lines += [f"**{schedule} schedule**", "", *_render(rows, _LAW_COLUMNS)]
    return [*lines, _wall_line(experiment, records), ""]


def laws_weighted_section(records, out: pathlib.Path, link: str) -> list[str]:
    return laws_section(records, out, link, "laws_weighted")


def laws_answer(out: pathlib.Path, link: str = "") -> str:
    """The README's answer table from `<out>/laws.jsonl`, or what has (not) run yet."""
    records = artifacts.read_jsonl(sweep.results_path(out, "laws"))
    if not records:
        return "*The `laws` comparison has not finished a run at this size yet: no answer from it.*"
    lines = [_wall_line("laws", records), "", f"![laws]({link}laws.png)", ""]
    for schedule, rows in _law_rows("laws", records).items():
        lines += [f"**{schedule} schedule**", "", *_render(rows, _ANSWER_COLUMNS)]
    return "\n".join(lines)


SECTIONS = {
    "ot_decay": ("1. OT decay (Figure 1b)", ot_decay),
    "speedup": ("2. Speedup (Tables 1 and 4)", speedup_section),
    "ablations": ("3. Ablations of p and t_δ/T (Figures 5 and 6)", ablations),
    "combinations": ("4. Combinations with loss weightings (Table 2)", combinations),
    "samplers": ("5. Fast samplers (Table 3)", samplers),
    "timestep_samplers": ("6. Other timestep samplers at equal compute", timestep_samplers),
    "laws": ("7. Timestep laws, paired over seeds, on the longer protocol", laws_section),
    "laws_weighted": (
        "8. A law that differs from uniform, with Min-SNR-5 and P2",
        laws_weighted_section,
    ),
}


def write_tables(out: pathlib.Path, link: str = "", size: str | None = None) -> str:
    """Writes the figures and `<out>/tables.md` from `<out>/*.jsonl`; returns the markdown.

    `link` prefixes the figures' paths in the markdown (for a file in another directory);
    with `size`, an experiment not run yet says how many runs it plans.
    """
    lines = [f"<!-- written by python -m experiments.report from {out.name}/*.jsonl -->", ""]
    for experiment, (title, section) in SECTIONS.items():
        records = artifacts.read_jsonl(sweep.results_path(out, experiment))
        lines += [f"### {title}", ""]
        if not records:
            plan = ""
            if size is not None:
                runs = {r.name for r in specs.EXPERIMENTS[experiment](specs.SIZES[size])}
                plan = f" ({len(runs)} runs planned)"
            lines += [f"*Not run yet at this size{plan}.*", ""]
            continue
        lines += [_provenance(records), "", *section(records, out, link)]
    text = "\n".join(lines)
    if not link:
        artifacts.write_bytes(text.encode(), str(out / "tables.md"))
    return text


def replace_between_markers(path: pathlib.Path, size: str, text: str, name: str = "tables") -> None:
    """Replaces what stands between `<!-- name:size -->` and `<!-- /name:size -->`."""
    begin, end = f"<!-- {name}:{size} -->", f"<!-- /{name}:{size} -->"
    document = path.read_text()
    if begin not in document or end not in document:
        raise ValueError(f"{path} has no {begin} … {end} markers to write the tables between.")
    head, rest = document.split(begin, 1)
    tail = rest.split(end, 1)[1]
    artifacts.write_bytes(f"{head}{begin}\n{text}\n{end}{tail}".encode(), str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu", choices=list(specs.SIZES))
    parser.add_argument("--out", default=None, help="default: experiments/results/<size>")
    parser.add_argument("--into", default=None, help="a markdown file with tables markers")
    parser.add_argument(
        "--answer_into", default=None, help="a markdown file with laws markers (the README)"
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or sweep.ROOT / "results" / args.size)
    print(write_tables(out, size=args.size))
    if args.into:
        into = pathlib.Path(args.into)
        link = os.path.relpath(out, into.resolve().parent) + "/"
        replace_between_markers(into, args.size, write_tables(out, link, args.size))
    if args.answer_into:
        into = pathlib.Path(args.answer_into)
        link = os.path.relpath(out, into.resolve().parent) + "/"
        replace_between_markers(into, args.size, laws_answer(out, link), "laws")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
