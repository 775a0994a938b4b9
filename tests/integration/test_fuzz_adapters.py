"""Fuzz the Adapters service with a hypothesis state machine, against a model of the registry.

Uploads (valid and mangled), GetAdapter, SetAlias, DeleteAdapter, LoadAdapter, UnloadAdapter and
ListAdapters, with good, missing and wrong admin tokens, and requests served by the modules
(RESOURCE_EXHAUSTED when every device slot is pinned by others). Every answer must carry the status
code the oracle (tests/support/fuzz_oracle.py) predicts and agree with the model; the module's
server must survive (tests/support/fuzz_world.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import generation_pb2 as pb
from tests.support import fuzz_oracle as oracle
from tests.support import fuzz_strategies as fz
from tests.support.fuzz_oracle import NAME, Expect, auth_expect, check, ref_ok
from tests.support.fuzz_world import KINDS, Answer, S, World, fuzz_settings, running


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    with running(tiny_model_dir, tmp_path_factory.mktemp("fuzz-adapters")) as w:
        yield w


def test_the_adapters_service(world):
    RegistryMachine.w = world
    run_state_machine_as_test(RegistryMachine, settings=fuzz_settings(15, stateful_step_count=20))


@dataclass
class VersionModel:
    kind: str
    sha256: dict[str, str]
    size: int
    description: str
    tags: list[str]
    metadata: struct_pb2.Struct


@dataclass
class ModuleModel:
    versions: dict[int, VersionModel] = field(default_factory=dict)
    next_version: int = 1
    aliases: dict[str, int] = field(default_factory=dict)


COMMON_SELECTORS = ("", "@1", "@2", "@latest", "@stable", "@canary")
ODD_SELECTORS = ("@3", "@0", "@99999999999999999999", "@", "@STABLE", "@stable\n", "\n", "@1\n", "@7a")
AUTH = st.sampled_from(["ok"] * 8 + ["none", "wrong", "case"])
ODD_REFS = st.one_of(
    st.sampled_from(fz.BAD_NAMES), fz.odd_text(4), st.from_regex(NAME, fullmatch=True)
).filter(
    lambda s: not s.startswith("gen-") and not re.match(r"r[0-9]+-", s)  # never a module of the tests
)
PROMPT = "The quick brown fox"


def page_tokens(issued: list[str], names: list[str]) -> st.SearchStrategy[str]:
    """Page tokens: none, ones the server issued, ones made up of good and bad names and versions
    (only a valid name and a version in 0 .. 2^63-1 could come from the server), and garbage."""
    name = fz.weighted(
        (3, st.sampled_from(names)),
        (1, st.sampled_from(fz.BAD_NAMES) | fz.odd_text(2)),
        (1, st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF).map(lambda c: "r" + c)),  # lone
    )
    version = fz.weighted(
        (3, st.integers(0, 3) | st.integers(0, 2**63 - 1)),
        (1, st.integers(-(2**63), -1) | st.sampled_from((2**63, 2**64, True, None, 1.5, "1"))),
    )
    made_up = st.builds(
        lambda n, v: base64.urlsafe_b64encode(json.dumps([n, v]).encode()).decode(), name, version
    )
    # "=", [], ["a"], null, [[],1], ["\ud800",1], and more garbage
    garbage = ("=", "W10=", "WyJhIl0=", "bnVsbA==", "W1tdLDFd", "WyJcdWQ4MDAiLCAxXQ==", "%%%", "W" * 1000)
    return fz.weighted(
        (3, st.just("")),
        (3, st.sampled_from(issued) if issued else st.just("")),
        (3, made_up),
        (1, fz.odd_text(4) | st.sampled_from(garbage)),
    )


class RegistryMachine(RuleBasedStateMachine):
    """Each run works on its own three names (r<run>-a, -b, -c), so runs do not see each other's
    versions; the world's gen-* modules are never touched."""

    w: World
    runs = 0

    def __init__(self) -> None:
        super().__init__()
        RegistryMachine.runs += 1
        self.prefix = f"r{RegistryMachine.runs}-"
        self.mods: dict[str, ModuleModel] = {f"{self.prefix}{k}": ModuleModel() for k in fz.NAME_KEYS}
        self.issued: list[str] = []  # page tokens the server gave out

    # -- the model ---------------------------------------------------------------------------------

    def ref(self, data: st.DataObject) -> str:
        roll = data.draw(st.integers(0, 9))
        if roll < 8:
            selector = data.draw(st.sampled_from(COMMON_SELECTORS if roll < 6 else ODD_SELECTORS))
            return data.draw(st.sampled_from(sorted(self.mods))) + selector
        return data.draw(ODD_REFS)

    def resolve(self, ref: str) -> tuple[Expect | None, str]:
        """(the answer a reference alone forces, or None; the "name@version" it names)."""
        if not ref_ok(ref):
            return Expect(S.INVALID_ARGUMENT, f"malformed reference {ref!r}"), ""
        name, _, selector = ref.partition("@")
        mod = self.mods.get(name)
        version = None
        if mod is not None and mod.versions:
            if selector in ("", "latest"):
                version = max(mod.versions)
            elif selector.isdigit():
                version = int(selector) if int(selector) in mod.versions else None
            else:
                version = mod.aliases.get(selector)
        if version is None:
            return Expect(S.NOT_FOUND, f"no version {ref!r}"), ""
        return None, f"{name}@{version}"

    def resolve_adapter(self, ref: str) -> tuple[Expect | None, str]:
        """resolve() for a generation request, where "" is the base model."""
        return (None, "") if not ref else self.resolve(ref)

    def check_info(self, info: apb.AdapterInfo, key: str) -> None:
        name, _, version = key.partition("@")
        mod, v = self.mods[name], int(version)
        model = mod.versions[v]
        assert (info.name, info.version, info.ref) == (name, v, key)
        aliases = sorted(a for a, at in mod.aliases.items() if at == v)
        assert list(info.aliases) == aliases + (["latest"] if v == max(mod.versions) else [])
        assert info.kind == KINDS[model.kind]
        assert (dict(info.sha256), info.size_bytes) == (model.sha256, model.size)
        assert (info.description, list(info.tags), info.metadata) == (
            model.description,
            model.tags,
            model.metadata,
        )
        assert info.pinned == (key in self.w.pinned)
        assert info.residency == apb.DEVICE or not info.pinned

    def call(self, rpc: str, request: Any, expect: Expect, how: str = "ok") -> Answer:
        expect = auth_expect(how) if rpc in oracle.ADMIN_RPCS and how != "ok" else expect
        if rpc == "RegisterAdapter":  # the header, and the chunks without their data
            shown = [
                m.header if m.HasField("header") else (m.chunk.filename, m.chunk.offset, len(m.chunk.data))
                for m in request
            ]
            note(f"{rpc}({shown!r}, auth={how}) expecting {expect}")
        else:
            note(f"{rpc}({request!r}, auth={how}) expecting {expect}")
        answer = self.w.call(rpc, request, how)
        check(rpc, answer, expect)
        return answer

    # -- the rules ---------------------------------------------------------------------------------

    def _upload(self, data: st.DataObject, *, clean: bool) -> None:
        messages, notes = data.draw(fz.uploads(self.w.files, sorted(self.mods), clean=clean))
        note(f"upload: {notes}")
        upload = oracle.expect_upload(self.w, messages)
        answer = self.call("RegisterAdapter", messages, upload.expect, "ok" if clean else data.draw(AUTH))
        if answer.code != S.OK:
            return
        header = messages[0].header
        mod = self.mods[header.name]
        version, mod.next_version = mod.next_version, mod.next_version + 1
        mod.versions[version] = VersionModel(
            kind=upload.kind,
            sha256={n: hashlib.sha256(d).hexdigest() for n, d in upload.files.items()},
            size=sum(len(d) for d in upload.files.values()),
            description=header.description,
            tags=list(dict.fromkeys(header.tags)),
            metadata=header.metadata,
        )
        if header.alias:
            mod.aliases[header.alias] = version
        self.check_info(answer.response, f"{header.name}@{version}")
        got = self.call("GetAdapter", apb.GetAdapterRequest(adapter=answer.response.ref), Expect())
        self.check_info(got.response, answer.response.ref)
        self._serve("Generate", answer.response.ref)  # a new version serves at once

    def _serve(self, rpc: str, ref: str) -> None:
        if rpc == "Score":
            request: Any = pb.ScoreRequest(prompt=PROMPT, choices=["a", "b"], adapter=ref)
            case = oracle.expect_score(self.w, request, self.resolve_adapter)
        else:
            request = pb.GenerateRequest(
                prompt=PROMPT, adapter=ref, params=pb.GenerationParams(max_new_tokens=2)
            )
            case = oracle.expect_generate(self.w, request, self.resolve_adapter)
        answer = self.call(rpc, request, case.expect)
        if answer.code == S.OK:
            last = answer.response[-1] if rpc == "GenerateStream" else answer.response
            assert last.adapter == case.adapter

    @initialize(data=st.data())
    def first_upload(self, data: st.DataObject) -> None:  # so that every run has a module to work on
        self._upload(data, clean=True)

    @rule(data=st.data())
    def upload_valid(self, data: st.DataObject) -> None:
        self._upload(data, clean=True)

    @rule(data=st.data())
    def upload_mangled(self, data: st.DataObject) -> None:
        self._upload(data, clean=False)

    @rule(data=st.data())
    def upload_mangled_more(self, data: st.DataObject) -> None:  # twice the weight among the rules
        self._upload(data, clean=False)

    @rule(data=st.data(), rpc=st.sampled_from(["Generate", "GenerateStream", "Score"]))
    def serve(self, data: st.DataObject, rpc: str) -> None:
        self._serve(rpc, self.ref(data))

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        expect, key = self.resolve(ref := self.ref(data))
        answer = self.call("GetAdapter", apb.GetAdapterRequest(adapter=ref), expect or Expect())
        if answer.code == S.OK:
            self.check_info(answer.response, key)

    @rule(
        data=st.data(),
        alias=fz.weighted(
            (3, st.sampled_from(fz.ALIASES)), (1, st.sampled_from((*fz.BAD_ALIASES, "")) | fz.odd_text(2))
        ),
    )
    def set_alias(self, data: st.DataObject, alias: str) -> None:
        name = data.draw(fz.weighted((4, st.sampled_from(sorted(self.mods))), (1, ODD_REFS)))
        mod = self.mods.get(name)
        versions = sorted(mod.versions) if mod and mod.versions else [1]
        version = data.draw(fz.weighted((3, st.sampled_from(versions)), (1, st.just(0) | fz.UINT32)))
        if not oracle.name_ok(name):
            expect = Expect(S.INVALID_ARGUMENT, f"name {name!r}")
        elif not oracle.alias_ok(alias):
            expect = Expect(S.INVALID_ARGUMENT, f"alias {alias!r}")
        elif mod is None or version not in mod.versions:
            expect = Expect(S.NOT_FOUND, f"no {name}@{version}")
        else:
            expect = Expect()
        answer = self.call(
            "SetAlias", apb.SetAliasRequest(name=name, alias=alias, version=version), expect, data.draw(AUTH)
        )
        if answer.code == S.OK:
            mod.aliases[alias] = version
            self.check_info(answer.response, f"{name}@{version}")

    @rule(data=st.data(), force=st.booleans())
    def delete(self, data: st.DataObject, force: bool) -> None:
        ref = self.ref(data)
        expect, key = self.resolve(ref)
        name, doomed = ref.partition("@")[0], []
        if expect is None:
            mod = self.mods[name]
            doomed = [int(key.partition("@")[2])] if "@" in ref else sorted(mod.versions)
            held = [a for a, v in mod.aliases.items() if v in doomed]
            expect = (
                Expect(S.FAILED_PRECONDITION, f"aliases {held} point at it")
                if held and not force
                else Expect()
            )
        request = apb.DeleteAdapterRequest(adapter=ref, force=force)
        answer = self.call("DeleteAdapter", request, expect, data.draw(AUTH))
        if answer.code == S.OK:
            assert list(answer.response.deleted) == [f"{name}@{v}" for v in doomed]
            self.w.pinned.difference_update(answer.response.deleted)
            mod = self.mods[name]
            for v in doomed:
                del mod.versions[v]
            mod.aliases = {a: v for a, v in mod.aliases.items() if v not in doomed}

    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        expect, key = self.resolve(ref := self.ref(data))
        expect = expect or oracle.slots_exhausted(self.w, key) or Expect()
        answer = self.call("LoadAdapter", apb.LoadAdapterRequest(adapter=ref), expect, data.draw(AUTH))
        if answer.code == S.OK:
            self.w.pinned.add(key)
            assert (answer.response.residency, answer.response.pinned) == (apb.DEVICE, True)
            self.check_info(answer.response, key)

    @rule(data=st.data())
    def load_more(self, data: st.DataObject) -> None:  # twice the weight: every slot pinned now and then
        self.load(data)

    @rule(data=st.data())
    def unload(self, data: st.DataObject) -> None:
        expect, key = self.resolve(ref := self.ref(data))
        answer = self.call(
            "UnloadAdapter", apb.UnloadAdapterRequest(adapter=ref), expect or Expect(), data.draw(AUTH)
        )
        if answer.code == S.OK:
            self.w.pinned.discard(key)
            assert (answer.response.residency, answer.response.pinned) == (apb.DISK, False)
            self.check_info(answer.response, key)

    @rule(
        data=st.data(),
        page_size=fz.weighted(
            (6, st.sampled_from((0, 1, 2, 3))), (1, st.sampled_from((1000, 1001))), (1, fz.UINT32)
        ),
        kind=fz.weighted((8, st.sampled_from((0, 0, 1, 2, 3))), (1, fz.INT32)),
        tag=st.one_of(st.just(""), st.sampled_from(fz.TAGS), fz.odd_text(2)),
        all_versions=st.booleans(),
    )
    def list_adapters(
        self, data: st.DataObject, page_size: int, kind: int, tag: str, all_versions: bool
    ) -> None:
        name_prefix = data.draw(fz.weighted((3, st.just(self.prefix)), (1, st.just("")), (1, fz.odd_text(2))))
        token = data.draw(page_tokens(self.issued, sorted(self.mods)))
        after = oracle.decode_token(token)
        if page_size > 1000:
            expect = Expect(S.INVALID_ARGUMENT, "page_size over 1000")
        elif kind not in (0, 1, 2, 3):
            expect = Expect(S.INVALID_ARGUMENT, f"kind {kind}")
        elif after is None:
            expect = Expect(S.INVALID_ARGUMENT, f"a page token the server cannot have made: {token!r}")
        else:
            expect = Expect()
        request = apb.ListAdaptersRequest(
            page_size=page_size,
            page_token=token,
            kind=kind,
            tag=tag,
            name_prefix=name_prefix,
            all_versions=all_versions,
        )
        answer = self.call("ListAdapters", request, expect, data.draw(AUTH))
        if answer.code != S.OK:
            return
        page: apb.ListAdaptersResponse = answer.response
        if page.next_page_token:
            self.issued.append(page.next_page_token)
        for info in page.adapters:
            assert info.name.startswith(name_prefix) and info.ref == f"{info.name}@{info.version}"
            assert kind in (0, info.kind) and (not tag or tag in info.tags)
        if name_prefix != self.prefix:
            return
        rows = []
        for name, mod in sorted(self.mods.items()):
            for v in sorted(mod.versions) if all_versions else sorted(mod.versions)[-1:]:
                if kind in (0, KINDS[mod.versions[v].kind]) and (not tag or tag in mod.versions[v].tags):
                    rows.append((name, v))
        rows = [r for r in rows if r > after]
        size = page_size or 100
        assert [(a.name, a.version) for a in page.adapters] == rows[:size]
        assert bool(page.next_page_token) == (len(rows) > size)
        for info in page.adapters:
            self.check_info(info, info.ref)

    def teardown(self) -> None:
        for key in sorted(self.w.pinned):
            self.w.call("UnloadAdapter", apb.UnloadAdapterRequest(adapter=key))
        self.w.pinned.clear()
        for name in self.mods:
            self.w.call("DeleteAdapter", apb.DeleteAdapterRequest(adapter=name, force=True))
