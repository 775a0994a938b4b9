"""One tuning run: check everything, evaluate, train, evaluate, save, publish, check the served module.

Every check that can fail without training (the data, the name, the output directory, the target
and its base model) runs before the first training step. The module is saved to a temporary
directory and renamed into place, and publishing is atomic at both targets, so an interrupted run
leaves neither a half-written output directory nor a half-published version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugboard_tuning.data import DataError, Example
from plugboard_tuning.evaluate import Evaluation, evaluate, label_choices
from plugboard_tuning.publish import Condition, Published, PublishError, Target, open_target
from plugboard_tuning.served import check_served
from plugboard_tuning.train import StepInfo, TrainConfig, planned_steps, save, train

__all__ = ["Interrupted", "PublishFailed", "RunOptions", "RunResult", "run", "write_report"]


class PublishFailed(PublishError):
    """Publishing failed after training; the module is saved and `report` holds the run's figures."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the module was published (complete; its alias, if any, not moved)."""

    def __init__(self, published: str) -> None:
        super().__init__(published)
        self.published = published


@dataclass
class RunOptions:
    train: list[Example]
    test: list[Example]  # held out: evaluated before and after, and checked through the server
    config: TrainConfig
    output: Path
    validation: list[Example] = field(default_factory=list)  # for early stopping
    base: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    name: str | None = None  # the module's registry name; needed to publish
    publish: str | None = None  # a registry directory or host:port
    token: str | None = None  # the server's admin token
    tls: dict[str, Any] = field(default_factory=dict)  # Client's TLS options for a server: tls_ca=, ...
    alias: str | None = None
    promote_if: Condition | None = None
    description: str = ""
    data_source: dict[str, Any] = field(default_factory=dict)  # what the data was, for the metadata
    eval_batch_size: int = 16
    eval_before: bool = True  # False: skip the base model's figures (the same for every run on it)
    check_served: bool = True
    overwrite: bool = False
    progress: bool = True
    log: Callable[[str], None] = print


@dataclass
class RunResult:
    report: dict[str, Any]
    before: Evaluation | None
    after: Evaluation
    published: Published | None = None
    agreement_ok: bool | None = None


def run(opts: RunOptions) -> RunResult | None:
    """Run it; None in the processes other than the main one under `accelerate launch`.

    Under `accelerate launch` every process trains its share of each step; the main process alone
    evaluates, saves and publishes.
    """
    _check_options(opts)
    import torch
    from accelerate import PartialState

    from plugboard_server.models.loading import load_model

    # Multi-process on CPU (torchrun / accelerate launch) only when told it is CPU (gloo).
    cpu = opts.device == "cpu" or (opts.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    device = opts.device
    if state.num_processes > 1 and device == "auto" and state.device.type == "cuda":
        device = str(state.device)  # this process's own GPU, not everyone on cuda:0
    say = opts.log if state.is_main_process else _quiet
    say(f"loading base model {opts.base} ...")
    loaded = load_model(opts.base, device=device, dtype=opts.dtype)
    say(f"base model {loaded.name} ({loaded.fingerprint}) on {loaded.device}")
    target: Target | None = None
    try:
        if opts.publish is not None:
            assert opts.name is not None
            target = open_target(opts.publish, token=opts.token, tls=opts.tls, model=loaded.model)
            target.check_base(opts.name, loaded.fingerprint)  # before any training, in every process
        result = _run(opts, loaded, target, state.is_main_process, state.num_processes)
        if state.num_processes > 1:
            # Every process leaves together, and the process group goes before the interpreter does:
            # a process exiting with its gloo group alive (the others still evaluating) can abort in
            # the group's destructor ("terminate called without an active exception").
            state.wait_for_everyone()
            state.destroy_process_group()
        return result
    finally:
        if target is not None:
            target.close()


def _quiet(_: str) -> None:
    pass


def _run(
    opts: RunOptions, loaded: Any, target: Target | None, main: bool, processes: int
) -> RunResult | None:
    say, tok, cfg = opts.log, loaded.tokenizer, opts.config
    choices = label_choices(opts.test)
    if not main:
        train(loaded.model, tok, opts.train, cfg, validation=opts.validation or None)
        return None

    def evaluation(model: Any, what: str) -> Evaluation:
        with _bar(opts, len(opts.test), f"eval {what}", "ex") as bar:
            ev = evaluate(
                model,
                tok,
                opts.test,
                eos_token_ids=loaded.eos_token_ids,
                choices=choices,
                batch_size=opts.eval_batch_size,
                on_batch=bar.update,
            )
        say(f"{what:>6}: {_figures_text(ev)} on {ev.examples} held-out examples ({ev.seconds:.1f}s)")
        return ev

    before = evaluation(loaded.model, "before") if opts.test and opts.eval_before else None
    with _bar(opts, planned_steps(cfg, len(opts.train), processes), f"train {cfg.method}", "step") as bar:

        def on_step(info: StepInfo) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", step_s=f"{info.step_seconds:.2f}")

        trained = train(
            loaded.model, tok, opts.train, cfg, validation=opts.validation or None, on_step=on_step
        )
    say(
        f"trained {trained.steps} steps in {trained.seconds:.1f}s; loss {trained.losses[0]:.4f} -> "
        f"{trained.losses[-1]:.4f}" + (" (stopped early)" if trained.stopped_early else "")
    )
    _save_atomically(trained, opts.output, opts.overwrite)
    say(f"saved the module to {opts.output}")
    after = evaluation(trained.model, "after")

    report = _report(opts, loaded, trained, before, after)
    result = RunResult(report, before, after)
    if target is not None:
        _publish(opts, target, result, choices)
    return result


def _publish(opts: RunOptions, target: Target, result: RunResult, choices: list[str]) -> None:
    from plugboard_tuning.publish import ServerTarget

    say, report, name = opts.log, result.report, opts.name
    assert name is not None
    promote = opts.alias is not None and (
        opts.promote_if is None or opts.promote_if.holds(result.after.figures())
    )
    server = isinstance(target, ServerTarget)
    # A directory publishes and moves the alias in one transaction. A server gets the alias only
    # after its answers have been checked against the trained model.
    metadata = {k: report[k] for k in ("tool", "base_model", "training", "data", "evaluation")}
    try:
        published = target.publish(
            opts.output,
            name,
            description=opts.description,
            metadata=metadata,
            alias=opts.alias if promote and not server else None,
        )
    except PublishError as e:
        # Nothing is lost: the module is saved; say how to publish it once the problem is fixed.
        raise PublishFailed(
            f"{e}\nthe trained module is saved in {opts.output}; publish it later with "
            f"`plugboard adapters register {opts.output} --name {name}` (its figures are in the report)",
            report,
        ) from None
    result.published = published
    say(f"published {published.ref} to {published.where}")
    try:
        _after_publish(opts, target, result, choices, promote, server)
    except KeyboardInterrupt:
        raise Interrupted(published.ref) from None


def _after_publish(
    opts: RunOptions, target: Target, result: RunResult, choices: list[str], promote: bool, server: bool
) -> None:
    say, report, name, published = opts.log, result.report, opts.name, result.published
    assert name is not None and published is not None
    report["published"] = {
        "ref": published.ref,
        "where": published.where,
        "alias": None,
        "promote_if": None if opts.promote_if is None else str(opts.promote_if),
    }
    if server and opts.check_served and opts.test:
        with _bar(opts, len(opts.test), "check served", "ex") as bar:
            agreement = check_served(
                target.client, published.ref, opts.test, result.after, choices=choices, on_done=bar.update
            )
        result.agreement_ok = agreement.ok
        report["served_check"] = agreement.as_dict()
        say(agreement.summary())
        if not agreement.ok:
            promote = False
            say(f"the served module disagrees with the trained one; first mismatches: {agreement.mismatches}")
    if opts.alias is not None:
        if promote and server:
            target.set_alias(name, opts.alias, published.version)
        if promote:
            report["published"]["alias"] = opts.alias
            say(f"{name}@{opts.alias} -> {published.ref}")
        else:
            why = (
                "the served check failed"
                if result.agreement_ok is False
                else f"{opts.promote_if} does not hold"
            )
            say(f"{name}@{opts.alias} not moved: {why} ({_figures_text(result.after)})")
    report["published"]["promoted"] = promote if opts.alias is not None else None


def _check_options(opts: RunOptions) -> None:
    from plugboard_server.errors import InvalidRequest
    from plugboard_server.registry.store import check_alias, check_name

    if not opts.train:
        raise DataError("no training examples")
    if opts.publish is not None and not opts.name:
        raise PublishError("publishing needs a module name (--name)")
    if opts.alias is not None and opts.publish is None:
        raise PublishError("--alias needs --publish")
    if opts.promote_if is not None and opts.alias is None:
        raise PublishError("--promote-if needs --alias (the alias it moves)")
    if opts.promote_if is not None and opts.promote_if.metric == "accuracy" and not label_choices(opts.test):
        raise PublishError("--promote-if accuracy needs labelled held-out data (text/label, or a data set)")
    try:
        if opts.name:
            check_name(opts.name)
        if opts.alias is not None:
            check_alias(opts.alias)
    except InvalidRequest as e:
        raise PublishError(str(e)) from None
    if (
        opts.output.exists()
        and not opts.overwrite
        and (not opts.output.is_dir() or any(opts.output.iterdir()))
    ):
        raise PublishError(
            f"the output directory {opts.output} exists and is not empty (--overwrite replaces it)"
        )


def _save_atomically(trained: Any, output: Path, overwrite: bool) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        save(trained, partial)
        if output.exists():
            if not overwrite and any(output.iterdir()):
                raise PublishError(f"{output} appeared while training; the module is left in {partial}")
            shutil.rmtree(output)
        os.rename(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _report(
    opts: RunOptions, loaded: Any, trained: Any, before: Evaluation | None, after: Evaluation
) -> dict:
    from plugboard_tuning import __version__

    cfg = dataclasses.asdict(opts.config)
    cfg["learning_rate"] = opts.config.lr
    return {
        "tool": f"plugboard-tune {__version__}",
        "base_model": {"spec": opts.base, "name": loaded.name, "fingerprint": loaded.fingerprint},
        "training": {
            "method": opts.config.method,
            "config": cfg,
            "steps": trained.steps,
            "seconds": round(trained.seconds, 2),
            "first_loss": trained.losses[0],
            "last_loss": trained.losses[-1],
            "validation_losses": trained.validation_losses,
            "stopped_early": trained.stopped_early,
        },
        "data": {
            **opts.data_source,
            "train": len(opts.train),
            "validation": len(opts.validation),
            "test": len(opts.test),
        },
        "evaluation": {
            "examples": after.examples,
            "before": None if before is None else _figures(before),
            "after": _figures(after),
        },
        "output": str(opts.output),
    }


def _figures(ev: Evaluation) -> dict[str, float]:
    return {**{k: round(v, 4) for k, v in ev.figures().items()}, "seconds": round(ev.seconds, 2)}


def _figures_text(ev: Evaluation) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in ev.figures().items())


def _bar(opts: RunOptions, total: int | None, desc: str, unit: str) -> AbstractContextManager[Any]:
    if not opts.progress:
        return nullcontext(_NoBar())
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
