"""Turn a pytest-benchmark JSON file into the markdown tables of bench/RESULTS.md.

    python bench/report.py results.json > table.md

One table per benchmark group: median and min time, GB/s from the byte count the
benchmark recorded, peak extra memory, and the time relative to the group's reference
provider (torch_trl for policy_loss, torch for the others).
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict


def _provider(name: str) -> str:
    m = re.search(r"\[([^-\]]+)", name)
    return m.group(1) if m else name


def main(path: str) -> None:
    data = json.load(open(path))
    machine = data.get("machine_info", {})
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    print(f"Device: {first.get('device', machine.get('cpu', {}).get('brand_raw', '?'))}; "
          f"torch {first.get('torch', '?')}, triton {first.get('triton', '-')}, "
          f"liger-kernel {first.get('liger_kernel', '-')}; {data.get('datetime', '')}\n")
    for group in sorted(groups):
        rows = groups[group]
        ref = next((r for r in rows if _provider(r["name"]) in ("torch_trl", "torch")), None)
        print(f"### {group}\n")
        print("| provider | median ms | min ms | GB/s | peak extra MB | peak extra / logits | time vs reference |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            e = r["extra_info"]
            med = r["stats"]["median"]
            rel = f"{med / ref['stats']['median']:.2f}x" if ref else "-"
            gbs = f"{e['GB/s']:.1f}" if "GB/s" in e else "-"
            mem = f"{e['peak_extra_MB']:.0f}" if "peak_extra_MB" in e else "-"
            memx = f"{e['peak_extra_x_logits']:.2f}" if "peak_extra_x_logits" in e else "-"
            print(f"| {_provider(r['name'])} | {med * 1e3:.2f} | {r['stats']['min'] * 1e3:.2f} | {gbs} | {mem} | {memx} | {rel} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
