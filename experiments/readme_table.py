"""Markdown tables for the README from a bench results file.

    python -m experiments.readme_table experiments/results/cpu-cpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments._io import model_rows
from experiments.bench import overhead_text


def tables(result: dict) -> str:
  out = []
  for name, desc in result["models"].items():
    rows, base = model_rows(result, name)
    out.append(f"**{desc}**\n")
    out.append("| strategy | temp MiB | x temp | saved act. MiB | +FLOPs % | step ms | x time "
               "| grads |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
      label = r["strategy"] + (f" → {r['auto_choice']}" if r.get("auto_choice") else "")
      if r.get("error"):
        least = r["error"].split("least reached is ")[-1].split(" ")[0] \
            if "least reached" in r["error"] else ""
        why = f"infeasible (least temp {int(least.replace(',', '')) / 2**20:.1f} MiB)" \
            if least else r["error"][:60]
        out.append(f"| {label} | {why} | | | | | | |")
        continue
      out.append(
          f"| {label} | {r['temp_bytes'] / 2**20:.1f} | {r['temp_bytes'] / base['temp_bytes']:.2f}"
          f" | {r['activation_bytes'] / 2**20:.1f} | {r['recompute_overhead_pct']:.1f} | "
          f"{r['step_ms_median']:.1f} ± {r['step_ms_spread']:.1f}"
          f"{'' if r.get('timing_reliable', True) else ' ?'} | {overhead_text(r, base)} | "
          f"{'match' if r['grads_match'] else 'DIFFER'} |")
    out.append("\nPareto (each step faster beyond the timing spread): "
               f"{' < '.join(result['pareto'][name])}\n")
  return "\n".join(out)


if __name__ == "__main__":
  print(tables(json.loads(Path(sys.argv[1]).read_text())))
