"""Top XLA ops by time, from a `jax.profiler` trace: the profile summary of `bench/RESULTS.md`.

    with jax.profiler.trace(trace_dir):
        ...  # run the compiled function `calls` times, blocking at the end
    for record in top_ops(trace_dir, calls=calls, k=10): print(json.dumps(record))

Op times come from the device's "XLA Ops" timeline where the trace has one (GPU, TPU), and
otherwise from the host's XLA:CPU thunks (the events carrying an `hlo_op` stat). Times are
summed over devices and divided by `calls` and the number of devices, so `ms_per_call` is
what one call spends in that op on one device; `share` is the op's part of all op time.
On a CPU several ops run at once on the thread pool, so op time there can exceed wall time.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import jax

DEVICE_OPS_LINE = "XLA Ops"


def latest_xspace(trace_dir: str | Path) -> Path:
    """The newest `*.xplane.pb` that `jax.profiler.trace(trace_dir)` wrote."""
    files = sorted(Path(trace_dir).glob("plugins/profile/*/*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}/plugins/profile/")
    return max(files, key=lambda f: f.stat().st_mtime)


def op_times(profile: jax.profiler.ProfileData) -> tuple[dict[str, list[float]], int]:
    """{op name: [duration in ns, …]} over the trace, and the number of devices it covers.

    In order of preference: the devices' "XLA Ops" lines; the devices' kernel events that
    carry an `hlo_op` stat (several kernels of one op add up); the host's XLA:CPU thunks.
    """
    devices = [p for p in profile.planes if p.name.startswith("/device:")]
    hosts = [p for p in profile.planes if p.name.startswith("/host:")]
    for planes, ops_line_only in ((devices, True), (devices, False), (hosts, False)):
        times: dict[str, list[float]] = collections.defaultdict(list)
        ordinals = set()
        for plane in planes:
            for line in plane.lines:
                if ops_line_only and line.name != DEVICE_OPS_LINE:
                    continue
                for event in line.events:
                    stats = dict(event.stats)
                    if ops_line_only or "hlo_op" in stats:
                        times[str(stats.get("hlo_op", event.name))].append(event.duration_ns)
                        ordinals.add(
                            plane.name if planes is devices else stats.get("device_ordinal")
                        )
        if times:
            return dict(times), max(len(ordinals), 1)
    return {}, 1


def describe_ops(hlo_text: str) -> dict[str, str]:
    """{instruction name: "opcode[kind] shape | JAX op_name"} from a compiled module's text
    (`compiled.as_text()`), so that a profile's `fusion.12` reads as what it computes."""
    described = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        shape = re.sub(r"\{[^{}]*\}", "", shape)  # drop layouts: bf16[8,32]{1,0} -> bf16[8,32]
        kind = re.search(r"\bkind=k(\w+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        described[name] = " ".join(
            part
            for part in (
                opcode + (f"[{kind.group(1)}]" if kind else ""),
                shape if len(shape) <= 60 else shape[:57] + "...",
                f"| {op_name.group(1)}" if op_name else "",
            )
            if part
        )
    return described


# "  %fusion.12 = bf16[128,32,32,256]{3,2,1,0} fusion(...), kind=kLoop, ..." (ROOT, tuples too)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\(")


def top_ops(
    trace_dir: str | Path, *, calls: int, k: int = 10, hlo_text: str | None = None
) -> list[dict]:
    """The `k` ops with the most time per call, largest first, as JSON-ready records; with
    the compiled module's `hlo_text`, each record also says what the op is (`describe_ops`)."""
    profile = jax.profiler.ProfileData.from_file(str(latest_xspace(trace_dir)))
    times, devices = op_times(profile)
    if not times:
        raise ValueError(f"the trace in {trace_dir} holds no XLA op events")
    total = sum(sum(d) for d in times.values())
    ranked = sorted(times.items(), key=lambda item: -sum(item[1]))[:k]
    described = describe_ops(hlo_text) if hlo_text else {}
    return [
        {
            "rank": rank,
            "op": name,
            "what": described.get(name),
            "ms_per_call": round(sum(durations) / 1e6 / calls / devices, 4),
            "runs_per_call": round(len(durations) / calls / devices, 2),
            "share": round(sum(durations) / total, 4),
        }
        for rank, (name, durations) in enumerate(ranked, start=1)
    ]


def profile(call, *, calls: int, trace_dir: str | Path, hlo_text: str | None = None, k=10):
    """Runs `call()` `calls` times under `jax.profiler.trace(trace_dir)`, blocking on the last
    result, and returns `top_ops` of that trace (the trace stays for TensorBoard or xprof)."""
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
    return top_ops(trace_dir, calls=calls, k=k, hlo_text=hlo_text)
