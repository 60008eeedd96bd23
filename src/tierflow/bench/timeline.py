"""A picture of a real run from the engine's event log: where time and memory go.

    engine.events.enable(); handles = record_phases(engine)   # before the first step
    ... train ...
    save_timeline(engine, "run.png")

The top panel shows the accounted bytes of each tier over time (with its budget);
the bottom one shows lanes of spans: compute (module forwards and each backward),
transfer (weight fetches), update (AdamW of a unit) and drain (gradients leaving
the device).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tierflow.runtime.events import EventLog, Span

LANES = ("compute", "transfer", "update", "drain")
LANE_OF = {"forward": "compute", "backward": "compute", "fetch": "transfer", "update": "update",
           "drain": "drain"}
COLORS = {"compute": "tab:blue", "transfer": "tab:orange", "update": "tab:green", "drain": "tab:red",
          "device": "tab:blue", "host": "tab:orange"}
MIB = 2**20


def record_phases(engine) -> list:
    """Record each backward pass as a 'backward' span (the engine logs forwards, fetches,
    updates and drains itself), and each tier's bytes now (the log samples only changes).
    Call after `engine.events.enable()`. Returns hook handles; `.remove()` them to stop."""
    events: EventLog = engine.events
    for name, budget in engine.budgets.items():
        events.budget_changed(name, budget.used)

    def after_forward(module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        if events.enabled and isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.register_hook(_backward_start(events))

    return [engine.module.register_forward_hook(after_forward, with_kwargs=True)]


def _backward_start(events: EventLog):
    def hook(grad):
        start = events.now()
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: events.add(Span("backward", "backward", start, events.now(), 0, "main")))
        return grad
    return hook


def lanes(spans: list[Span]) -> dict[str, list[tuple[float, float]]]:
    """lane -> [(start, duration)] of its spans."""
    result = {lane: [] for lane in LANES}
    for span in spans:
        lane = LANE_OF.get(span.kind)
        if lane is not None:
            result[lane].append((span.start, max(span.end - span.start, 1e-6)))
    return result


def memory_series(events: EventLog) -> dict[str, tuple[list[float], list[int]]]:
    """tier -> (times, accounted bytes) from the memory samples."""
    series: dict[str, tuple[list[float], list[int]]] = {}
    for sample in events.memory:
        times, used = series.setdefault(sample.tier, ([], []))
        times.append(sample.time)
        used.append(sample.used)
    return series


def plot(events: EventLog, path: str | Path, budgets: dict | None = None, title: str = "tierflow run") -> Path:
    """Draw the event log into a PNG at `path`; `budgets`: tier -> capacity bytes or None."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    mem_ax, lane_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    _draw_memory(mem_ax, memory_series(events), budgets or {})
    _draw_lanes(lane_ax, lanes(events.spans))
    mem_ax.set_title(title)
    lane_ax.set_xlabel("seconds since the log was enabled")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def save_timeline(engine, path: str | Path, title: str | None = None) -> Path:
    """Plot `engine.events` with the engine's budgets."""
    budgets = {name: capacity for name, (_, capacity) in engine.budget_peaks().items()}
    spill = engine.plan.tier_bytes.get("nvme", 0)
    default = "tierflow: bytes per tier and work over time" + (f" (NVMe holds {spill / MIB:,.0f} MiB)" if spill else "")
    return plot(engine.events, path, budgets, title or default)


def _draw_memory(ax, series: dict, budgets: dict) -> None:
    for tier, (times, used) in sorted(series.items()):
        color = COLORS.get(tier)
        ax.step(times, [u / MIB for u in used], where="post", label=f"{tier} (accounted)", color=color, linewidth=2)
        capacity = budgets.get(tier)
        if capacity:
            ax.axhline(capacity / MIB, linestyle="--", linewidth=1, color=color, label=f"{tier} budget")
    ax.set_ylabel("MiB")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="upper right", fontsize="small")


def _draw_lanes(ax, spans: dict) -> None:
    for row, lane in enumerate(LANES):
        if spans[lane]:
            ax.broken_barh(spans[lane], (row - 0.4, 0.8), color=COLORS[lane])
    ax.set_yticks(range(len(LANES)), LANES)
    ax.set_ylim(-0.6, len(LANES) - 0.4)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
