"""plugboard-tune's command line: bad input is refused with exit status 2 before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugboard_tuning import cli
from plugboard_tuning.publish import Condition, RegistryTarget, ServerTarget, open_target


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test: refusals must come before."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("plugboard_server.models.loading.load_model", refuse)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(n: int) -> list[dict]:
    return [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


@pytest.mark.parametrize(
    ("files", "argv", "message"),
    [
        ({"d.jsonl": ""}, ["--data", "d.jsonl"], "no examples"),
        ({}, ["--data", "missing.jsonl"], "cannot read"),
        ({"d.jsonl": [{"prompt": "a", "output": "b"}]}, ["--data", "d.jsonl"], "input"),
        ({"d.txt": "x"}, ["--data", "d.txt"], "unknown data format"),
        (
            {"d.jsonl": [{"text": "a", "label": "meh"}] * 10},
            [
                "--data",
                "d.jsonl",
                "--text-field",
                "text",
                "--label-field",
                "label",
                "--label-words",
                "pos=good",
            ],
            "not one of the labels",
        ),
        (
            {"d.jsonl": _rows(10)},
            ["--data", "d.jsonl", "--text-field", "text", "--label-field", "label"],
            "needs --label-words",
        ),
        (
            {"d.jsonl": _rows(3)},
            [
                "--data",
                "d.jsonl",
                "--text-field",
                "text",
                "--label-field",
                "label",
                "--label-words",
                "pos=a,neg=b",
            ],
            "too few examples",
        ),
        (
            {"d.jsonl": _rows(10)},
            ["--data", "d.jsonl", "--text-field", "text", "--label-field", "label", "--label-words", "pos"],
            "LABEL=WORD",
        ),
        ({}, ["--dataset", "rotten-tomatoes", "--train-limit", "1"], "at least 2"),
        ({}, ["--dataset", "rotten-tomatoes", "--publish", "reg"], "needs a module name"),
        ({}, ["--dataset", "rotten-tomatoes", "--name", "x", "--alias", "stable"], "--alias needs --publish"),
        (
            {},
            ["--dataset", "rotten-tomatoes", "--name", "Has Space", "--publish", "reg"],
            "not a valid module name",
        ),
        ({}, ["--dataset", "rotten-tomatoes", "--prefix-init", "text"], "needs init_text"),
        ({}, ["--dataset", "rotten-tomatoes", "--batch-size", "0"], "must be >= 1"),
    ],
)
def test_bad_input_exits_2_before_loading_the_model(
    files: dict,
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    no_model,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        if isinstance(content, list):
            _jsonl(tmp_path / name, content)
        else:
            (tmp_path / name).write_text(content)
    method = [] if "--method" in argv else ["--method", "prefix" if "text" not in argv else "prompt"]
    assert cli.main([*argv, *method, "-q"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("plugboard-tune: error: ") and message in err, err


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--dataset", "rotten-tomatoes"])  # no --method
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--dataset", "rotten-tomatoes", "--method", "prefix", "--promote-if", "accuracy ~ 1"])
    assert "cannot read the condition" in capsys.readouterr().err


def test_data_file_is_split_into_train_validation_and_held_out(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d.jsonl", _rows(40))
    args = cli.build_parser().parse_args(
        [
            "--data", str(tmp_path / "d.jsonl"), "--text-field", "text", "--label-field", "label",
            "--label-words", "pos=good, neg=bad", "--template", "{text} =>", "--method", "lora",
            "--test-fraction", "0.25", "--validation-fraction", "0.2",
        ]
    )  # fmt: skip
    train, validation, test, source = cli.load_data(args)
    assert (len(train), len(validation), len(test)) == (24, 6, 10)
    assert source == {"file": str(tmp_path / "d.jsonl"), "examples": 40}
    assert {ex.target for ex in test} == {" good", " bad"}
    assert test[0].prompt.endswith(" =>")
    texts = [ex.prompt for ex in train + validation + test]
    assert len(set(texts)) == 40  # disjoint


@pytest.mark.parametrize(
    ("text", "expected", "figures", "holds"),
    [
        ("accuracy>=0.9", Condition("accuracy", ">=", 0.9), {"accuracy": 0.9}, True),
        (" exact_match < 0.5 ", Condition("exact_match", "<", 0.5), {"exact_match": 0.5}, False),
        ("accuracy==1", Condition("accuracy", "==", 1.0), {"accuracy": 1.0}, True),
        ("accuracy>.85", Condition("accuracy", ">", 0.85), {"accuracy": 0.86}, True),
    ],
)
def test_promotion_conditions(text: str, expected: Condition, figures: dict, holds: bool) -> None:
    assert Condition.parse(text) == expected
    assert Condition.parse(text).holds(figures) is holds


@pytest.mark.parametrize("text", ["accuracy", "accuracy>=", "loss<1", "accuracy=>0.9", "accuracy>=0.9 or so"])
def test_bad_promotion_conditions(text: str) -> None:
    with pytest.raises(ValueError, match=r"condition|metric"):
        Condition.parse(text)


def test_accuracy_condition_on_unlabelled_figures() -> None:
    with pytest.raises(ValueError, match="no accuracy figure"):
        Condition.parse("accuracy>=0.5").holds({"exact_match": 1.0})


def test_targets_host_port_is_a_server_and_a_path_a_directory(tmp_path: Path, tiny_model) -> None:
    server = open_target("127.0.0.1:1", token="t")
    assert isinstance(server, ServerTarget)
    server.close()
    assert isinstance(open_target("[::1]:50051"), ServerTarget)
    directory = open_target(str(tmp_path / "reg"), model=tiny_model.model)
    assert isinstance(directory, RegistryTarget) and (tmp_path / "reg" / "modules").is_dir()
    directory.close()
    with pytest.raises(Exception, match="admin token only applies to a server"):
        open_target(str(tmp_path / "reg"), token="t", model=tiny_model.model)


def test_an_s3_url_publishes_to_the_object_store_registry(
    tmp_path: Path, tiny_model, tiny_model_dir: Path, s3_endpoint: str, s3_bucket: str, monkeypatch
) -> None:
    from plugboard_server.registry.open import open_store
    from tests.support import peft_modules as pm

    monkeypatch.setenv("PLUGBOARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PLUGBOARD_REGISTRY_ENDPOINT_URL", s3_endpoint)
    target = open_target(f"s3://{s3_bucket}/reg", model=tiny_model.model)
    assert isinstance(target, RegistryTarget) and target.description == f"registry s3://{s3_bucket}/reg"
    module = pm.prefix(tiny_model_dir, tmp_path / "prefix", tokens=4)
    fingerprint = tiny_model.fingerprint
    metadata = {"base_model": {"fingerprint": fingerprint}}
    published = target.publish(module, "tuned", description="d", metadata=metadata, alias="prod")
    assert (published.name, published.version) == ("tuned", 1)
    target.check_base("tuned", fingerprint)
    with pytest.raises(Exception, match="trained on base model"):
        target.check_base("tuned", "another-base")
    server_view = open_store(
        f"s3://{s3_bucket}/reg", cache_root=tmp_path / "server", endpoint_url=s3_endpoint
    )
    assert server_view.get("tuned@prod").facts.kind == "PREFIX"


def test_tls_options_reach_a_server_target(tmp_path: Path, tiny_model) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert all(flag in cli.build_parser().format_help() for flag in ("--tls-ca", "--tls-cert", "--tls-key"))
    server = open_target("127.0.0.1:1", token="t", tls={"tls_ca": pem, "tls_server_name": "x.test"})
    assert isinstance(server, ServerTarget)
    server.close()
    with pytest.raises(Exception, match="tls_cert and tls_key go together"):
        open_target("127.0.0.1:1", tls={"tls_cert": pem})
    with pytest.raises(Exception, match="TLS options only apply to a server"):
        open_target(str(tmp_path / "reg"), tls={"tls_ca": pem}, model=tiny_model.model)
