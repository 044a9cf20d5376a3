"""Top XLA ops by time, from a `jax.profiler` trace: the profile summary of `bench/RESULTS.md`.

    with jax.profiler.trace(trace_dir):
        ...  # run the compiled function `calls` times, blocking at the end
    for record in top_ops(trace_dir, calls=calls, k=10): print(json.dumps(record))

`top_ops(..., by="group")` ranks groups of ops instead: the pass and JAX primitive each comes
from ("backward conv_general_dilated"), which says where the time goes when no single op does.

Op times come from the device's "XLA Ops" timeline where the trace has one (GPU, TPU), and
otherwise from the host's XLA:CPU thunks (the events carrying an `hlo_op` stat). Times are
summed over devices and divided by `calls` and the number of devices, so `ms_per_call` is
what one call spends in that op on one device; `share` is the op's part of all op time.
Given the compiled module's text, only that module's ops count.
On a CPU several ops run at once on the thread pool, so op time there can exceed wall time.
"""

from __future__ import annotations

import collections
import re
import warnings
from pathlib import Path

import jax

DEVICE_OPS_LINE = "XLA Ops"


def latest_xspace(trace_dir: str | Path) -> Path:
    """The newest `*.xplane.pb` that `jax.profiler.trace(trace_dir)` wrote."""
    files = list(Path(trace_dir).glob("plugins/profile/*/*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}/plugins/profile/")
    return max(files, key=lambda f: f.stat().st_mtime)


def op_times(
    profile: jax.profiler.ProfileData, module: str | None = None
) -> tuple[dict[str, list[float]], int]:
    """{op name: [duration in ns, …]} over the trace, and the number of devices it covers.

    In order of preference: the devices' "XLA Ops" lines; the devices' kernel events that
    carry an `hlo_op` stat (several kernels of one op add up); the host's XLA:CPU thunks.
    With `module` (`module_name(hlo_text)`), events whose `hlo_module` stat names another
    module are left out: a computation still in flight when the trace began (the inputs'
    random numbers, an earlier step) would otherwise count as ops of the one profiled.
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
                    if not (ops_line_only or "hlo_op" in stats):
                        continue
                    if module and stats.get("hlo_module", module) != module:
                        continue
                    times[str(stats.get("hlo_op", event.name))].append(event.duration_ns)
                    ordinals.add(plane.name if planes is devices else stats.get("device_ordinal"))
        if times:
            return dict(times), max(len(ordinals), 1)
    return {}, 1


def module_name(hlo_text: str) -> str | None:
    """The module's name from its text's `HloModule jit_f, ...` header, as traces name it."""
    match = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.MULTILINE)
    return match.group(1) if match else None


def describe_ops(hlo_text: str) -> dict[str, str]:
    """{instruction name: "opcode[kind:root] shape | JAX op_name"} from a compiled module's text
    (`compiled.as_text()`), so that a profile's `fusion.12` reads as what it computes. A fusion
    names its fused computation's root opcode, and borrows the root's op_name if it has none."""
    roots = {}  # fused computation -> (root opcode, root op_name or None)
    computation = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        elif line.lstrip().startswith("ROOT") and computation:
            match = _INSTRUCTION.match(line)
            if match:
                op_name = re.search(r'op_name="([^"]*)"', line)
                roots[computation] = (match.group(3), op_name.group(1) if op_name else None)
    described = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode = match.groups()
        shape = re.sub(r"\{[^{}]*\}", "", shape)  # drop layouts: bf16[8,32]{1,0} -> bf16[8,32]
        kind = re.search(r"\bkind=k(\w+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = op_name.group(1) if op_name else None
        called = re.search(r"\bcalls=%?([\w.\-]+)", line)
        root_opcode, root_op_name = (
            roots.get(called.group(1), (None, None)) if called else (None,) * 2
        )
        if kind:
            opcode += f"[{kind.group(1)}" + (f":{root_opcode}]" if root_opcode else "]")
        op_name = op_name or root_op_name
        described[name] = " ".join(
            part
            for part in (
                opcode,
                shape if len(shape) <= 60 else shape[:57] + "...",
                f"| {op_name}" if op_name else "",
            )
            if part
        )
    return described


# "  %fusion.12 = bf16[128,32,32,256]{3,2,1,0} fusion(...), kind=kLoop, ..." (ROOT, tuples too)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\(")
# "%fused_computation.3 (param_0: f32[8]) -> f32[8] {" (ENTRY too)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def group_of(name: str, description: str | None) -> str:
    """An op's group for `top_ops(by="group")`: the pass and JAX primitive it comes from
    ("backward conv_general_dilated"), else its opcode ("unnamed copy")."""
    if description and "| " in description:
        op_name = description.split("| ", 1)[1]
        step = "backward" if "transpose(" in op_name else "forward"
        return f"{step} {op_name.rsplit('/', 1)[-1]}"
    if description:
        return f"unnamed {description.split()[0]}"
    return re.sub(r"\.\d+$", "", name)


def top_ops(
    trace_dir: str | Path,
    *,
    calls: int,
    k: int = 10,
    hlo_text: str | None = None,
    by: str = "op",
) -> list[dict]:
    """The `k` ops (`by="op"`) or op groups (`by="group"`, `group_of`) with the most time per
    call, largest first, as JSON-ready records; with the compiled module's `hlo_text`, each op
    also says what it is (`describe_ops`), and groups can be told apart."""
    return _rank(*_read(trace_dir, hlo_text), calls=calls, k=k, by=by)


def _read(trace_dir, hlo_text):
    """(op times, devices, op descriptions) of the trace in `trace_dir`."""
    profile = jax.profiler.ProfileData.from_file(str(latest_xspace(trace_dir)))
    module = module_name(hlo_text) if hlo_text else None
    times, devices = op_times(profile, module)
    if not times and module:
        warnings.warn(
            f"the trace in {trace_dir} names no op of module {module}; ranking all its ops",
            stacklevel=3,
        )
        times, devices = op_times(profile)
    if not times:
        raise ValueError(f"the trace in {trace_dir} holds no XLA op events")
    return times, devices, describe_ops(hlo_text) if hlo_text else {}


def _rank(times, devices, described, *, calls, k, by):
    if by == "group":
        grouped: dict[str, list[float]] = collections.defaultdict(list)
        for name, durations in times.items():
            grouped[group_of(name, described.get(name))].extend(durations)
        times, described = dict(grouped), {}
    elif by != "op":
        raise ValueError(f"by must be 'op' or 'group', got {by!r}")
    total = sum(sum(d) for d in times.values())
    ranked = sorted(times.items(), key=lambda item: -sum(item[1]))[:k]
    return [
        {
            "rank": rank,
            by: name,
            **({"what": described.get(name)} if by == "op" else {}),
            "ms_per_call": round(sum(durations) / 1e6 / calls / devices, 4),
            "runs_per_call": round(len(durations) / calls / devices, 2),
            "share": round(sum(durations) / total, 4),
        }
        for rank, (name, durations) in enumerate(ranked, start=1)
    ]


def profile(call, *, calls: int, trace_dir: str | Path, hlo_text: str | None = None, k=10):
    """Runs `call()` `calls` times under `jax.profiler.trace(trace_dir)`, blocking on the last
    result, and returns the `k` top ops then the `k` top groups of that trace (`top_ops`); the
    trace stays for TensorBoard or xprof."""
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
    read = _read(trace_dir, hlo_text)  # the trace and the module text are parsed once
    return [*_rank(*read, calls=calls, k=k, by="op"), *_rank(*read, calls=calls, k=k, by="group")]
