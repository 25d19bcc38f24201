"""Averages ci/mosaic_results.sh's runs into the README's markdown table.

For each setting and seed: the held-out measures of the run's last validation line in
metrics.jsonl, and the final L_diff as the mean of its last 20 steps' loss_diff; then the mean
(and the spread, min..max) over the seeds.
"""
import json
import sys
from pathlib import Path

ROWS = [
    ("base", "base alone (no LoRA training)"),
    ("diff", "LoRA, L_diff only"),
    ("scal", "LoRA, L_diff + SCAL"),
    ("scal-mdl", "LoRA, L_diff + SCAL + MDL (paper)"),
]


def run_values(path: Path) -> dict:
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    steps = [l for l in lines if "loss_diff" in l]
    measured = [l for l in lines if "measures" in l]
    if not measured:
        raise SystemExit(f"{path}: no validation line with measures")
    m = measured[-1]["measures"]
    tail = steps[-20:]
    return {
        "accuracy": m["correspondence_accuracy"],
        "chance": m["correspondence_chance"],
        "separation": m["separation"],
        "separation_chance": m["separation_chance"],
        "identity": m["identity"],
        "identity_zeroed": m["identity_refs_zeroed"],
        "identity_ceiling": m["identity_ceiling"],
        "diff": sum(l["loss_diff"] for l in tail) / len(tail),
    }


def cell(values, key, digits=3):
    xs = [v[key] for v in values]
    mean = sum(xs) / len(xs)
    return f"{mean:.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def main() -> None:
    out = Path(sys.argv[1])
    seeds = sys.argv[2:]
    print(
        f"Held-out measures after 200 steps, mean (min-max) over seeds {', '.join(seeds)}:\n"
    )
    print(
        "| setting | correspondence accuracy | separation | identity with refs | "
        "identity refs zeroed | final L_diff |"
    )
    print("|---|---|---|---|---|---|")
    chance = sep_chance = ceiling = None
    for key, label in ROWS:
        values = [run_values(out / f"{key}-seed{s}" / "metrics.jsonl") for s in seeds]
        chance = sum(v["chance"] for v in values) / len(values)
        sep_chance = sum(v["separation_chance"] for v in values) / len(values)
        ceiling = sum(v["identity_ceiling"] for v in values) / len(values)
        print(
            f"| {label} | {cell(values, 'accuracy')} | {cell(values, 'separation')} | "
            f"{cell(values, 'identity')} | {cell(values, 'identity_zeroed')} | "
            f"{cell(values, 'diff', 4)} |"
        )
    print(
        f"\nChance: correspondence accuracy {chance:.3f} (a peak within one token of the "
        f"true one at random), separation {sep_chance:.3f} (uniform attention); identity "
        f"ceiling {ceiling:.3f} (the clean target)."
    )


if __name__ == "__main__":
    main()
