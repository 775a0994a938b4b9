"""`plugboard adapters ...` and `--token-file`, with a fake client injected in place of a server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugboard.v1 import adapters_pb2 as apb
from plugboard_client import Client, cli
from plugboard_client.errors import PlugboardError, Unauthenticated


def _info(name: str, version: int, **kwargs: Any) -> apb.AdapterInfo:
    info = apb.AdapterInfo(name=name, version=version, ref=f"{name}@{version}", **kwargs)
    info.created_at.FromSeconds(1_700_000_000)  # 2023-11-14 22:13:20 UTC
    return info


SENT = _info(
    "sent",
    3,
    kind=apb.LORA,
    aliases=["latest", "prod"],
    size_bytes=3 * 1024 * 1024,
    residency=apb.DEVICE,
    pinned=True,
    peft_type="LORA",
    rank=8,
    target_modules=["q_proj", "v_proj"],
    sha256={"adapter_config.json": "ab12", "adapter_model.safetensors": "cd34"},
    tags=["nlp"],
)
SENT.metadata.update({"accuracy": 0.91})
TOPIC = _info("topic", 1, kind=apb.PREFIX, size_bytes=512, residency=apb.DISK, num_virtual_tokens=20)


class FakeClient:
    """Records the Adapters calls; answers with canned AdapterInfos; can fail on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.infos = [SENT, TOPIC]
        self.fail: Exception | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def _record(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, args, kwargs))
        if self.fail is not None:
            raise self.fail

    def iter_adapters(self, **kwargs: Any) -> Iterator[apb.AdapterInfo]:
        self._record("iter_adapters", **kwargs)
        return iter(self.infos)

    def get_adapter(self, ref: str) -> apb.AdapterInfo:
        self._record("get_adapter", ref)
        return SENT

    def register_adapter(self, directory: str, **kwargs: Any) -> apb.AdapterInfo:
        self._record("register_adapter", directory, **kwargs)
        return _info(kwargs["name"], 4)

    def delete_adapter(self, ref: str, **kwargs: Any) -> apb.DeleteAdapterResponse:
        self._record("delete_adapter", ref, **kwargs)
        return apb.DeleteAdapterResponse(deleted=["sent@1", "sent@2"])

    def set_alias(self, name: str, alias: str, version: int) -> apb.AdapterInfo:
        self._record("set_alias", name, alias, version)
        return _info(name, version)

    def load_adapter(self, ref: str) -> apb.AdapterInfo:
        self._record("load_adapter", ref)
        return SENT

    def unload_adapter(self, ref: str) -> apb.AdapterInfo:
        self._record("unload_adapter", ref)
        return _info("sent", 3, residency=apb.HOST)


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLUGBOARD_TOKEN_FILE", raising=False)


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


def run(fake: FakeClient, *argv: str, factory_kwargs: dict[str, Any] | None = None) -> int:
    def factory(target: str, **kwargs: Any) -> FakeClient:
        if factory_kwargs is not None:
            factory_kwargs.update(kwargs)
        return fake

    return cli.main(list(argv), client_factory=factory)  # type: ignore[arg-type]


def test_list_table(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "adapters", "list") == 0
    assert fake.calls == [
        ("iter_adapters", (), {"kind": "", "tag": "", "name_prefix": "", "all_versions": False})
    ]
    assert capsys.readouterr().out.splitlines() == [
        "NAME   VERSION  KIND    ALIASES      RESIDENCY        SIZE     CREATED",
        "sent   3        LORA    latest,prod  DEVICE (pinned)  3.0 MiB  2023-11-14 22:13:20Z",
        "topic  1        PREFIX  -            DISK             512 B    2023-11-14 22:13:20Z",
    ]
    assert fake.closed


def test_list_filters(fake: FakeClient) -> None:
    run(fake, "adapters", "list", "--kind", "lora", "--tag", "nlp", "--prefix", "se", "--all-versions")
    assert fake.calls[0][2] == {"kind": "LORA", "tag": "nlp", "name_prefix": "se", "all_versions": True}


def test_list_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    run(fake, "adapters", "list", "--json")
    out = json.loads(capsys.readouterr().out)
    assert [a["ref"] for a in out] == ["sent@3", "topic@1"]
    assert out[0]["kind"] == "LORA" and out[0]["size_bytes"] == 3 * 1024 * 1024
    assert out[0]["metadata"] == {"accuracy": 0.91} and out[0]["created_at"] == "2023-11-14T22:13:20Z"


def test_list_nothing(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.infos = []
    assert run(fake, "adapters", "list") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "no adapters\n"


def test_show(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "adapters", "show", "sent@prod") == 0
    assert fake.calls[0][:2] == ("get_adapter", ("sent@prod",))
    lines = capsys.readouterr().out.splitlines()
    for expected in [
        "name: sent",
        "version: 3",
        "kind: LORA",
        "aliases: latest, prod",
        "size_bytes: 3.0 MiB (3145728 bytes)",
        "residency: DEVICE",
        "pinned: true",
        'metadata: {"accuracy": 0.91}',
        "created_at: 2023-11-14 22:13:20Z",
        "target_modules: q_proj, v_proj",
        "sha256: adapter_config.json=ab12, adapter_model.safetensors=cd34",
        "ref: sent@3",
        "description: ",
    ]:
        assert expected in lines


def test_show_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    run(fake, "adapters", "show", "sent", "--json")
    out = json.loads(capsys.readouterr().out)
    assert out["ref"] == "sent@3" and out["rank"] == 8 and out["pinned"] is True


def test_register(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["adapters", "register", "out/sent", "--name", "sent", "--alias", "prod", "--tag", "a"]
    argv += ["--tag", "b", "--description", "sentiment", "--metadata-json", '{"acc": 0.9, "n": [1]}']
    assert run(fake, *argv) == 0
    assert fake.calls == [
        (
            "register_adapter",
            ("out/sent",),
            {
                "name": "sent",
                "description": "sentiment",
                "tags": ["a", "b"],
                "metadata": {"acc": 0.9, "n": [1]},
                "alias": "prod",
            },
        )
    ]
    assert capsys.readouterr().out == "registered sent@4\n"


def test_register_defaults(fake: FakeClient) -> None:
    run(fake, "adapters", "register", "d", "--name", "m")
    assert fake.calls[0][2] == {"name": "m", "description": "", "tags": [], "metadata": None, "alias": ""}


def test_register_refusal_from_a_real_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The real Client refuses a pickle-only directory before connecting (nothing listens on port 1).
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    assert cli.main(["--target", "127.0.0.1:1", "adapters", "register", str(tmp_path), "--name", "m"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "safe_serialization=True" in err


def test_register_read_error_is_reported(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail = PermissionError(13, "Permission denied")
    assert run(fake, "adapters", "register", "d", "--name", "m") == 1
    assert capsys.readouterr().err.startswith("error: cannot read d: ")


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", '"text"'])
def test_register_metadata_must_be_a_json_object(fake: FakeClient, value: str) -> None:
    with pytest.raises(SystemExit) as info:
        run(fake, "adapters", "register", "d", "--name", "m", "--metadata-json", value)
    assert info.value.code == 2 and fake.calls == []


def test_delete(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "adapters", "delete", "sent", "--force") == 0
    assert fake.calls[0] == ("delete_adapter", ("sent",), {"force": True})
    assert capsys.readouterr().out == "deleted sent@1\ndeleted sent@2\n"
    run(fake, "adapters", "delete", "sent@2")
    assert fake.calls[1] == ("delete_adapter", ("sent@2",), {"force": False})


def test_alias(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "adapters", "alias", "sent", "prod", "2") == 0
    assert fake.calls[0] == ("set_alias", ("sent", "prod", 2), {})
    assert capsys.readouterr().out == "sent@prod -> sent@2\n"


@pytest.mark.parametrize("version", ["0", "-1", "two"])
def test_alias_version_must_be_positive(fake: FakeClient, version: str) -> None:
    with pytest.raises(SystemExit) as info:
        run(fake, "adapters", "alias", "sent", "prod", version)
    assert info.value.code == 2 and fake.calls == []


def test_load_and_unload(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "adapters", "load", "sent@prod") == 0
    assert run(fake, "adapters", "unload", "sent@3") == 0
    assert [c[:2] for c in fake.calls] == [("load_adapter", ("sent@prod",)), ("unload_adapter", ("sent@3",))]
    assert capsys.readouterr().out == "loaded sent@3: DEVICE (pinned)\nunloaded sent@3: HOST\n"


def test_server_errors(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail = Unauthenticated("this call needs the admin token")
    assert run(fake, "adapters", "load", "sent") == 1
    assert capsys.readouterr().err == "error: UNAUTHENTICATED: this call needs the admin token\n"
    assert fake.closed


@pytest.mark.parametrize(
    "argv", [["adapters"], ["adapters", "list", "--kind", "adapter"], ["adapters", "register", "d"]]
)
def test_usage_errors_exit_2(fake: FakeClient, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(fake, *argv)
    assert info.value.code == 2 and fake.calls == []


# --token-file


def test_token_file_is_read_and_stripped(fake: FakeClient, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    got: dict[str, Any] = {}
    run(fake, "--token-file", str(path), "adapters", "load", "sent", factory_kwargs=got)
    assert got == {"timeout": None, "token": "s3cret"}


def test_token_file_from_the_environment(
    fake: FakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text("from-env")
    monkeypatch.setenv("PLUGBOARD_TOKEN_FILE", str(path))
    got: dict[str, Any] = {}
    run(fake, "adapters", "list", factory_kwargs=got)
    assert got["token"] == "from-env"


def test_no_token_file_no_token_argument(fake: FakeClient) -> None:
    # Factories written before tokens existed (factory(target, timeout=...)) keep working.
    got: dict[str, Any] = {}
    run(fake, "adapters", "list", factory_kwargs=got)
    assert got == {"timeout": None}


@pytest.mark.parametrize(("content", "match"), [(None, "cannot read the token file"), ("\n", "is empty")])
def test_unreadable_token_file_is_a_usage_error(
    fake: FakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, match: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as info:
        run(fake, "--token-file", str(path), "adapters", "load", "sent")
    assert info.value.code == 2 and fake.calls == []
    err = capsys.readouterr().err
    assert match in err and str(path) in err


def test_the_real_client_sends_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    made: list[Client] = []

    class Recording(Client):
        def load_adapter(self, ref: str, **kwargs: Any) -> apb.AdapterInfo:
            made.append(self)
            return SENT

    assert cli.main(["--token-file", str(path), "adapters", "load", "sent"], client_factory=Recording) == 0
    assert ("authorization", "Bearer s3cret") in made[0].metadata


def test_a_token_the_client_refuses_is_reported(fake: FakeClient, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("two words")
    assert cli.main(["--token-file", str(path), "adapters", "load", "sent"], client_factory=Client) == 1


def test_plugboard_error_base_class_still_reported(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail = PlugboardError("boom")
    assert run(fake, "adapters", "list") == 1
    assert capsys.readouterr().err == "error: UNKNOWN: boom\n"
