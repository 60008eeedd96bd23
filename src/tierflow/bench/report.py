"""Rows of a side-by-side benchmark: printed one per line, optionally written as JSON."""
from __future__ import annotations

import json
from pathlib import Path


def row(name: str, tierflow: float, reference: float | None, unit: str, higher_is_better: bool = True) -> dict:
    """One comparison. `ratio` is tierflow / reference when higher is better (throughput),
    reference / tierflow when lower is better (time), so >1 always means tierflow wins."""
    if reference:
        ratio = tierflow / reference if higher_is_better else reference / tierflow
    else:
        ratio = None
    return {"name": name, "tierflow": tierflow, "reference": reference, "ratio": ratio, "unit": unit}


def print_row(r: dict) -> None:
    ref = "n/a" if r["reference"] is None else f"{r['reference']:.4g}"
    ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    print(f"{r['name']:<36} tierflow {r['tierflow']:>10.4g}  reference {ref:>10}  ratio {ratio:>7}  {r['unit']}")


def write_json(rows: list[dict], path: str | Path | None) -> None:
    if path:
        Path(path).write_text(json.dumps(rows, indent=2) + "\n")
