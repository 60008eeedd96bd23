"""What ``tierflow train`` shows: the placement table, the progress bar, the summary.

The progress bar keeps the step count, the elapsed time, the ETA and the loss whole at
any terminal width (80 columns included); only the trailing details (gradient norm,
tokens/s, I/O rates) are shortened with "…" when the line is too narrow. Every log line
repeats them in full.
"""

from __future__ import annotations

TIER_ORDER = ("device", "host", "nvme")
CLASS_ORDER = ("weights", "master", "grads", "moments", "buffers", "working", "staging")
IO_NAMES = {"nvme_read": "nvme read", "nvme_written": "nvme written",
            "host_to_device": "host->device", "device_to_host": "device->host"}


def plural(count: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def progress_bar(console, **options):
    """A rich ``Progress`` whose task takes the fields ``loss`` and ``info`` (see :func:`step_info`).

    Essentials are no-wrap columns rich never shortens; the bar and the details share
    what is left (the details get three quarters), so a narrow terminal shortens those.
    ``options`` go to ``Progress`` (``get_time`` in tests)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column

    def whole():
        return Column(no_wrap=True)

    columns = (
        TextColumn("train", table_column=whole()),
        BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6, no_wrap=True)),
        TextColumn("{task.completed}/{task.total} steps", table_column=whole()),
        TimeElapsedColumn(table_column=whole()),
        TextColumn("eta", table_column=whole()),
        TimeRemainingColumn(table_column=whole()),
        TextColumn("{task.fields[loss]}", table_column=whole()),
        TextColumn("{task.fields[info]}", table_column=Column(ratio=3, min_width=0, no_wrap=True,
                                                              overflow="ellipsis")),
    )
    return Progress(*columns, console=console, expand=True, disable=not console.is_terminal, **options)


def step_info(loss: float, norm: float, tokens: int, seconds: float, io: dict[str, int]) -> tuple[str, str]:
    """(loss text, the other details) of one step, for the progress bar and the log lines."""
    rate = lambda key: fmt_bytes(io.get(key, 0) / seconds) + "/s"  # noqa: E731
    text = f"|g| {norm:.2f}  {tokens / seconds:,.0f} tok/s  {seconds:.2f} s/step"
    text += f"  nvme r {rate('nvme_read')} w {rate('nvme_written')}"
    if io.get("host_to_device") or io.get("device_to_host"):
        text += f"  h2d {rate('host_to_device')} d2h {rate('device_to_host')}"
    return f"loss {loss:.4f}", text


def summary_table(result):
    """Loss, speed, bytes moved per step and peak budget use of a ``TrainResult``."""
    from rich.table import Table

    steps = len(result.step_seconds)
    mean = sum(result.step_seconds) / steps
    later = result.step_seconds[1:]
    table = Table(title="summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    first, last = result.first_step, result.first_step + steps - 1
    table.add_row("loss", f"{result.losses[0]:.4f} (step {first}) -> {result.losses[-1]:.4f} (step {last})")
    k = min(5, steps // 2)
    if k >= 2:  # single steps are noisy: also compare means
        table.add_row(f"loss, mean of {k}", f"{sum(result.losses[:k]) / k:.4f} (first {k} steps) -> "
                      f"{sum(result.losses[-k:]) / k:.4f} (last {k} steps)")
    step_time = f"{mean:.2f} s mean over {plural(steps, 'step')}"
    if later:
        step_time += f"; {sum(later) / len(later):.2f} s after the first"
    table.add_row("step time", step_time)
    table.add_row("throughput", f"{result.tokens / sum(result.step_seconds):,.0f} tokens/s "
                  f"({result.tokens // steps:,} tokens/step)")
    moved = ", ".join(f"{IO_NAMES.get(key, key)} {fmt_bytes(result.io_per_step[key])}"
                      for key in ordered(result.io_per_step, tuple(IO_NAMES)))
    table.add_row("moved per step", moved or "nothing")
    peaks = []
    for tier in ordered(result.peaks, TIER_ORDER):
        peak, capacity = result.peaks[tier]
        share = f" ({100 * peak / capacity:.0f}%)" if capacity else ""
        peaks.append(f"{tier} {fmt_bytes(peak)} / {fmt_bytes(capacity) if capacity else 'unlimited'}{share}")
    table.add_row("peak budget use", ", ".join(peaks))
    return table


def placement_table(placement: dict, budgets: dict[str, int], nvme_dir: str | None):
    """A table of bytes per tensor class (rows) per tier (columns), with the budgets."""
    from rich.table import Table

    tiers = ordered(placement, TIER_ORDER)
    classes = ordered({c for tier in placement.values() for c in tier}, CLASS_ORDER)
    table = Table(title="placement (bytes per tier)", title_justify="left")
    table.add_column("tensors")
    for tier in tiers:
        table.add_column(tier, justify="right")
    table.add_column("total", justify="right")
    for name in classes:
        row = [placement[tier].get(name, 0) for tier in tiers]
        table.add_row(name, *map(fmt_bytes, row), fmt_bytes(sum(row)))
    totals = [sum(placement[tier].values()) for tier in tiers]
    table.add_row("[bold]total", *map(fmt_bytes, totals), fmt_bytes(sum(totals)), end_section=True)
    table.add_row("[bold]budget", *[_budget_text(tier, budgets, nvme_dir) for tier in tiers], "")
    return table


def _budget_text(tier: str, budgets: dict[str, int], nvme_dir: str | None) -> str:
    """A tier's budget for the placement table; the NVMe tier shows its directory."""
    if tier == "nvme":
        return "disk" if nvme_dir else "off"
    return fmt_bytes(budgets[tier]) if tier in budgets else "unlimited"


def ordered(keys, preferred: tuple[str, ...]) -> list[str]:
    """``keys`` with the ``preferred`` ones first, in that order, the rest sorted."""
    keys = set(keys)
    return [k for k in preferred if k in keys] + sorted(keys - set(preferred))


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
