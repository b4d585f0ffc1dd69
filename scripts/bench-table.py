#!/usr/bin/env python3
"""One line per row of `pagoda bench --json` documents (one JSON array a line)."""
import json
import sys

for line in open(sys.argv[1]):
    line = line.strip()
    if not line or not line.startswith("["):
        continue
    for r in json.loads(line):
        print(
            f"{r['model'][-30:]:>30} {r.get('weight_dtype', ''):>5} {r.get('backend', ''):>5} B={r['batch']:<4} "
            f"prefill {r['prefill_tokens_per_s']:>9.0f} t/s  decode {r['decode_tokens_per_s']:>9.0f} t/s  "
            f"step p50 {r['decode_step_ms_p50']:.3f} ms"
        )
