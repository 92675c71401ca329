"""The markdown section one benchmark run prints and appends to bench/results.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from bench.clients import Ceiling, Volume
from bench.profile import Profile
from bench.scenarios import Burst, OpenLoop, Restore


@dataclass
class Header:
    at: datetime
    python: str
    cpus: int
    partitions: int
    commit_interval_ms: int
    commit: str


@dataclass
class Run:
    header: Header
    topics: list[str]  # logical names, in table order
    ceiling: Ceiling | None = None
    small: Burst | None = None
    big: Burst | None = None
    open_loop: OpenLoop | None = None
    rss: dict[str, float | None] = field(default_factory=dict)
    hold: int = 0
    held: Burst | None = None
    restore: Restore | None = None
    profile: Profile | None = None
    profile_note: str = ""
    seconds: float = 0.0


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def pct_ms(values: list[float], q: float) -> float:
    """Nearest-rank percentile of seconds, in ms (0 for no values)."""
    return (pct(values, q) or 0.0) * 1000


def _num(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:,.1f} ms"


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"


def _short(topic: str) -> str:
    return topic.replace("{app_id}-", "")


def _per_job(volume: Volume | None, jobs: int) -> tuple[str, str]:
    if volume is None or jobs == 0:
        return "n/a", "n/a"
    return f"{volume.records / jobs:.2f}", f"{volume.bytes / jobs:,.0f}"


def _held_rows(held: Burst | None) -> list[str]:
    """What the held jobs wrote, per job: a burst past the providers' pace multiplies it."""
    if held is None or not held.jobs:
        return []
    rows = []
    for topic, label in (("cp.events", "events"), ("{app_id}-jobs-changelog", "changelog")):
        volume = held.volumes.get(topic)
        if volume is not None:
            rows.append(
                f"| held jobs: {label} records / KB per job | {volume.records / held.jobs:.1f} / "
                f"{volume.bytes / held.jobs / 1000:.1f} |"
            )
    return rows


def checks(run: Run) -> list[str]:
    """What looks wrong in the control plane, from the figures themselves."""
    found: list[str] = []
    for b in (run.small, run.big, run.held):
        if b is None:
            continue
        if b.seen < b.jobs:
            found.append(
                f"{b.label} burst: {b.jobs - b.seen} of {b.jobs} jobs had no final response"
            )
        not_ok = {k: v for k, v in b.states.items() if k != "COMPLETED"}
        if not_ok:
            found.append(f"{b.label} burst: final states {_states(not_ok)}")
        if b.duplicates:
            found.append(f"{b.label} burst: {b.duplicates} duplicate final responses")
        dlq = b.volumes.get("cp.dlq")
        if dlq is not None and dlq.records:
            found.append(f"{b.label} burst: {dlq.records} dead letters")
        responses = b.volumes.get("cp.responses")
        if responses is not None and b.seen and responses.records != b.seen:
            found.append(
                f"{b.label} burst: {responses.records} records on cp.responses for {b.seen} jobs"
            )
    o = run.open_loop
    if o is not None:
        if o.seen < o.jobs:
            found.append(f"open loop: {o.jobs - o.seen} of {o.jobs} jobs had no final response")
        not_ok = {k: v for k, v in o.states.items() if k != "COMPLETED"}
        if not_ok:
            found.append(f"open loop: final states {_states(not_ok)}")
        if o.duplicates:
            found.append(f"open loop: {o.duplicates} duplicate final responses")
        if o.no_completed:
            found.append(f"open loop: {o.no_completed} finals without a completed result seen")
    r = run.restore
    if r is not None:
        if r.ready_s is None:
            found.append("restart: /readyz never answered 200")
        if r.first_job_s is None:
            found.append("restart: the job produced after the restart got no final response")
        if r.lines == 0:
            found.append("restart: no core.restored line in the worker's log")
    return found


def render(run: Run) -> str:
    h = run.header
    out = [
        f"## {h.at:%Y-%m-%d %H:%M} UTC · python {h.python} · {h.cpus} CPUs · "
        f"{h.partitions} partitions · commit interval {h.commit_interval_ms} ms · {h.commit}",
        "",
        f"One control-plane worker, one provider worker (simulated, latency 0), local broker; "
        f"run took {run.seconds:.0f} s.",
        "",
        "| throughput | value |",
        "|---|---:|",
    ]
    c = run.ceiling
    if c is not None:
        out += [
            f"| Kafka ceiling: produced, {c.records} x {c.record_bytes} B, acks=all "
            f"| {c.produced_per_s:,.0f} rec/s |",
            f"| Kafka ceiling: consumed back, same process | {c.consumed_per_s:,.0f} rec/s |",
        ]
    for b in (run.small, run.big):
        if b is None:
            continue
        size = f"{b.prompt_bytes // 1000} KB" if b.prompt_bytes >= 1000 else f"{b.prompt_bytes} B"
        out += [
            f"| burst {b.jobs} x {size} prompts | {b.rate:,.1f} jobs/s |",
            f"| burst {size}: first produce → last final | {b.seconds:.1f} s |",
            f"| burst {size}: final states | {_states(b.states)} |",
        ]
    if run.small is not None and run.big is not None and run.small.rate > 0:
        out.append(f"| 20 KB rate / 200 B rate | {run.big.rate / run.small.rate:.2f} |")
    out.append("")

    if run.small is not None and run.small.volumes:
        small, big = run.small, run.big
        out += [
            "| per job, written to | 200 B records | 200 B bytes | 20 KB records | 20 KB bytes |",
            "|---|---:|---:|---:|---:|",
        ]
        totals = [Volume(), Volume()]
        for topic in run.topics:
            cells: list[str] = []
            for i, b in enumerate((small, big)):
                volume = b.volumes.get(topic) if b is not None else None
                cells += _per_job(volume, b.seen if b is not None else 0)
                if volume is not None:
                    totals[i].records += volume.records
                    totals[i].bytes += volume.bytes
            out.append(f"| {_short(topic)} | " + " | ".join(cells) + " |")
        cells = list(_per_job(totals[0], small.seen))
        cells += _per_job(totals[1], big.seen) if big is not None else ("n/a", "n/a")
        out.append("| **total** | " + " | ".join(cells) + " |")
        ratios = []
        for b in (small, big):
            changelog = b.volumes.get("{app_id}-jobs-changelog") if b is not None else None
            if b is None or changelog is None or not b.seen:
                ratios += ["", "n/a"]
            else:
                ratios += ["", f"{changelog.bytes / b.seen / b.prompt_bytes:.1f}x"]
        out.append("| changelog bytes per job / prompt bytes | " + " | ".join(ratios) + " |")
        out.append("")

    o = run.open_loop
    if o is not None:
        out += [
            f"| open loop, 200 B, {o.jobs} jobs | value |",
            "|---|---:|",
            f"| target rate | {o.target_rate:,.1f} jobs/s |",
            f"| achieved produce rate | {o.achieved_rate:,.1f} jobs/s |",
            f"| final responses seen | {o.seen} ({_states(o.states)}) |",
        ]
        for name, values in (("end to end", o.latencies), ("control-plane overhead", o.overheads)):
            for q in (0.5, 0.95, 0.99):
                out.append(f"| {name} p{round(q * 100)} | {_ms(pct(values, q))} |")
            out.append(f"| {name} max | {_ms(max(values, default=None))} |")
        out.append("")

    if run.rss:
        out += ["| RSS | MiB |", "|---|---:|"]
        out += [f"| {name} | {_num(value, 0)} |" for name, value in run.rss.items()]
        out.append("")

    r = run.restore
    if r is not None:
        out += [
            f"| cold restore (after {run.hold} held extra jobs) | value |",
            "|---|---:|",
            f"| jobs held (core.restored) | {r.jobs:,} |",
            f"| changelog records read | {r.records:,} |",
            *_held_rows(run.held),
            f"| start → /readyz 200 | {_num(r.ready_s, 2, ' s')} |",
            f"| start → final response of a new job | {_num(r.first_job_s, 2, ' s')} |",
            f"| restore, from the worker's core.restored lines ({r.lines}, log level "
            f"{r.log_level}) | {r.seconds:.2f} s |",
            f"| restore per million jobs | {_num(r.s_per_million_jobs, 0, ' s')} |",
            "",
        ]

    p = run.profile
    if p is not None:
        cpu = (
            f", py-spy itself used {p.profiler_cpu_s:.1f} CPU-s"
            if p.profiler_cpu_s is not None
            else ""
        )
        out += [
            f"CPU profile of the control-plane worker during the 200 B burst: {p.samples} "
            f"non-idle samples over {p.seconds:.1f} s at 200 Hz"
            f" (~{p.samples / max(p.seconds * 200, 1) * 100:.0f}% busy){cpu}.",
            "",
            "| own % | function |",
            "|---:|---|",
        ]
        out += [f"| {share:.1f} | `{name}` |" for name, share in p.own]
        out += ["", "| inclusive % | function |", "|---:|---|"]
        out += [f"| {share:.1f} | `{name}` |" for name, share in p.inclusive]
        out.append("")
    elif run.profile_note:
        out += [f"Profile: {run.profile_note}.", ""]

    found = checks(run)
    out.append("Checks: " + ("; ".join(found) if found else "no lost, duplicate or failed jobs."))
    return "\n".join(out) + "\n"
