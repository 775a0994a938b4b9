"""`plugboard adapters ...`: list, show, register, delete, alias, load and unload registry modules.

cli.py registers these with `add_parser` and dispatches to `run`. The admin actions (register, delete,
alias, load, unload) need the server's admin token: `plugboard --token-file PATH adapters ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from plugboard.v1 import adapters_pb2 as apb
from plugboard_client.adapters import KINDS, adapter_dict
from plugboard_client.client import Client

TABLE_COLUMNS = ("NAME", "VERSION", "KIND", "ALIASES", "RESIDENCY", "SIZE", "CREATED")


def add_parser(sub: Any) -> None:
    """Add `adapters` and its actions to the top-level subparsers `sub`."""
    adapters = sub.add_parser(
        "adapters", help="list, inspect, register and manage modules (admin actions need --token-file)"
    )
    actions = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    ls = actions.add_parser("list", help="list modules (the latest version of each unless --all-versions)")
    ls.add_argument("--kind", type=str.upper, choices=KINDS, help="only this kind")
    ls.add_argument("--tag", default="", help="only modules with this tag")
    ls.add_argument("--prefix", default="", metavar="P", help="only names starting with P")
    ls.add_argument("--all-versions", action="store_true", help="every version, not just the latest")
    ls.add_argument("--json", action="store_true", help="print a JSON array")

    show = actions.add_parser("show", help="show one module version")
    show.add_argument("ref", metavar="NAME[@V]", help="name (latest), name@version or name@alias")
    show.add_argument("--json", action="store_true", help="print JSON")

    reg = actions.add_parser("register", help="upload a PEFT save_pretrained() directory (admin)")
    reg.add_argument("directory", metavar="DIR", help="holds adapter_config.json and *.safetensors")
    reg.add_argument("--name", required=True, help="module name; each upload adds a version")
    reg.add_argument("--alias", default="", help="point this alias at the new version")
    reg.add_argument("--tag", action="append", default=[], dest="tags", help="a tag (repeatable)")
    reg.add_argument("--description", default="", metavar="D")
    reg.add_argument("--metadata-json", type=_json_object, metavar="'{...}'", help="free-form JSON object")

    delete = actions.add_parser("delete", help="delete a version, or every version of a name (admin)")
    delete.add_argument("ref", metavar="NAME[@V]", help="name@version: that version; name: all of them")
    delete.add_argument("--force", action="store_true", help="delete even when an alias points at it")

    alias = actions.add_parser("alias", help="point NAME@ALIAS at VERSION (admin)")
    alias.add_argument("name", metavar="NAME")
    alias.add_argument("alias", metavar="ALIAS")
    alias.add_argument("version", type=_version, metavar="VERSION")

    load = actions.add_parser("load", help="load into a device slot and pin it (admin)")
    load.add_argument("ref", metavar="NAME[@V]")
    unload = actions.add_parser("unload", help="unpin and evict from the device (admin)")
    unload.add_argument("ref", metavar="NAME[@V]")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {type(value).__name__}")
    return value


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a version is a positive integer, not {text!r}")
    return value


def run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _ACTIONS[args.adapters_command](client, args, out)


def cmd_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    infos = client.iter_adapters(
        kind=args.kind or "", tag=args.tag, name_prefix=args.prefix, all_versions=args.all_versions
    )
    if args.json:
        print(json.dumps([adapter_dict(i) for i in infos], indent=2), file=out)
        return 0
    rows = [_row(i) for i in infos]
    if not rows:
        # On stderr, like `kubectl get`: stdout stays a (headerless, empty) table for scripts.
        print("no adapters", file=sys.stderr)
        return 0
    print_table([TABLE_COLUMNS, *rows], out)
    return 0


def _row(info: apb.AdapterInfo) -> tuple[str, ...]:
    return (
        info.name,
        str(info.version),
        _kind(info.kind),
        ",".join(info.aliases) or "-",
        _residency(info),
        human_size(info.size_bytes),
        _created(info),
    )


def print_table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=False)]
        print("  ".join([*cells, row[-1]]), file=out)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _kind(kind: int) -> str:
    return apb.AdapterKind.Name(kind) if kind in apb.AdapterKind.values() and kind else "-"


def _residency(info: apb.AdapterInfo) -> str:
    name = apb.Residency.Name(info.residency) if info.residency in apb.Residency.values() else "?"
    return f"{name} (pinned)" if info.pinned else name


def _created(info: apb.AdapterInfo) -> str:
    if not info.HasField("created_at"):
        return "-"
    return info.created_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_show(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    info = client.get_adapter(args.ref)
    if args.json:
        print(json.dumps(adapter_dict(info), indent=2), file=out)
        return 0
    for field in info.DESCRIPTOR.fields:
        print(f"{field.name}: {_field_text(info, field)}", file=out)
    return 0


def _field_text(info: apb.AdapterInfo, field: FieldDescriptor) -> str:
    value = getattr(info, field.name)
    if field.name == "size_bytes":
        return f"{human_size(value)} ({value} bytes)" if value >= 1024 else human_size(value)
    if field.name == "created_at":
        return _created(info)
    if field.name == "metadata":
        return json.dumps(json_format.MessageToDict(value)) if info.HasField("metadata") else "{}"
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "(none)"
    if field.is_repeated:
        return ", ".join(str(v) for v in value) or "(none)"
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number
        return known[value].name if value in known else str(value)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    return str(value)


def cmd_register(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    try:
        info = client.register_adapter(
            args.directory,
            name=args.name,
            description=args.description,
            tags=args.tags,
            metadata=args.metadata_json,
            alias=args.alias,
        )
    except OSError as err:  # a file that cannot be read; main() reports ValueErrors as errors
        raise ValueError(f"cannot read {args.directory}: {err}") from err
    print(f"registered {_ref(info)}", file=out)
    return 0


def _ref(info: apb.AdapterInfo) -> str:
    return info.ref or f"{info.name}@{info.version}"


def cmd_delete(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    response = client.delete_adapter(args.ref, force=args.force)
    for ref in response.deleted:
        print(f"deleted {ref}", file=out)
    return 0


def cmd_alias(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    info = client.set_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias} -> {_ref(info)}", file=out)
    return 0


def cmd_load(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    info = client.load_adapter(args.ref)
    print(f"loaded {_ref(info)}: {_residency(info)}", file=out)
    return 0


def cmd_unload(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    info = client.unload_adapter(args.ref)
    print(f"unloaded {_ref(info)}: {_residency(info)}", file=out)
    return 0


_ACTIONS: dict[str, Callable[[Client, argparse.Namespace, TextIO], int]] = {
    "list": cmd_list,
    "show": cmd_show,
    "register": cmd_register,
    "delete": cmd_delete,
    "alias": cmd_alias,
    "load": cmd_load,
    "unload": cmd_unload,
}
