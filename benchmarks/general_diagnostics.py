"""What the task runs of benchmarks/general_results.py did on the way, from their train logs.

Per run: the intermediate loss at a few steps (does the general init start closer to the teacher, and
where does stage one end?), the prediction losses at the end, and the dev metric at every evaluation
(the table reports only the last one). Reads <work-dir>/<task>/general-runs/*/train_log.jsonl.

    python benchmarks/general_diagnostics.py --work-dir data/general
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STEPS = (10, 100, 400)  # the first logged step, early in stage one, the end of stage one at 500 steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("data/general"))
    args = parser.parse_args()
    print("| task | run | " + " | ".join(f"COS-NCE / MSE @{s}" for s in STEPS) + " | soft, hard @end | dev by step |")
    print("|---|---|" + "---:|" * len(STEPS) + "---|---|")
    for log in sorted(args.work_dir.glob("*/general-runs/*/train_log.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        train = {r["step"]: r for r in records if "eval" not in r}
        inter = [next((r[k] for k in ("cos_nce", "hidden_mse") if k in r), None) for r in (train.get(s, {}) for s in STEPS)]
        last = train[max(train)]
        evals = ", ".join(f"{r['step']}: " + "/".join(f"{v:.4f}" for v in r["eval"].values()) for r in records if "eval" in r)
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in inter)
        print(f"| {log.parts[-4]} | {log.parent.name} | {cells} | {last.get('soft', 0):.3f}, {last.get('hard', 0):.3f} | {evals} |")


if __name__ == "__main__":
    main()
