"""Tables and figures of `experiments/REPORT.md` from the sweep's JSON lines.

    python -m experiments.report --size=cpu [--into=experiments/REPORT.md]

Reads `experiments/results/<size>/<experiment>.jsonl` and writes, beside them, `tables.md`
(every table of the report, with seeds, steps, wall time and device) and one PNG per figure.
With --into, the same tables also replace the text between `<!-- tables:<size> -->` and
`<!-- /tables:<size> -->` in that file (the report's prose stays as written).
Experiments not run yet are listed as such. Speedup is measured as in the paper: the steps
ADM needs to reach its best digits-FID, over the steps ADM-BS needs to reach that score.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddpm_bs import artifacts
from experiments import specs, sweep


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


SECTIONS = {
    "ot_decay": ("1. OT decay (Figure 1b)", ot_decay),
    "speedup": ("2. Speedup (Tables 1 and 4)", speedup_section),
    "ablations": ("3. Ablations of p and t_δ/T (Figures 5 and 6)", ablations),
    "combinations": ("4. Combinations with loss weightings (Table 2)", combinations),
    "samplers": ("5. Fast samplers (Table 3)", samplers),
    "timestep_samplers": ("6. Other timestep samplers at equal compute", timestep_samplers),
}


def write_tables(out: pathlib.Path, link: str = "") -> str:
    """Writes the figures and `<out>/tables.md` from `<out>/*.jsonl`; returns the markdown.

    `link` prefixes the figures' paths in the markdown (for a file in another directory).
    """
    lines = [f"<!-- written by python -m experiments.report from {out.name}/*.jsonl -->", ""]
    for experiment, (title, section) in SECTIONS.items():
        records = artifacts.read_jsonl(sweep.results_path(out, experiment))
        lines += [f"### {title}", ""]
        if not records:
            lines += ["*Not run yet at this size.*", ""]
            continue
        lines += [_provenance(records), "", *section(records, out, link)]
    text = "\n".join(lines)
    if not link:
        artifacts.write_bytes(text.encode(), str(out / "tables.md"))
    return text


def replace_between_markers(path: pathlib.Path, size: str, text: str) -> None:
    """Replaces what stands between `<!-- tables:size -->` and `<!-- /tables:size -->`."""
    begin, end = f"<!-- tables:{size} -->", f"<!-- /tables:{size} -->"
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
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or sweep.ROOT / "results" / args.size)
    print(write_tables(out))
    if args.into:
        into = pathlib.Path(args.into)
        link = os.path.relpath(out, into.resolve().parent) + "/"
        replace_between_markers(into, args.size, write_tables(out, link))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
