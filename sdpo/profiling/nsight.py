"""Summaries of Nsight reports: where a training step's time goes.

``summarize_nsys(sqlite_path)`` reads the SQLite export of an Nsight Systems report
(``nsys export --type sqlite``; profiling/nsys.sh does it) and returns

- per NVTX range (the trainer's phases, ``--nvtx``): count, total and mean wall milliseconds;
- per kernel: count, total and mean GPU milliseconds, share of all kernel time;
- per NVTX range, the GPU time of the kernels launched inside it: each kernel is matched to its
  launch (the CUDA runtime call with the same correlation id) and that launch to the innermost
  range open on the launching thread at that moment.

``summarize_ncu_csv(text)`` reads ``ncu --import REPORT --csv --page raw`` output and returns per
kernel the duration and the DRAM throughput as a percentage of peak.

Tables and columns used (Nsight Systems' documented SQLite schema): ``StringIds(id, value)``,
``NVTX_EVENTS(start, end, text, textId, globalTid, eventType)``,
``CUPTI_ACTIVITY_KIND_KERNEL(start, end, shortName, demangledName, correlationId)``,
``CUPTI_ACTIVITY_KIND_RUNTIME(start, end, globalTid, correlationId)``. Times are nanoseconds.
"""

from __future__ import annotations

import bisect
import csv
import io
import sqlite3
from collections import defaultdict
from pathlib import Path

# NVTX event types that are ranges: push/pop (59) and start/end (60).
NVTX_RANGE_TYPES = (59, 60)
OUTSIDE_RANGES = "(no range)"


def _tables(connection: sqlite3.Connection) -> set[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row[0] for row in rows}


def _strings(connection: sqlite3.Connection) -> dict[int, str]:
    if "StringIds" not in _tables(connection):
        return {}
    return dict(connection.execute("SELECT id, value FROM StringIds"))


def summarize_nsys(sqlite_path: str | Path) -> dict:
    path = Path(sqlite_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"nsys summary: no such file {path}; export a report with "
            "`nsys export --type sqlite --output REPORT.sqlite REPORT.nsys-rep`"
        )
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = _tables(connection)
        if "CUPTI_ACTIVITY_KIND_KERNEL" not in tables:
            raise ValueError(
                f"nsys summary: {path} has no kernel table (CUPTI_ACTIVITY_KIND_KERNEL): was the "
                "report captured with --trace=cuda and did the capture range contain a step?"
            )
        strings = _strings(connection)
        ranges = []  # (thread, start, end, name)
        if "NVTX_EVENTS" in tables:
            query = (
                "SELECT globalTid, start, end, text, textId FROM NVTX_EVENTS "
                f"WHERE eventType IN {NVTX_RANGE_TYPES} AND end IS NOT NULL"
            )
            for thread, start, end, text, text_id in connection.execute(query):
                name = text if text is not None else strings.get(text_id, f"<string {text_id}>")
                ranges.append((thread, start, end, name))
        kernels = list(
            connection.execute(
                "SELECT start, end, shortName, demangledName, correlationId "
                "FROM CUPTI_ACTIVITY_KIND_KERNEL"
            )
        )
        launches = {}
        if "CUPTI_ACTIVITY_KIND_RUNTIME" in tables:
            for thread, start, correlation in connection.execute(
                "SELECT globalTid, start, correlationId FROM CUPTI_ACTIVITY_KIND_RUNTIME"
            ):
                launches[correlation] = (thread, start)
    finally:
        connection.close()

    range_totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for _, start, end, name in ranges:
        range_totals[name][0] += 1
        range_totals[name][1] += (end - start) / 1e6

    kernel_totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    all_kernel_ms = 0.0
    by_thread: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    for thread, start, end, name in ranges:
        by_thread[thread].append((start, end, name))
    starts_by_thread = {}
    for thread, items in by_thread.items():
        items.sort()
        starts_by_thread[thread] = [item[0] for item in items]
    gpu_by_range: dict[str, float] = defaultdict(float)
    for start, end, short_name, demangled_name, correlation in kernels:
        name = (
            strings.get(short_name, str(short_name)) if isinstance(short_name, int) else short_name
        )
        if name is None:
            name = strings.get(demangled_name, str(demangled_name))
        milliseconds = (end - start) / 1e6
        kernel_totals[name][0] += 1
        kernel_totals[name][1] += milliseconds
        all_kernel_ms += milliseconds
        gpu_by_range[_enclosing_range(launches.get(correlation), by_thread, starts_by_thread)] += (
            milliseconds
        )

    return {
        "ranges": [
            {"name": name, "count": count, "total_ms": total, "mean_ms": total / count}
            for name, (count, total) in sorted(range_totals.items(), key=lambda item: -item[1][1])
        ],
        "kernels": [
            {
                "name": name,
                "count": count,
                "total_ms": total,
                "mean_ms": total / count,
                "share": total / all_kernel_ms if all_kernel_ms else 0.0,
            }
            for name, (count, total) in sorted(kernel_totals.items(), key=lambda item: -item[1][1])
        ],
        "gpu_ms_by_range": dict(sorted(gpu_by_range.items(), key=lambda item: -item[1])),
        "kernel_ms_total": all_kernel_ms,
    }


def _enclosing_range(launch, by_thread, starts_by_thread) -> str:
    """The innermost range on the launching thread that contains the launch time."""
    if launch is None:
        return OUTSIDE_RANGES
    thread, time = launch
    items = by_thread.get(thread)
    if not items:
        return OUTSIDE_RANGES
    best = None
    # Ranges starting at or before the launch; the innermost is the latest-starting one that
    # still contains it (NVTX push/pop ranges nest).
    position = bisect.bisect_right(starts_by_thread[thread], time)
    for start, end, name in reversed(items[:position]):
        if start <= time <= end:
            best = name
            break
    return best if best is not None else OUTSIDE_RANGES


def summarize_ncu_csv(text: str) -> list[dict]:
    """Rows of ``ncu --csv --page raw``: header, a units row, then one row per kernel launch."""
    reader = csv.reader(io.StringIO(text))
    rows = [row for row in reader if row]
    if not rows:
        raise ValueError("ncu summary: the CSV is empty")
    header = rows[0]
    required = ("Kernel Name", "gpu__time_duration.sum")
    missing = [name for name in required if name not in header]
    if missing:
        raise ValueError(
            f"ncu summary: column(s) {', '.join(missing)} missing; export with "
            "`ncu --import REPORT --csv --page raw --metrics "
            "gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed`"
        )
    name_column = header.index("Kernel Name")
    time_column = header.index("gpu__time_duration.sum")
    dram_name = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
    dram_column = header.index(dram_name) if dram_name in header else None
    body = rows[1:]
    time_scale = 1e-6  # nanoseconds to ms, ncu's default unit for this metric
    if body and not _is_number(body[0][time_column]):
        units = body[0][time_column].strip().lower()
        time_scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(
            units, 1e-6
        )
        body = body[1:]
    totals: dict[str, dict] = {}
    for row in body:
        name = row[name_column]
        entry = totals.setdefault(name, {"name": name, "count": 0, "total_ms": 0.0, "dram": []})
        entry["count"] += 1
        entry["total_ms"] += float(row[time_column].replace(",", "")) * time_scale
        if dram_column is not None and _is_number(row[dram_column]):
            entry["dram"].append(float(row[dram_column].replace(",", "")))
    summary = []
    for entry in sorted(totals.values(), key=lambda item: -item["total_ms"]):
        dram = entry.pop("dram")
        entry["mean_ms"] = entry["total_ms"] / entry["count"]
        entry["dram_pct_of_peak"] = sum(dram) / len(dram) if dram else None
        summary.append(entry)
    return summary


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def format_nsys_summary(summary: dict, top: int = 15) -> str:
    lines = ["NVTX ranges (wall time)", f"{'range':<28}{'count':>8}{'total ms':>12}{'mean ms':>10}"]
    for row in summary["ranges"]:
        lines.append(
            f"{row['name']:<28}{row['count']:>8}{row['total_ms']:>12.3f}{row['mean_ms']:>10.3f}"
        )
    lines += ["", "GPU kernel time by the range that launched it"]
    for name, milliseconds in summary["gpu_ms_by_range"].items():
        share = milliseconds / summary["kernel_ms_total"] if summary["kernel_ms_total"] else 0
        lines.append(f"{name:<28}{milliseconds:>12.3f} ms {100 * share:>6.1f}%")
    lines += ["", f"Top {top} kernels (GPU time)"]
    for row in summary["kernels"][:top]:
        lines.append(
            f"{row['total_ms']:>10.3f} ms {100 * row['share']:>6.1f}% {row['count']:>6}x  {row['name'][:90]}"
        )
    return "\n".join(lines)


def format_ncu_summary(rows: list[dict]) -> str:
    lines = [f"{'total ms':>10}{'count':>7}{'mean ms':>10}{'DRAM %':>8}  kernel"]
    for row in rows:
        dram = "-" if row["dram_pct_of_peak"] is None else f"{row['dram_pct_of_peak']:.1f}"
        lines.append(
            f"{row['total_ms']:>10.4f}{row['count']:>7}{row['mean_ms']:>10.4f}{dram:>8}  {row['name'][:90]}"
        )
    return "\n".join(lines)
