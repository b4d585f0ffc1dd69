#!/usr/bin/env python3
"""Summarises an `ncu --csv --print-units base` log: one line per (kernel, grid, block),
sorted by total GPU time, with mean duration and DRAM bandwidth.
Usage: ncu-summary.py LOG [TOP]"""
import csv, sys, collections
path = sys.argv[1]; top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
lines = [l for l in open(path, errors="replace") if l.startswith('"')]
rows = collections.defaultdict(dict)
for r in csv.DictReader(lines):
    try:
        v = float(r["Metric Value"].replace(",", ""))
    except (KeyError, ValueError):
        continue
    k = rows[r["ID"]]
    k["key"] = (r["Kernel Name"].split("(")[0], r["Grid Size"], r["Block Size"])
    k[r["Metric Name"]] = v
groups = collections.defaultdict(list)
for k in rows.values():
    groups[k["key"]].append(k)
total = sum(k.get("gpu__time_duration.sum", 0) for k in rows.values())
print(f"{len(rows)} kernels, {total/1e3:.1f} us GPU time in all")
print(f"{'kernel':<22} {'grid':>16} {'block':>12} {'n':>5} {'mean us':>9} {'total us':>10} {'MB rd':>8} {'GB/s':>7}")
out = []
for key, ks in groups.items():
    t = [k.get("gpu__time_duration.sum", 0) for k in ks]
    rd = [k.get("dram__bytes_read.sum", 0) + k.get("dram__bytes_write.sum", 0) for k in ks]
    out.append((sum(t), key, len(ks), sum(t) / len(ks), sum(rd) / len(ks)))
for tot, (name, grid, block), n, mean, b in sorted(out, reverse=True)[:top]:
    gbs = b / mean if mean else 0
    print(f"{name[:22]:<22} {grid:>16} {block:>12} {n:>5} {mean/1e3:>9.2f} {tot/1e3:>10.1f} {b/1e6:>8.2f} {gbs:>7.0f}")
