"""``python -m samba.zeroshot compare A.json B.json``: the metrics of two ``--output`` files side
by side (A, B and B - A), with a note for each task the two scored on different documents."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .errors import ZeroShotError


def read_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """task -> metric -> value from a ``--output`` file (stderrs and aliases left out)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ZeroShotError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ZeroShotError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ZeroShotError(f"{path}: has no 'results'; write one with python -m samba.zeroshot ... --output FILE")
    table: dict[str, dict[str, float]] = {}
    for task, metrics in data["results"].items():
        for key, value in (metrics or {}).items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # lm-eval's metrics are "metric,filter"; also there: alias, sample_len
            metric, _, kind = key.partition(",")
            table.setdefault(task, {})[metric if kind in ("", "none") else f"{metric} ({kind})"] = float(value)
    return table


def compare_rows(a: dict, b: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    rows = []
    for task in sorted(set(a) | set(b)):
        for metric in sorted(set(a.get(task, {})) | set(b.get(task, {}))):
            va, vb = a.get(task, {}).get(metric), b.get(task, {}).get(metric)
            rows.append((task, metric, va, vb, None if va is None or vb is None else vb - va))
    return rows


def format_compare(rows, a_name: str, b_name: str) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e6 else f"{v:.4g}"
    lines = [f"A = {a_name}", f"B = {b_name}", "", "| task | metric | A | B | B - A |", "|---|---|---:|---:|---:|"]
    lines += [f"| {t} | {m} | {cell(va)} | {cell(vb)} | {'-' if d is None else f'{d:+.4f}'} |"
              for t, m, va, vb, d in rows]
    return "\n".join(lines)


def sample_counts(path: str | Path) -> dict[str, int]:
    """task -> the number of documents scored (lm-eval's sample_len), from a ``--output`` file."""
    results = json.loads(Path(path).read_text())["results"]
    return {task: int(m["sample_len"]) for task, m in results.items() if isinstance(m.get("sample_len"), int)}


def compare(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m samba.zeroshot compare",
                                     description="Metrics of two --output files side by side: A, B and B - A.")
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    table = format_compare(compare_rows(read_metrics(args.a), read_metrics(args.b)), args.a, args.b)
    a, b = sample_counts(args.a), sample_counts(args.b)
    table += "".join(f"\nnote: {task}: A scored {a[task]} documents and B {b[task]}; the two are not the same test"
                     for task in sorted(set(a) & set(b)) if a[task] != b[task])
    print(table)
    return table
