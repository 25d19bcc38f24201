#!/usr/bin/env python3
"""Turns ci/gpu/run.sh's results.jsonl into gpu-report.md (tables) and gpu-report.json.

    report.py RESULTS.jsonl MACHINE.txt MODE OUT.md OUT.json

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


def main():
    res, machine, mode, out_md, out_json = sys.argv[1:6]
    recs = [json.loads(l) for l in open(res) if l.strip()]
    steps = [r for r in recs if r.get("kind") == "step"]
    benches = [r for r in recs if "s_per_step" in r]
    checks = [r for r in recs if "grad_rel" in r]
    ours = {b["label"]: b for b in benches if b["framework"].startswith("candle")}
    torch = {b["label"]: b for b in benches if not b["framework"].startswith("candle")}
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
        md.append("Model FLOPs per step = 2 F_lin + 3 F_attn with F_lin = 24 D^2 S L and "
                  "F_attn = 4 S^2 D L (S tokens, width D, L blocks; the base is frozen, so its "
                  "backward needs input gradients only; recomputation is not counted). "
                  f"MFU = model FLOPs / (s/step x {benches[0]['peak_tflops']:.0f} TFLOP/s).\n")
        md.append("| case | framework | dtype | tokens S | s/step | of which fwd+bwd / update | peak memory (after build) | model TFLOP/s | MFU | ours / PyTorch |")
        md.append("|---|---|---|---|---|---|---|---|---|---|")
        for label in sorted(set(ours) | set(torch), key=lambda l: (l.split("-")[0], l)):
            for side in (ours, torch):
                b = side.get(label)
                if not b:
                    continue
                ratio = ""
                if side is ours and label in torch:
                    ratio = f"{b['s_per_step'] / torch[label]['s_per_step']:.2f}x"
                split = (f"{b['accumulate_s']:.4f} / {b['update_s']:.4f}"
                         if "accumulate_s" in b else "")
                md.append(f"| {label} | {b['framework']} | {b['dtype']} | {b['tokens']} | "
                          f"{b['s_per_step']:.4f} | {split} | {gb(b['peak_bytes'])} ({gb(b.get('resident_bytes'))}) | {b['tflops']:.3g} | "
                          f"{100 * b['mfu']:.1f}% | {ratio} |")
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
