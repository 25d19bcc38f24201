#!/usr/bin/env python3
"""Turns ci/gpu/run.sh's results.jsonl into gpu-report.md (tables) and gpu-report.json.

    report.py RESULTS.jsonl MACHINE.txt MODE OUT.md OUT.json
    report.py --bench-table RESULTS.jsonl     # only the side-by-side step table, to stdout

Exits 1 when a step failed or did not run (skipped steps do not count).

Records: {"kind": "step"} for each step's status; bench-step and torch_baseline.py lines
(they carry "s_per_step"); check-device lines (they carry "grad_rel").
"""
import datetime
import json
import os
import sys


def gb(b):
    return f"{b / 1e9:.2f} GB" if b else "n/a"


def by_framework(benches):
    """(ours, torch): the bench records of each side by label."""
    ours = {b["label"]: b for b in benches if b["framework"].startswith("candle")}
    torch = {b["label"]: b for b in benches if not b["framework"].startswith("candle")}
    return ours, torch


def ratio(b, other):
    """Our s/step over PyTorch's, only where both ran the same work."""
    if (b.get("batch"), b["tokens"]) != (other.get("batch"), other["tokens"]):
        return f"n/a (batch x tokens {b.get('batch')} x {b['tokens']} vs {other.get('batch')} x {other['tokens']})"
    return f"{b['s_per_step'] / other['s_per_step']:.2f}x"


def bench_table(benches):
    """The side-by-side table of bench-step and torch_baseline.py records (markdown lines)."""
    ours, torch = by_framework(benches)
    cpu = all(b["device"].lower().startswith("cpu") for b in benches)
    unit, scale = ("GFLOP/s", 1e3) if cpu else ("TFLOP/s", 1.0)
    md = ["Model FLOPs per step = 2 F_lin + 3 F_attn with F_lin = 24 D^2 S L and "
          "F_attn = 4 S^2 D L per sample (S tokens, width D, L blocks; the base is frozen, so its "
          "backward needs input gradients only; recomputation is not counted). "
          + ("Peak memory: ours is the heap's peak during the steps above the built run (the "
             "counting allocator); peak RSS is the whole process's, the one measure both sides give."
             if cpu else
             f"MFU = model FLOPs / (s/step x {benches[0]['peak_tflops']:.0f} TFLOP/s)."), ""]
    md.append(f"| case | framework | dtype | batch x tokens S | s/step | of which fwd+bwd / update | "
              f"peak memory (after build) | peak RSS | model FLOPs | {unit} | MFU | ours / PyTorch |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label in sorted(set(ours) | set(torch), key=lambda l: (l.split("-")[0], l)):
        for side in (ours, torch):
            b = side.get(label)
            if not b:
                continue
            r = ratio(b, torch[label]) if side is ours and label in torch else ""
            split = (f"{b['accumulate_s']:.4f} / {b['update_s']:.4f}"
                     if "accumulate_s" in b else "")
            mem = f"{gb(b['peak_bytes'])} ({gb(b.get('resident_bytes'))})" if side is ours else gb(b['peak_bytes'])
            mfu = "-" if cpu else f"{100 * b['mfu']:.1f}%"  # no stated peak for a CPU
            md.append(f"| {label} | {b['framework']} | {b['dtype']} | {b.get('batch', 1)} x {b['tokens']} | "
                      f"{b['s_per_step']:.4f} | {split} | {mem} | {gb(b.get('max_rss_bytes'))} | "
                      f"{b['model_flops']:.3g} | {b['tflops'] * scale:.3g} | {mfu} | {r} |")
    return md


def main():
    if sys.argv[1] == "--bench-table":
        print("\n".join(bench_table([json.loads(l) for l in open(sys.argv[2]) if l.strip()])))
        return 0
    res, machine, mode, out_md, out_json = sys.argv[1:6]
    recs = [json.loads(l) for l in open(res) if l.strip()]
    steps = [r for r in recs if r.get("kind") == "step"]
    benches = [r for r in recs if "s_per_step" in r]
    checks = [r for r in recs if "grad_rel" in r]
    md = []
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md.append(f"# GPU report ({mode} mode), {when}\n")
    md.append(f"Machine: {open(machine).read().strip()}\n")

    md.append("## Steps\n")
    md.append("| step | result | seconds (limit) |\n|---|---|---|")
    for s in steps:
        if s.get("skipped"):
            md.append(f"| {s['name']} | skipped: {s['skipped']} | - |")
            continue
        rc = s["rc"]
        what = "pass" if rc == 0 else ("TIMED OUT" if s.get("timed_out") else
                                       ("NOT RUN (no device)" if rc == 3 else f"FAIL (rc {rc})"))
        md.append(f"| {s['name']} | {what} | {s['seconds']} ({s['limit_s']}) |")
    failed = [s for s in steps if not s.get("skipped") and s["rc"] != 0]

    if checks:
        md.append("\n## One training step on the device against the CPU\n")
        md.append("| device | dtype | recompute | losses: max rel. diff | LoRA gradients: max rel. diff (worst tensor) | tolerance | result |")
        md.append("|---|---|---|---|---|---|---|")
        for c in checks:
            rec = {True: "on", False: "off"}.get(c.get("recompute"), "?")
            md.append(f"| {c['device']} | {c['dtype']} | {rec} | {c['loss_rel']:.2e} | {c['grad_rel']:.2e} "
                      f"({c['worst_tensor']}) | {c['tolerance']:.0e} | {'pass' if c['pass'] else 'FAIL'} |")

    if benches:
        md.append("\n## Training steps\n")
        md.extend(bench_table(benches))
        ours, torch = by_framework(benches)
        overhead = []
        for label, b in ours.items():
            off = ours.get(label + "-nolosses")
            if off:
                pct = 100 * (b["s_per_step"] / off["s_per_step"] - 1)
                overhead.append(f"| {label} | {b['s_per_step']:.4f} | {off['s_per_step']:.4f} | {pct:+.1f}% |")
        if overhead:
            md.append("\n## SCAL/MDL overhead (same step with the losses off)\n")
            md.append("| case | s/step with losses | without | overhead |\n|---|---|---|---|")
            md.extend(overhead)

    for b in benches:
        if b.get("phases"):
            md.append(f"\n## Where the time goes: {b['label']} (device synchronised at every phase; phases nest)\n")
            md.append("| phase | s per step |\n|---|---|")
            md.extend(f"| {name} | {secs:.4f} |" for name, secs in b["phases"])
    rows_log = os.path.join(os.path.dirname(res), "logs", "rows-vs-official.log")  # before logs.txt
    if os.path.exists(rows_log):
        table = [l for l in open(rows_log, errors="replace") if l.startswith("|") or not l.strip()]
        if table:
            md.append("\n## Loss rows: the official full maps (a) against the fused op (b), one block\n")
            md.append("".join(table).strip())
    md.append(f"\n{len(failed)} step(s) failed or did not run: "
              + (", ".join(s["name"] for s in failed) if failed else "none") + ".")
    md.append("Every step's log is in logs.txt.\n")
    open(out_md, "w").write("\n".join(md) + "\n")
    json.dump({"mode": mode, "machine": open(machine).read().strip(), "when": when,
               "records": recs}, open(out_json, "w"), indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
