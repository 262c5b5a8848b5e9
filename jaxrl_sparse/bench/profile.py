"""`python -m launch.bench profile BENCH [its flags]`: any benchmark under the JAX profiler.

Runs `launch.bench BENCH ...` inside `jax.profiler.trace`, then reads the trace back
(`jax.profiler.ProfileData`) and prints, for each device timeline (e.g. each GPU stream and the
derived "XLA Ops" line), the events that took the most device time: name, count, total ms, mean
µs, share of the line. Kernel launch floors show up as many short events; bandwidth or FLOP
bound work as few long ones. Compile time is host work and does not appear on device lines.

    python -m launch.bench profile generate --model=smollm2-135m --batch=64 --new_tokens=64 --no_hf
    python -m launch.bench profile ppo --settings=seed --repeats=1

`--profile_dir=DIR` keeps the raw trace (open it with xprof / TensorBoard's profile plugin);
`--profile_top=N` rows per line; `--profile_out=F.json` writes the tables as JSON;
`--profile_warmup` runs the benchmark once untraced first, so compilation and XLA's gemm
autotuning (which run kernels on the device) stay out of the tables.
`--profile_span=PREFIX` (e.g. `ppo iteration`, the span `launch.bench ppo` annotates each
iteration with): for the last host span whose name starts with PREFIX, the device's busy time in it
and each stretch > 0.1 ms with no kernel running, beside what the annotating thread was inside then
(its innermost host events: e.g. a jitted call re-recording its CUDA graph, `command_buffer::update`);
`--profile_out` then holds that report under "span" beside the tables.
`--profile_hlo=DIR` names each kernel's HLO op (module and JAX op path, e.g. `jit(update)/.../
mlp/down_proj/dot_general`) from XLA's optimized-HLO dumps in DIR; make them with
`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"` on the same command. Library kernels
(cuBLAS gemms) keep their own names and get no op.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional

from jaxrl_sparse.errors import UserError


def aggregate(xplane_path: str, device_prefix: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """{plane/line: {busy_ms, events, span_ms, top: [(name, count, total_ms)]}} of a trace file.

    device_prefix: keep only planes whose name starts with it (default: '/device:' planes, or the
    host CPU plane when there is no device plane, e.g. on a CPU run).
    """
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(xplane_path)
    planes = list(pd.planes)
    if device_prefix is None:
        device_prefix = "/device:" if any(p.name.startswith("/device:") for p in planes) else "/host:CPU"
    out: Dict[str, Dict[str, Any]] = {}
    for plane in planes:
        if not plane.name.startswith(device_prefix):
            continue
        for line in plane.lines:
            tot: Dict[str, float] = collections.defaultdict(float)
            cnt: Dict[str, int] = collections.Counter()
            t0, t1, n = None, None, 0
            for e in line.events:
                d = float(e.duration_ns)
                tot[e.name] += d
                cnt[e.name] += 1
                n += 1
                t0 = e.start_ns if t0 is None else min(t0, e.start_ns)
                t1 = e.end_ns if t1 is None else max(t1, e.end_ns)
            if not n:
                continue
            top = sorted(tot.items(), key=lambda kv: -kv[1])
            out[f"{plane.name} | {line.name}"] = {
                "busy_ms": sum(tot.values()) / 1e6, "events": n, "span_ms": (t1 - t0) / 1e6,
                "top": [(k, cnt[k], v / 1e6) for k, v in top]}
    return out


def busy_and_gaps(intervals, start: int, end: int, min_gap_ns: int = 100_000):
    """(busy ns, [(gap start, gap end)]) of [start, end) covered by the union of (start, end) intervals
    (any order, overlapping, possibly reaching outside the window); gaps shorter than min_gap_ns are
    not listed but do not count as busy."""
    busy, gaps, cur = 0, [], start
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end):
        if a - cur >= min_gap_ns:
            gaps.append((cur, a))
        if b > cur:
            busy += b - max(a, cur)
            cur = b
    if end - cur >= min_gap_ns:
        gaps.append((cur, end))
    return busy, gaps


def innermost(events, a: int, b: int, n: int = 3) -> List[str]:
    """Names of the n shortest (name, start, end) events overlapping [a, b) that are longer than 30 µs:
    on one thread's nested events, what that thread was doing most specifically then."""
    hit = sorted((t - s, name) for name, s, t in events if s < b and t > a and t - s > 30_000)
    return [name for _, name in hit[:n]]


def span_report(xplane_path: str, prefix: str, device_prefix: str = "/device:") -> Dict[str, Any]:
    """Where the device idles in the last host span named prefix* (a `jax.profiler.TraceAnnotation`):
    {span, span_ms, kernels, busy_ms, idle_ms, gaps: [{at_ms, ms, host: [innermost events]}]}, gaps
    ordered by start. Device timelines are the first device plane's stream lines."""
    from jax.profiler import ProfileData
    planes = list(ProfileData.from_file(xplane_path).planes)
    spans = []
    for plane in planes:
        if plane.name.startswith("/host:"):
            for line in plane.lines:
                ev = [(e.name, e.start_ns, e.end_ns) for e in line.events]
                spans += [(s, t, name, ev) for name, s, t in ev if name.startswith(prefix)]
    if not spans:
        raise UserError(f"--profile_span: no host event named {prefix!r}* in the trace; name one the "
                        f"benchmark annotates (e.g. 'ppo iteration')")
    S, T, name, thread = max(spans, key=lambda x: x[0])
    dev = next((p for p in planes if p.name.startswith(device_prefix)), None)
    if dev is None:
        raise UserError("--profile_span: the trace has no device timeline (it needs an accelerator)")
    kernels = [(e.start_ns, e.end_ns) for line in dev.lines if "Stream" in line.name for e in line.events]
    busy, gaps = busy_and_gaps(kernels, S, T)
    return {"span": name, "span_ms": (T - S) / 1e6, "kernels": sum(S <= a < T for a, _ in kernels),
            "busy_ms": busy / 1e6, "idle_ms": sum(b - a for a, b in gaps) / 1e6,
            "gaps": [{"at_ms": (a - S) / 1e6, "ms": (b - a) / 1e6, "host": innermost(thread, a, b)}
                     for a, b in gaps]}


def print_span(r: Dict[str, Any]) -> None:
    print(f"\n## {r['span']}: {r['span_ms']:.2f} ms, {r['kernels']} kernels, device busy {r['busy_ms']:.2f} ms, "
          f"idle {r['idle_ms']:.2f} ms in {len(r['gaps'])} gaps > 0.1 ms")
    print("| at ms | idle ms | the host thread inside |\n|---|---|---|")
    for g in r["gaps"]:
        print(f"| {g['at_ms']:.2f} | {g['ms']:.2f} | {' < '.join(h[:60] for h in g['host'])} |")


def latest_trace(trace_dir: str) -> Optional[str]:
    """The newest `*.xplane.pb` the profiler wrote under trace_dir (None when it wrote none)."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    return files[-1] if files else None


_HLO_FUSION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .* (?:fusion|custom-call)\(")


def hlo_ops(hlo_dir: str) -> Dict[str, str]:
    """{kernel name: 'module: op path'} from XLA's optimized-HLO text dumps in hlo_dir.

    A fusion's kernel is named after the fusion ('.' -> '_') or after the one it was deduplicated
    with (XLA emits one kernel for both; which name it keeps varies), so both names are indexed;
    a name found in several modules lists each module's op.
    """
    files = sorted(glob.glob(os.path.join(hlo_dir, "*after_optimizations.txt")))
    if not files:
        raise UserError(f"--profile_hlo={hlo_dir}: no *after_optimizations.txt there; run the same command "
                        f'with XLA_FLAGS="--xla_dump_to={hlo_dir} --xla_dump_hlo_as_text"')
    found: Dict[str, Dict[str, str]] = collections.defaultdict(dict)
    for path in files:
        module = os.path.basename(path).split(".")[1] if os.path.basename(path).count(".") > 1 else path
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = _HLO_FUSION.match(line)
                if not m:
                    continue
                dedup = re.search(r'deduplicated_name="([^"]+)"', line)
                op = re.search(r'op_name="([^"]+)"', line)
                for name in {m.group(1), dedup.group(1) if dedup else m.group(1)}:
                    found[name.replace(".", "_")].setdefault(module, op.group(1) if op else "")
    return {k: "; ".join(f"{mod}: {op}" for mod, op in v.items()) for k, v in found.items()}


def annotate(tables: Dict[str, Dict[str, Any]], ops: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """Each line's top rows get a fourth field: the kernel's HLO op ('' when unknown)."""
    return {name: {**t, "top": [(k, c, ms, ops.get(k.replace(".", "_"), "")) for k, c, ms, *_ in t["top"]]}
            for name, t in tables.items()}


def print_tables(tables: Dict[str, Dict[str, Any]], top: int = 25) -> None:
    for name, t in sorted(tables.items(), key=lambda kv: -kv[1]["busy_ms"]):
        print(f"\n## {name}: {t['events']} events, busy {t['busy_ms']:.1f} ms over a span of "
              f"{t['span_ms']:.1f} ms ({100 * t['busy_ms'] / max(t['span_ms'], 1e-9):.0f}% busy)")
        with_ops = any(len(row) > 3 for row in t["top"])
        print("| event | count | total ms | mean µs | share |" + (" HLO op |" if with_ops else ""))
        print("|---|---|---|---|---|" + ("---|" if with_ops else ""))
        for k, c, ms, *op in t["top"][:top]:
            tail = f" {op[0][-120:]} |" if with_ops else ""
            print(f"| {k[:90]} | {c} | {ms:.2f} | {1e3 * ms / c:.1f} | {100 * ms / t['busy_ms']:.1f}% |{tail}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    argv = list(argv or [])
    opts = {"--profile_dir": None, "--profile_top": "25", "--profile_out": None, "--profile_warmup": None,
            "--profile_hlo": None, "--profile_span": None}
    rest = []
    for a in argv:
        k, _, v = a.partition("=")
        if k == "--profile_warmup":
            opts[k] = v or "1"
        elif k in opts:
            opts[k] = v
        else:
            rest.append(a)
    if not rest or rest[0] == "profile":
        raise UserError("usage: python -m launch.bench profile BENCH [its flags] "
                        "(e.g. `profile generate --model=smollm2-135m --no_hf`)")
    import jax
    from jaxrl_sparse.bench import dispatch
    keep = opts["--profile_dir"]
    trace_dir = keep or tempfile.mkdtemp(prefix="jaxrl_profile_")
    try:
        if opts["--profile_warmup"] not in (None, "0", "false"):
            t = time.perf_counter()
            dispatch(rest)   # compiles and autotunes outside the trace
            print(f"\nwarm-up run of `{' '.join(rest)}` took {time.perf_counter() - t:.1f} s (not traced)")
        t = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            dispatch(rest)
        where = f"trace in {trace_dir}" if keep else "trace not kept (--profile_dir=DIR keeps it)"
        print(f"\nprofiled `{' '.join(rest)}` in {time.perf_counter() - t:.1f} s; {where}")
        path = latest_trace(trace_dir)
        if path is None:
            raise UserError(f"the profiler wrote no trace under {trace_dir}; check that the profiler works here")
        tables = aggregate(path)
        span = span_report(path, opts["--profile_span"]) if opts["--profile_span"] else None
    finally:
        if not keep:  # tens of MB a trace: a temporary one is never left behind
            shutil.rmtree(trace_dir, ignore_errors=True)
    if opts["--profile_hlo"]:
        tables = annotate(tables, hlo_ops(opts["--profile_hlo"]))
    print_tables(tables, int(opts["--profile_top"]))
    if span is not None:
        print_span(span)
    if opts["--profile_out"]:
        with open(opts["--profile_out"], "w", encoding="utf-8") as f:
            json.dump({**tables, **({"span": span} if span is not None else {})}, f)
    return tables
