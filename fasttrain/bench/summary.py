"""`fasttrain bench summary FILE.jsonl...`: one short table of the --json output of any benchmarks."""
from __future__ import annotations

import json


def summarize(records: list[dict]) -> str:
    """A short table of JSON records from any benchmark: one line each, the headline figure, its
    ratio to the baseline of that benchmark, and MFU (step) or % of copy bandwidth (kernels)."""
    lines = [f"{'bench':<8}{'what':<30}{'figure':>16}  {'vs baseline':<22}{'MFU/%copy':>10}"]
    for r in records:
        b = r.get("bench", "?")
        if b == "kernels":
            what = f"{r.get('op')} {r.get('pass')} D={r.get('D')} {r.get('impl')}"
            fig = f"{r.get('ms', float('nan')):.3f} ms"
            vs = f"{r['vs_eager']:.2f}x eager" if r.get("vs_eager") else "-"
            eff = f"{r['pct_of_copy']:.0f}%" if r.get("pct_of_copy") is not None else "-"
        else:
            what = str(r.get("mode"))
            ips = r.get("images_per_s")
            fig = f"{ips:,.1f} img/s" if ips is not None else "stopped"
            if r.get("ratio_vs_step_only") is not None:
                vs = f"{r['ratio_vs_step_only']:.2f}x step-only"
            elif r.get("ratio_vs_reference") is not None:
                vs = f"{r['ratio_vs_reference']:.2f}x reference"
            else:
                vs = "-"
            if b == "loader" and r.get("feed_images_per_s") is not None:
                what += f" (feed {r['feed_images_per_s']:,.0f}/s)"
            eff = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"{b:<8}{what[:29]:<30}{fig:>16}  {vs:<22}{eff:>10}")
    devices = sorted({str(r.get("provenance", {}).get("device")) for r in records})
    lines.append(f"device: {', '.join(devices)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`fasttrain bench summary FILE.jsonl...`: the short table of saved --json output."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fasttrain bench summary FILE.jsonl [...]")
        return 0 if argv else 2
    records = []
    for path in argv:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.startswith("{")]
    print(summarize(records))
    return 0
