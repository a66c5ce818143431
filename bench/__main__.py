"""``python -m bench [--only loader,model] [--quick]``: run every section, print each figure
next to its baselines (ratios), and write all rows to one JSON file."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine

SECTIONS = {
    "loader": "training loader: cells/s as collated batches, peak RSS",
    "model": "model step on CPU: ms and peak memory per batch",
    "dag": "snakemake dry run with many datasets: time and memory",
    "preprocess": "preprocess stage vs scdataloader's Preprocessor: cells/s",
    "preprocess-scale": "chunked preprocess on 100k/1M-cell CELLxGENE-shaped files: peak RSS",
    "embeddings": "ESM gene embeddings: proteins/s vs a notebook loop (650M shape on GPU)",
    "finetune": "fine-tuning step: LoRA vs full fine-tuning, ms and peak memory",
    "gpu": "model step on a GPU: tokens/s, MFU, memory (skipped without CUDA)",
    "recipe": "training recipe vs upstream 2.3.8's scprint fit: validation loss curves",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    parser.add_argument("--workdir", type=Path, default=Path("bench/.work"))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}")

    results, failed = [], []
    for name in names:
        out = args.out.parent / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", f"bench.{name.replace('-', '_')}", "--json", str(out)]
        cmd += ["--workdir", str(args.workdir)] + (["--quick"] if args.quick else [])
        print(f"== {name}: {SECTIONS[name]}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        took = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            print(f"!! section {name} failed (exit {proc.returncode}) after {took:.0f} s")
            failed.append(name)
            continue
        section = json.loads(out.read_text())
        section["seconds"] = round(took, 1)
        results.append(section)
        print_section(section)

    report = {"machine": machine(), "quick": args.quick, "sections": results, "failed": failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    print()
    for section in results:
        print_section(section)
    print(f"\nwrote {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def print_section(section: dict) -> None:
    """One line per row: value, unit, and value / baseline for every baseline of its figure."""
    rows = section["rows"]
    print(f"\n[{section['section']}] ({section.get('seconds', '?')} s)")
    figures = list(dict.fromkeys((r["figure"], r["unit"]) for r in rows))
    for figure, unit in figures:
        same = [r for r in rows if (r["figure"], r["unit"]) == (figure, unit)]
        bases = [r for r in same if r["baseline"]]
        print(f"  {figure} [{unit}]")
        for r in same:
            ratios = "  ".join(
                f"{r['value'] / b['value']:.2f}x {b['impl']}"
                for b in bases
                if b is not r and b["value"] and _known(b["value"]) and _known(r["value"])
            )
            tag = " (baseline)" if r["baseline"] else ""
            note = f"  - {r['note']}" if r.get("note") else ""
            print(f"    {r['impl']:<34}{_fmt(r['value']):>12}{tag}  {ratios}{note}")


def _fmt(value: float) -> str:
    if not _known(value):  # a row that could not be measured here; its note says why
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _known(value: float) -> bool:
    return value == value  # NaN marks a figure not measured


if __name__ == "__main__":
    sys.exit(main())
