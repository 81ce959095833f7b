"""Writing results: `latest.json`, `latest.md`, `latest.png`, and rich tables.

`latest.json` is `{"meta": {...}, "records": [...], "skipped": [...]}`:

- a record per measured (config, case, impl): `impl, case, config, B, Hq, Hkv, Lq,
  Lkv, D, dtype, density, fwd_ms, fwdbwd_ms, fwd_tflops, fwdbwd_tflops, compile_s,
  compile_fwdbwd_s, samples, calls_per_sample, device, jax_version, torch_version,
  note` (null where not measured; `samples` and `calls_per_sample` are the
  forward's). create_block_mask timings are records too: `impl`
  `"eqx_flexattn.create_block_mask"` / `"torch.create_block_mask"`, `case`
  `"create_block_mask:<mask>"`, time in `fwd_ms`, first call in `compile_s`.
- a skipped entry per (config, case, impl[, phase]) not measured, with its reason.
- meta: device, versions, settings, the FLOP and timing conventions.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


TORCH = "torch.flex_attention"
MASK_CASE_PREFIX = "create_block_mask:"


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latest.json", out / "latest.md", out / "latest.png"]
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths


def _attention_records(results) -> list[dict]:
    return [r for r in results["records"] if not r["case"].startswith(MASK_CASE_PREFIX)]


def _mask_records(results) -> list[dict]:
    return [r for r in results["records"] if r["case"].startswith(MASK_CASE_PREFIX)]


def _by_config(records) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["config"]].append(r)
    return groups


def _torch_times(records) -> dict[tuple, dict]:
    return {(r["config"], r["case"]): r for r in records if r["impl"] == TORCH}


def ratio(record: dict, torch_times: dict, key: str) -> float | None:
    """`record`'s time over torch flex's on the same config and case."""
    ref = torch_times.get((record["config"], record["case"]))
    if not ref or not ref.get(key) or not record.get(key):
        return None
    return record[key] / ref[key]


def _fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0 or not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def _ratio_str(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _shape(r: dict) -> str:
    return (
        f"B={r['B']} Hq={r['Hq']} Hkv={r['Hkv']} Lq={r['Lq']} Lkv={r['Lkv']} "
        f"D={r['D']} {r['dtype']}"
    )


COLUMNS = (
    "case",
    "impl",
    "fwd ms",
    "fwd TFLOP/s",
    "fwd ×torch",
    "fwd+bwd ms",
    "fwd+bwd TFLOP/s",
    "fwd+bwd ×torch",
    "compile s",
)


def _row(r: dict, torch_times: dict) -> list[str]:
    return [
        r["case"],
        r["impl"],
        _fmt(r["fwd_ms"]),
        _fmt(r["fwd_tflops"]),
        _ratio_str(ratio(r, torch_times, "fwd_ms")),
        _fmt(r["fwdbwd_ms"]),
        _fmt(r["fwdbwd_tflops"]),
        _ratio_str(ratio(r, torch_times, "fwdbwd_ms")),
        _fmt(r["compile_s"]),
    ]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    records = _attention_records(results)
    torch_times = _torch_times(records)
    lines = [
        "# eqx_flexattn benchmarks",
        "",
        f"Device: {meta.get('device')}; jax {meta.get('jax_version')}, torch "
        f"{meta.get('torch_version')}, tokamax {meta.get('tokamax_version')}; "
        f"eqx_flexattn {meta.get('eqx_flexattn_version')} "
        f"({meta.get('git_commit') or 'commit unknown'}); {meta.get('created')}.",
        "",
        f"Timing: {meta.get('timing')}",
        "",
        f"FLOPs: {meta.get('flops')}",
        "",
        "`×torch` is this row's time divided by torch.compile(flex_attention)'s on the "
        "same config and case (below 1: faster than torch). `compile s` is the first "
        "forward call, compilation included.",
        "",
    ]
    for config, group in _by_config(records).items():
        lines += [f"## {config}: {_shape(group[0])}", ""]
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in group:
            lines.append("| " + " | ".join(_row(r, torch_times)) + " |")
        notes = [
            f"- {r['impl']} / {r['case']}: {r['note']}" for r in group if r["note"]
        ]
        lines += [""] + notes + ([""] if notes else [])
    masks = _mask_records(results)
    if masks:
        lines += [
            "## create_block_mask",
            "",
            "Median time of building the BlockMask (B = H = None), after warm-up; "
            "ours inside `jax.jit`, torch's with `_compile=True`.",
            "",
            "| mask | L | impl | ms | first call s |",
            "|---|---|---|---|---|",
        ]
        for r in masks:
            mask = r["case"][len(MASK_CASE_PREFIX) :]
            lines.append(
                f"| {mask} | {r['Lq']} | {r['impl']} | {_fmt(r['fwd_ms'])} | "
                f"{_fmt(r['compile_s'])} |"
            )
        lines.append("")
    if results["skipped"]:
        lines += [
            "## Skipped",
            "",
            "Grouped by implementation and reason; phase `fwdbwd`: the forward was "
            "timed, the backward not.",
            "",
            "| impl | phase | reason | config: cases |",
            "|---|---|---|---|",
        ]
        for (impl, phase, reason), where in _group_skipped(results["skipped"]).items():
            reason = reason.replace("|", "\\|")
            lines.append(f"| {impl} | {phase} | {reason} | {where} |")
        lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    return "\n".join(lines)


def _group_skipped(skipped: list[dict]) -> dict[tuple, str]:
    """{(impl, phase, reason): "config: case, case; config: case"}."""
    groups: dict[tuple, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s in skipped:
        reason = " ".join(str(s["reason"]).split())
        groups[(s["impl"], s.get("phase", "all"), reason)][s["config"]].append(
            s["case"]
        )
    return {
        key: "; ".join(f"{c}: {', '.join(cases)}" for c, cases in by_config.items())
        for key, by_config in groups.items()
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """TFLOP/s per case and implementation: a row per config, fwd and fwd+bwd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_config(_attention_records(results))
    impls = list(dict.fromkeys(r["impl"] for g in groups.values() for r in g))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    rows = max(1, len(groups))
    fig, axes = plt.subplots(rows, 2, figsize=(18, 3.8 * rows), squeeze=False)
    for row, (config, group) in enumerate(groups.items()):
        cases = list(dict.fromkeys(r["case"] for r in group))
        present = [i for i in impls if any(r["impl"] == i for r in group)]
        width = 0.8 / max(1, len(present))
        for col, key in enumerate(("fwd_tflops", "fwdbwd_tflops")):
            ax = axes[row][col]
            for j, impl in enumerate(present):
                values = {r["case"]: r[key] for r in group if r["impl"] == impl}
                xs = [
                    i + (j - (len(present) - 1) / 2) * width for i in range(len(cases))
                ]
                ys = [values.get(c) or 0.0 for c in cases]
                ax.bar(xs, ys, width, label=impl, color=colors[impl])
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, rotation=25, ha="right", fontsize=8)
            phase = "forward" if col == 0 else "forward + backward"
            ax.set_title(f"{config} ({_shape(group[0])}): {phase}", fontsize=9)
            ax.set_ylabel("TFLOP/s")
            if not any(r[key] for r in group):
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        axes[row][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"eqx_flexattn benchmarks on {results['meta'].get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_tables(results: dict[str, Any], console: Console) -> None:
    records = _attention_records(results)
    torch_times = _torch_times(records)
    for config, group in _by_config(records).items():
        table = Table(title=f"{config}: {_shape(group[0])}")
        for c in COLUMNS:
            table.add_column(c, justify="left" if c in ("case", "impl") else "right")
        for r in group:
            table.add_row(*_row(r, torch_times))
        console.print(table)
    masks = _mask_records(results)
    if masks:
        table = Table(title="create_block_mask (ms, median)")
        for c in ("mask", "L", "impl", "ms", "first call s"):
            table.add_column(c)
        for r in masks:
            table.add_row(
                r["case"][len(MASK_CASE_PREFIX) :],
                str(r["Lq"]),
                r["impl"],
                _fmt(r["fwd_ms"]),
                _fmt(r["compile_s"]),
            )
        console.print(table)
    if results["skipped"]:
        console.print(
            f"{len(results['skipped'])} skipped (see latest.md / latest.json)"
        )
