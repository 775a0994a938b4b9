"""`make demo`: tune a sentiment prefix on Rotten Tomatoes, publish it to the running server, try it.

    make serve            # in one terminal
    make demo             # in another: a few minutes on 2 CPU cores

The base model answers "Is this review positive or negative?" little better than a coin; after a
few hundred training steps the prefix answers with the label word and stops. The demo publishes it
as `sentiment` (alias `stable` if accuracy holds), then sends new reviews through the client with
and without the module.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from plugboard_client import Client
from plugboard_client.cli import read_token_file
from plugboard_client.errors import PlugboardError
from plugboard_tuning.data import DEFAULT_SENTIMENT_TEMPLATE, rotten_tomatoes
from plugboard_tuning.publish import Condition
from plugboard_tuning.run import RunOptions, run, write_report
from plugboard_tuning.train import TrainConfig

# New reviews, not from the corpus.
REVIEWS = [
    "A warm, funny and beautifully acted film that stays with you long after the credits.",
    "Two hours of my life I will never get back; the plot makes no sense and the jokes fall flat.",
    "The effects are dazzling, and the story is gripping from the first scene to the last.",
    "Dull, overlong and painfully predictable.",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plugboard-demo", description=__doc__.split("\n")[0])
    p.add_argument("--target", default=os.environ.get("PLUGBOARD_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token-file", type=Path, default=os.environ.get("PLUGBOARD_TOKEN_FILE") or None)
    p.add_argument("--steps", type=int, default=240, help="training steps of 8 examples")
    p.add_argument("--test-limit", type=int, default=200, help="held-out reviews to evaluate on")
    p.add_argument("--name", default="sentiment")
    p.add_argument("--output", type=Path, default=Path("tuned/sentiment-demo"))
    args = p.parse_args(argv)

    token = read_token_file(args.token_file) if args.token_file else None
    with Client(args.target, timeout=60) as client:
        try:
            client.wait_ready(timeout=5)
        except PlugboardError as e:
            print(f"no plugboard server at {args.target} ({e}); start one first: make serve", file=sys.stderr)
            return 1
        base = client.model_info().model
    train, test = rotten_tomatoes(limit_test=args.test_limit)
    print(f"Rotten Tomatoes: {len(train)} training reviews, {len(test)} held-out; base model {base!r}")
    opts = RunOptions(
        train=train,
        test=test,
        config=TrainConfig(method="prefix", max_steps=args.steps, lr_schedule="linear", warmup_steps=10),
        output=args.output,
        base=base,
        device="cpu",
        name=args.name,
        publish=args.target,
        token=token,
        alias="stable",
        promote_if=Condition.parse("accuracy>=0.75"),
        description="sentiment of a film review: answers positive or negative (make demo)",
        data_source={"dataset": "rotten-tomatoes"},
        overwrite=True,
    )
    result = run(opts)
    write_report(result.report, args.output.with_name(args.output.name + ".report.json"))
    assert result.before is not None and result.published is not None
    print(f"\naccuracy on {result.after.examples} held-out reviews: "
          f"before {result.before.accuracy:.3f} -> after {result.after.accuracy:.3f}")  # fmt: skip

    ref = result.published.ref
    print(f"\nlive predictions through the server, base model vs {ref}:")
    with Client(args.target, timeout=60) as client:
        for review in REVIEWS:
            prompt = DEFAULT_SENTIMENT_TEMPLATE.format(text=review)
            plain = client.generate(prompt, max_new_tokens=3, temperature=0.0).text
            tuned = client.generate(prompt, adapter=ref, max_new_tokens=3, temperature=0.0).text
            scores = client.score(prompt, choices=[" positive", " negative"], adapter=ref).scores
            p_pos = next(s.probability for s in scores if s.choice == " positive")
            print(
                f"  {review[:56]!r:60} base: {plain.strip()!r:12} "
                f"tuned: {tuned.strip()!r:12} P(positive) {p_pos:.2f}"
            )
    return 0 if result.agreement_ok is not False else 3


if __name__ == "__main__":
    sys.exit(main())
