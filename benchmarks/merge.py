"""Merge several result files of one device into one, and rewrite its md and png.

    python -m benchmarks.merge OUT_DIR RUN1/latest.json RUN2/latest.json ...

A measurement (impl, config, case) is taken from the first file that has it; a skip
is kept only where no file measured that combination, preferring the first reason
that is not a spent time budget. Files must come from the same device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import report


def _key(entry: dict) -> tuple:
    return entry["impl"], entry["config"], entry["case"]


def merge(docs: list[dict]) -> dict:
    devices = {d["meta"].get("device") for d in docs}
    if len(devices) != 1:
        raise ValueError(
            f"results come from different devices: {sorted(map(str, devices))}"
        )
    records: dict[tuple, dict] = {}
    for doc in docs:
        for r in doc["records"]:
            records.setdefault(_key(r), r)
    skipped: dict[tuple, dict] = {}
    for doc in docs:
        for s in doc["skipped"]:
            k = (*_key(s), s.get("phase"))
            if _key(s) in records and s.get("phase", "all") == "all":
                continue
            old = skipped.get(k)
            if old is None or (
                "time budget" in old["reason"] and "time budget" not in s["reason"]
            ):
                skipped[k] = s
    meta = dict(docs[0]["meta"])
    meta["merged_from"] = [d["meta"].get("command") for d in docs]
    return {
        "meta": meta,
        "records": list(records.values()),
        "skipped": list(skipped.values()),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    out, *paths = argv
    docs = [json.loads(Path(p).read_text()) for p in paths]
    for path in report.write_all(merge(docs), Path(out)):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
