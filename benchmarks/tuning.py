"""Tune one module of each kind on Rotten Tomatoes with the default model, publish each to a running
server, and print held-out accuracy before / after, training time and served-vs-trained agreement.

    make serve                                    # in one terminal
    python -m benchmarks.tuning --steps 450       # ~15 min per method on 2 CPU cores

Each method runs `plugboard-tune` as its own process (what a user runs); the base model's figures
are measured once, with the first method. Reports land in --out as METHOD.report.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "prefix": ["--virtual-tokens", "16"],
    "prompt": [
        "--virtual-tokens", "16", "--prefix-init", "text",
        "--init-text", "Classify the sentiment of this movie review as positive or negative.",
    ],
    "lora": ["--lora-r", "8", "--lora-alpha", "16", "--lora-targets", "q_proj,v_proj"],
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--prefix-steps", type=int, help="steps for the prefix (default --steps)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--test-limit", type=int, help="held-out reviews (default: all 1,001)")
    p.add_argument("--out", type=Path, default=Path("var/tuning-bench"))
    p.add_argument("--extra", default="", help="more plugboard-tune arguments, for every method")
    args = p.parse_args(argv)

    tune = str(Path(sys.executable).parent / "plugboard-tune")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for i, method in enumerate(args.methods):
        report = args.out / f"{method}.report.json"
        steps = args.prefix_steps if method == "prefix" and args.prefix_steps else args.steps
        cmd = [
            tune, "--dataset", "rotten-tomatoes", "--method", method, "--max-steps", str(steps),
            "--lr-schedule", "cosine", "--warmup-steps", "20", *METHODS[method],
            "--name", f"rt-{method}", "--publish", args.target,
            "--output", str(args.out / f"{method}-{stamp}"),
            "--report", str(report), "-q", *args.extra.split(),
        ]  # fmt: skip
        if args.test_limit:
            cmd += ["--test-limit", str(args.test_limit)]
        if i > 0:
            cmd.append("--no-eval-before")  # the same base model: measured with the first method
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd).returncode
        wall = time.perf_counter() - start
        if code != 0:
            print(f"{method}: plugboard-tune exited {code}", file=sys.stderr)
            return code
        rows.append((method, json.loads(report.read_text()), wall))

    before = next(r["evaluation"]["before"] for _, r, _ in rows if r["evaluation"]["before"])
    print(
        f"\nbase model, held-out accuracy {before['accuracy']:.4f}, exact match {before['exact_match']:.4f}"
    )
    header = ("method", "steps", "train s", "accuracy", "exact", "agreement (score; generate)", "run s")
    print("{:8} {:>5} {:>8} {:>8} {:>6} {:>28} {:>6}".format(*header))
    for method, r, wall in rows:
        ev, tr, check = r["evaluation"]["after"], r["training"], r["served_check"]
        n = check["examples"]
        agree = f"{check['score_agree']}/{n}; {check['generate_agree']}/{n}"
        cells = (method, tr["steps"], tr["seconds"], ev["accuracy"], ev["exact_match"], agree, wall)
        print("{:8} {:>5} {:>8.0f} {:>8.4f} {:>6.3f} {:>28} {:>6.0f}".format(*cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
