"""Tuning end to end on the tiny model: train, publish to a directory or a server, and serve it.

What the server answers for the published module must equal what the trained PEFT model answers.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from plugboard_client import Client
from plugboard_server.models.loading import load_model
from plugboard_tuning.data import Example
from plugboard_tuning.publish import BaseModelMismatch, Condition, PublishError
from plugboard_tuning.run import RunOptions, run
from plugboard_tuning.served import check_served
from plugboard_tuning.train import TrainConfig
from tests.support.server import ServerThread, server_config

TOKEN = "tuning-admin-token"
WORDS = ["cat", "sun", "tree", "rock", "fish", "cloud", "lamp", "road"]
EXAMPLES = [Example(f"word: {w}\nalive?", " yes" if i % 2 == 0 else " no", "y" if i % 2 == 0 else "n")
            for i, w in enumerate(WORDS)]  # fmt: skip
CONFIGS = {
    "prefix": TrainConfig(method="prefix", num_virtual_tokens=4, max_steps=30, learning_rate=1e-1),
    "prompt": TrainConfig(method="prompt", num_virtual_tokens=4, max_steps=30, learning_rate=1e-1),
    "lora": TrainConfig(method="lora", max_steps=30, learning_rate=1e-2),
}


def _options(tmp_path: Path, base: Path, method: str = "prefix", **kw) -> RunOptions:
    messages: list[str] = []
    defaults = dict(
        train=EXAMPLES,
        test=EXAMPLES,
        config=CONFIGS[method],
        output=tmp_path / "out" / method,
        base=str(base),
        device="cpu",
        name=f"toy-{method}",
        progress=False,
        log=messages.append,
    )
    return RunOptions(**{**defaults, **kw})


def _server(tmp_path: Path, model_dir: Path, registry: Path | None = None) -> ServerThread:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cfg = server_config(registry=registry or tmp_path / "registry", admin_token_file=token_file)
    return ServerThread(cfg, loader=lambda: load_model(str(model_dir))).start()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_publish_to_a_server_serves_what_was_trained(method, tiny_model_dir, tmp_path):
    srv = _server(tmp_path, tiny_model_dir)
    try:
        opts = _options(
            tmp_path, tiny_model_dir, method, publish=srv.target, token=TOKEN, alias="stable",
            promote_if=Condition.parse("accuracy>=0"),
        )  # fmt: skip
        result = run(opts)
        assert result.after.accuracy is not None and result.before is not None
        check = result.report["served_check"]
        assert result.agreement_ok and check["ok"], check["mismatches"]
        assert check["score_agree"] == check["generate_agree"] == len(EXAMPLES)
        assert result.report["published"] == {
            "ref": f"toy-{method}@1",
            "where": f"server {srv.target}",
            "alias": "stable",
            "promote_if": "accuracy>=0",
            "promoted": True,
        }
        with Client(srv.target, timeout=30) as c:
            info = c.get_adapter(f"toy-{method}@stable")
            meta = dict(info.metadata)
            assert info.version == 1 and info.base_model == result.report["base_model"]["fingerprint"]
            assert meta["evaluation"]["after"]["accuracy"] == round(result.after.accuracy, 4)
            assert meta["training"]["method"] == method
            assert meta["training"]["config"]["max_steps"] == 30
    finally:
        srv.stop()
    assert (tmp_path / "out" / method / "adapter_config.json").is_file()


def test_publish_to_a_directory_then_serve_it(tiny_model_dir, tmp_path):
    registry = tmp_path / "registry"
    opts = _options(tmp_path, tiny_model_dir, "lora", publish=str(registry), alias="stable")
    result = run(opts)
    assert result.report["published"]["ref"] == "toy-lora@1"
    assert result.report["published"]["alias"] == "stable"
    assert "served_check" not in result.report  # no server to ask
    srv = _server(tmp_path, tiny_model_dir, registry)
    try:
        with Client(srv.target, timeout=30) as c:
            agreement = check_served(c, "toy-lora@stable", EXAMPLES, result.after, choices=[" no", " yes"])
            info = c.get_adapter("toy-lora")
        assert agreement.ok, agreement.mismatches
        assert dict(info.metadata)["base_model"]["fingerprint"] == info.base_model
    finally:
        srv.stop()


def test_promote_if_not_holding_publishes_without_moving_the_alias(tiny_model_dir, tmp_path):
    registry = tmp_path / "registry"
    first = run(_options(tmp_path, tiny_model_dir, "lora", publish=str(registry), alias="stable"))
    assert first.report["published"]["promoted"] is True
    second = run(
        _options(
            tmp_path, tiny_model_dir, "lora", output=tmp_path / "out2", publish=str(registry), alias="stable",
            promote_if=Condition.parse("accuracy>1"),
        )
    )  # fmt: skip
    assert second.report["published"] == {
        "ref": "toy-lora@2", "where": f"registry directory {registry}", "alias": None,
        "promote_if": "accuracy>1", "promoted": False,
    }  # fmt: skip
    from plugboard_server.registry.local import LocalStore

    store = LocalStore(registry)
    try:
        assert store.get("toy-lora@stable").version == 1
        assert store.get("toy-lora").version == 2
    finally:
        store.close()


def test_a_server_on_another_base_model_is_refused_before_training(tiny_model_dir, tiny_gpt2_dir, tmp_path):
    srv = _server(tmp_path, tiny_gpt2_dir)
    try:
        messages: list[str] = []
        opts = _options(tmp_path, tiny_model_dir, publish=srv.target, token=TOKEN, log=messages.append)
        with pytest.raises(BaseModelMismatch, match="serves base model"):
            run(opts)
        assert not opts.output.exists()  # refused before training: nothing trained, nothing saved
        assert not any(m.startswith(("before", "trained")) for m in messages), messages
    finally:
        srv.stop()


def test_bad_options_are_refused_before_the_model_loads(tmp_path):
    base = tmp_path / "no-such-model"  # never loaded: every check below comes first
    with pytest.raises(PublishError, match="needs a module name"):
        run(_options(tmp_path, base, publish=str(tmp_path / "r"), name=None))
    with pytest.raises(PublishError, match="needs --alias"):
        run(_options(tmp_path, base, publish=str(tmp_path / "r"), promote_if=Condition.parse("accuracy>=1")))
    with pytest.raises(PublishError, match="Bad Name"):
        run(_options(tmp_path, base, publish=str(tmp_path / "r"), name="Bad Name"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(PublishError, match="not empty"):
        run(_options(tmp_path, base, output=tmp_path / "taken"))


def test_ctrl_c_during_the_upload_leaves_nothing_published(tiny_model_dir, tmp_path, monkeypatch):
    import plugboard_client.adapters as upload

    real = upload.upload_requests
    release = threading.Event()

    def interrupted_upload(*args, **kwargs):
        requests = real(*args, **kwargs)
        yield next(requests)  # the server has begun receiving the module ...
        os.kill(os.getpid(), signal.SIGINT)  # ... when the user presses Ctrl-C
        release.wait(30)
        yield from requests

    monkeypatch.setattr(upload, "upload_requests", interrupted_upload)
    srv = _server(tmp_path, tiny_model_dir)
    try:
        opts = _options(tmp_path, tiny_model_dir, "lora", publish=srv.target, token=TOKEN)
        with pytest.raises(KeyboardInterrupt) as caught:
            run(opts)
        assert getattr(caught.value, "published", None) is None  # interrupted before publishing
        release.set()
        with Client(srv.target, timeout=30) as c:
            assert list(c.list_adapters().adapters) == []
            info = c.model_info()
        assert info.fingerprint
        assert not any((tmp_path / "registry" / "modules").iterdir())
    finally:
        release.set()
        srv.stop()


def test_a_refused_publish_keeps_the_trained_module_and_says_how_to_publish_it(tiny_model_dir, tmp_path):
    from plugboard_tuning.run import PublishFailed

    srv = _server(tmp_path, tiny_model_dir)
    try:
        opts = _options(tmp_path, tiny_model_dir, "lora", publish=srv.target, token="not-the-token")
        with pytest.raises(PublishFailed, match="plugboard adapters register") as failed:
            run(opts)
        assert "token" in str(failed.value).lower()
        assert (opts.output / "adapter_model.safetensors").is_file()
        assert failed.value.report["evaluation"]["after"]["exact_match"] >= 0
        with Client(srv.target, timeout=30) as c:
            assert list(c.list_adapters().adapters) == []
    finally:
        srv.stop()
