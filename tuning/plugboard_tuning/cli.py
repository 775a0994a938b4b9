"""`plugboard-tune`: train a prefix, soft prompt or LoRA module, evaluate it, publish it.

    plugboard-tune --dataset rotten-tomatoes --method prefix --name sentiment \\
        --publish 127.0.0.1:50051 --token-file admin.token --alias stable --promote-if "accuracy>=0.85"

Exit status: 0 done; 2 bad input (found before any training); 3 the served module disagreed with
the trained one; 130 interrupted (nothing half-published); 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from plugboard_server.errors import ModelLoadError
from plugboard_tuning.data import (
    DEFAULT_SENTIMENT_TEMPLATE,
    ROTTEN_TOMATOES_LABEL_WORDS,
    DataError,
    Example,
    LabelSpec,
    read_examples,
    rotten_tomatoes,
    split,
)
from plugboard_tuning.publish import Condition, PublishError
from plugboard_tuning.train import TrainConfig

DATASETS = ("rotten-tomatoes",)
EXIT_BAD_INPUT, EXIT_DISAGREES, EXIT_INTERRUPTED = 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plugboard-tune",
        description="Train a plugboard module (PEFT prefix / prompt / LoRA) on a frozen base model, "
        "evaluate it on held-out examples, and publish it to a registry directory or a running server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    base = p.add_argument_group("base model (the server's --model, so that fingerprints match)")
    base.add_argument(
        "--base", default="default", help="default, a model directory, a .gguf file or a cached hub id"
    )
    base.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    base.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])

    data = p.add_argument_group("data")
    src = data.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, metavar="FILE", help="a .jsonl or .csv file")
    src.add_argument("--dataset", choices=DATASETS, help="a built-in data set (fixed held-out split)")
    data.add_argument("--input-field", default="input", help="prompt column of input/output data")
    data.add_argument("--output-field", default="output", help="answer column of input/output data")
    data.add_argument("--text-field", help="text column of text/label data (with --label-field)")
    data.add_argument("--label-field", help="label column of text/label data (with --text-field)")
    data.add_argument("--template", help="prompt template for text/label data, with {text}")
    data.add_argument(
        "--label-words", metavar="L=W,...", help="label -> the word the model answers, e.g. pos=positive"
    )
    data.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of --data")
    data.add_argument(
        "--validation-fraction", type=float, default=0.0, help="share of training data for early stopping"
    )
    data.add_argument("--train-limit", type=int, metavar="N", help="use at most N training examples")
    data.add_argument("--test-limit", type=int, metavar="N", help="evaluate on at most N held-out examples")

    m = p.add_argument_group("method")
    m.add_argument("--method", choices=["prefix", "prompt", "lora"], required=True)
    m.add_argument("--virtual-tokens", type=int, default=16, help="prefix / prompt length")
    m.add_argument("--prefix-init", choices=["zero", "text", "random"], default="zero")
    m.add_argument(
        "--init-text", help="prompt tuning with --prefix-init text starts from this text's embeddings"
    )
    m.add_argument("--prefix-projection", action="store_true", help="train the prefix through an MLP")
    m.add_argument("--lora-r", type=int, default=8)
    m.add_argument("--lora-alpha", type=int, default=16)
    m.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names")
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument(
        "--no-eos", action="store_true", help="do not train the end-of-sequence token after targets"
    )

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=0, help="optimizer steps; 0 = epochs decide")
    t.add_argument("--lr", type=float, help="learning rate (default: prefix 1e-2, prompt 3e-2, lora 5e-4)")
    t.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="linear")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--early-stopping",
        type=int,
        default=0,
        metavar="N",
        help="stop after N evaluations without a better validation loss",
    )
    t.add_argument(
        "--eval-every", type=int, default=0, metavar="N", help="validate every N steps (0: each epoch)"
    )
    t.add_argument("--eval-batch-size", type=int, default=16)
    t.add_argument(
        "--no-eval-before",
        action="store_true",
        help="skip evaluating the base model (known from an earlier run)",
    )

    o = p.add_argument_group("output and publishing")
    o.add_argument("--output", type=Path, help="where the PEFT module is saved (default ./tuned/NAME)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    o.add_argument("--report", type=Path, help="the JSON report (default OUTPUT.report.json)")
    o.add_argument("--name", help="the module's registry name")
    o.add_argument("--description", default="")
    o.add_argument(
        "--publish",
        metavar="DIR|S3|HOST:PORT",
        help="a registry directory, an object-store registry (s3://bucket/prefix), or a running server",
    )
    o.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("PLUGBOARD_TOKEN_FILE") or None,
        help="the server's admin token ($PLUGBOARD_TOKEN_FILE)",
    )
    from plugboard_client.cli import add_tls_arguments

    add_tls_arguments(o)  # --tls-ca, --tls-cert, --tls-key, ... for a --publish server
    o.add_argument("--alias", help="point NAME@ALIAS at the new version (see --promote-if)")
    o.add_argument(
        "--promote-if",
        type=_condition,
        metavar="COND",
        help='move --alias only if this holds, e.g. "accuracy>=0.9"',
    )
    o.add_argument(
        "--no-check-served",
        action="store_true",
        help="skip comparing the server's answers with the trained model's",
    )
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _condition(text: str) -> Condition:
    try:
        return Condition.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _label_words(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    words = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise DataError(f"--label-words: {item!r} is not LABEL=WORD")
        words[label.strip()] = word.strip()
    return words


def load_data(args: argparse.Namespace) -> tuple[list[Example], list[Example], list[Example], dict[str, Any]]:
    """(train, validation, test, a description of the source) from the data arguments."""
    words = _label_words(args.label_words)
    if args.dataset == "rotten-tomatoes":
        train, test = rotten_tomatoes(
            limit_train=args.train_limit,
            limit_test=args.test_limit,
            template=args.template or DEFAULT_SENTIMENT_TEMPLATE,
            label_words=words or ROTTEN_TOMATOES_LABEL_WORDS,
        )
        source: dict[str, Any] = {"dataset": "rotten-tomatoes"}
    else:
        labels = None
        if args.text_field or args.label_field:
            if not words:
                raise DataError(
                    "text/label data needs --label-words, e.g. --label-words pos=positive,neg=negative"
                )
            labels = LabelSpec(label_words=words, template=args.template or "{text}")
        examples = read_examples(
            args.data,
            input_field=args.input_field,
            output_field=args.output_field,
            text_field=args.text_field,
            label_field=args.label_field,
            labels=labels,
        )
        train, test = split(examples, validation_fraction=args.test_fraction, seed=args.seed)
        train, test = train[: args.train_limit], test[: args.test_limit]
        source = {"file": str(args.data), "examples": len(examples)}
    validation: list[Example] = []
    if args.validation_fraction > 0:
        train, validation = split(train, validation_fraction=args.validation_fraction, seed=args.seed + 1)
    return train, validation, test, source


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # PEFT 0.21 calls a transformers 5 method that now warns about its own rename: noise to a user.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" and other library bars
    from plugboard_tuning.run import PublishFailed, RunOptions, run, write_report

    try:
        train, validation, test, source = load_data(args)
        cfg = TrainConfig(
            method=args.method,
            num_virtual_tokens=args.virtual_tokens,
            prefix_init=args.prefix_init,
            init_text=args.init_text,
            prefix_projection=args.prefix_projection,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_targets=tuple(filter(None, (s.strip() for s in args.lora_targets.split(",")))),
            lora_dropout=args.lora_dropout,
            add_eos=not args.no_eos,
            epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            seed=args.seed,
            early_stopping_patience=args.early_stopping,
            eval_every=args.eval_every,
        )
        from plugboard_client.cli import read_token_file, tls_kwargs

        token = None
        if args.token_file is not None:
            token = read_token_file(args.token_file)
        output = args.output or Path("tuned") / (
            args.name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        opts = RunOptions(
            train=train,
            validation=validation,
            test=test,
            config=cfg,
            output=output,
            base=args.base,
            device=args.device,
            dtype=args.dtype,
            name=args.name,
            publish=args.publish,
            token=token,
            tls=tls_kwargs(args),
            alias=args.alias,
            promote_if=args.promote_if,
            description=args.description,
            data_source=source,
            eval_batch_size=args.eval_batch_size,
            eval_before=not args.no_eval_before,
            check_served=not args.no_check_served,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
        if os.environ.get("RANK", "0") == "0":  # once, under torchrun / accelerate launch too
            print(f"data: {len(train)} training, {len(validation)} validation, {len(test)} held-out examples")
        result = run(opts)
        if result is None:  # another process than the main one under `accelerate launch`
            return 0
    except PublishFailed as e:  # after training: the module and the report are kept
        report_path = args.report or output.with_name(output.name + ".report.json")
        write_report(e.report, report_path)
        print(f"plugboard-tune: error: {e}\nreport: {report_path}", file=sys.stderr)
        return 1
    except (DataError, PublishError, ValueError) as e:
        print(f"plugboard-tune: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelLoadError as e:
        print(f"plugboard-tune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        published = getattr(e, "published", None)
        print(
            f"plugboard-tune: interrupted after publishing {published} (no alias moved)"
            if published
            else "plugboard-tune: interrupted; nothing was published",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    report_path = args.report or output.with_name(output.name + ".report.json")
    write_report(result.report, report_path)
    print(f"report: {report_path}")
    if result.agreement_ok is False:
        return EXIT_DISAGREES
    return 0


if __name__ == "__main__":
    sys.exit(main())
