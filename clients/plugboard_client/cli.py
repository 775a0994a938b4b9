"""The `plugboard` command line: generate, score, tokenize, info, health and adapters against a server.

`main(argv, client_factory=...)` takes the client factory as an argument so tests can inject a fake.
The `adapters` subcommands live in cli_adapters.py.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from plugboard_client import cli_adapters
from plugboard_client.client import DEFAULT_TARGET, Client
from plugboard_client.errors import PlugboardError

# Called as factory(target, timeout=seconds_or_None), plus token=... when a token file is given and
# tls_ca=, tls_cert=, tls_key=, tls=, tls_server_name= when set; anything with Client's methods and
# close() will do.
ClientFactory = Callable[..., Client]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugboard", description="Talk to a plugboard inference server.")
    parser.add_argument(
        "--target",
        default=os.environ.get("PLUGBOARD_TARGET", DEFAULT_TARGET),
        help=f"server address host:port (default: $PLUGBOARD_TARGET, else {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", type=float, metavar="S", help="per-call deadline in seconds")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("PLUGBOARD_TOKEN_FILE") or None,
        metavar="PATH",
        help="file holding the bearer token sent with every call: the admin token that `adapters` "
        "register/delete/alias/load/unload need (it serves for every other call too), or the inference "
        "token of a server started with --inference-token-file (default: $PLUGBOARD_TOKEN_FILE)",
    )
    add_tls_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a completion")
    _add_text_args(gen)
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--max-new-tokens", type=int, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, metavar="P")
    gen.add_argument("--top-k", type=int, default=0, metavar="K")
    gen.add_argument("--repetition-penalty", type=float, metavar="R")
    gen.add_argument("--seed", type=int, metavar="S")
    gen.add_argument("--stop", action="append", default=[], metavar="STR", help="stop sequence (repeatable)")
    gen.add_argument("--logprobs", action="store_true", help="ask for per-token logprobs (shown with --json)")
    gen.add_argument("--json", action="store_true", help="print JSON (JSON lines with --stream)")

    score = sub.add_parser("score", help="score candidate continuations (classification)")
    _add_text_args(score)
    score.add_argument(
        "--choices", required=True, metavar="A,B[,C...]", help="comma-separated choices, kept verbatim"
    )
    score.add_argument("--json", action="store_true", help="print the response as JSON")

    tok = sub.add_parser("tokenize", help="show the tokens of a text (after the chat template unless --raw)")
    tok.add_argument("text", metavar="TEXT", help="the text; - reads standard input")
    tok.add_argument("--system", metavar="TEXT", help="a system message to put first (not with --raw)")
    tok.add_argument("--raw", action="store_true", help="tokenize TEXT as is, without the chat template")
    tok.add_argument("--json", action="store_true", help="print the response as JSON")

    info = sub.add_parser("info", help="show the server's model and limits")
    info.add_argument("--json", action="store_true", help="print the response as JSON")

    health = sub.add_parser("health", help="print the health status; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="a service name (default: the whole server)")

    cli_adapters.add_parser(sub)
    return parser


def add_tls_arguments(parser: Any) -> None:
    """--tls-ca, --tls-cert, --tls-key, --tls, --tls-server-name on `parser` (or an argument group)."""
    env = os.environ.get
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=env("PLUGBOARD_TLS_CA") or None,
        metavar="PEM",
        help="connect with TLS, trusting the CA bundle that signed the server's certificate "
        "(default: $PLUGBOARD_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=env("PLUGBOARD_TLS_CLIENT_CERT") or None,
        metavar="PEM",
        help="client certificate for mutual TLS, with --tls-key (default: $PLUGBOARD_TLS_CLIENT_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        default=env("PLUGBOARD_TLS_CLIENT_KEY") or None,
        metavar="PEM",
        help="private key of --tls-cert (default: $PLUGBOARD_TLS_CLIENT_KEY)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's roots (no --tls-ca)"
    )
    parser.add_argument(
        "--tls-server-name",
        default=env("PLUGBOARD_TLS_SERVER_NAME") or None,
        metavar="NAME",
        help="check the server's certificate for NAME instead of the target's host "
        "(default: $PLUGBOARD_TLS_SERVER_NAME)",
    )


def tls_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The TLS keyword arguments for Client, only those set; ValueError for a half-given client pair."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    kwargs: dict[str, Any] = {"tls": True} if args.tls else {}
    for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def read_token_file(path: Path) -> str:
    """The token in `path`, surrounding whitespace (the trailing newline) stripped."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the token file {path}: {err}") from err
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", metavar="TEXT", help="the user message (or raw prompt with --raw); - reads stdin")
    p.add_argument("--adapter", default="", help="module to apply: name, name@version or name@alias")
    # The default model is an instruct model: chat formatting is what gives sensible answers.
    p.add_argument("--system", metavar="TEXT", help="a system message to put first (not with --raw)")
    p.add_argument("--raw", action="store_true", help="send TEXT as a raw prompt, without the chat template")


def main(argv: Sequence[str] | None = None, *, client_factory: ClientFactory | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok, 1 failed call, 2 usage error (argparse exits itself),
    130 interrupted, 141 stdout closed early."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "raw", False) and getattr(args, "system", None) is not None:
        parser.error("--system needs the chat template; it cannot be combined with --raw")
    kwargs: dict[str, Any] = {"timeout": args.timeout}
    if args.token_file is not None:
        # Read before connecting: a bad path is a usage error, reported without touching the server.
        try:
            kwargs["token"] = read_token_file(args.token_file)
        except ValueError as err:
            parser.error(f"--token-file / $PLUGBOARD_TOKEN_FILE: {err}")
    try:
        kwargs |= tls_kwargs(args)
    except ValueError as err:
        parser.error(str(err))
    factory = client_factory or Client
    try:
        with closing(factory(args.target, **kwargs)) as client:
            return _COMMANDS[args.command](client, args, sys.stdout)
    except (PlugboardError, ValueError) as err:  # ValueError: refused before sending
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `plugboard ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit like a process killed by SIGPIPE would.
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file (e.g. captured in tests): nothing will flush to a closed pipe


def _input_text(args: argparse.Namespace) -> str:
    return sys.stdin.read() if args.text == "-" else args.text


def _prompt_kwargs(args: argparse.Namespace, raw_key: str = "prompt") -> dict[str, Any]:
    """prompt= (or raw_key=) for --raw, else messages= with an optional system message first."""
    text = _input_text(args)
    if args.raw:
        return {raw_key: text}
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages.append({"role": "user", "content": text})
    return {"messages": messages}


def to_json(message: Message, *, compact: bool = False) -> str:
    """Proto field names (as in the .proto and in Python); defaults shown except on compact stream lines."""
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=not compact,
        indent=None if compact else 2,
    )


def cmd_generate(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    kwargs = _prompt_kwargs(args) | {
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "logprobs": args.logprobs,
    }
    if not args.stream:
        response = client.generate(**kwargs)
        print(to_json(response) if args.json else response.text, file=out)
        return 0
    open_line = False
    # closing(): an error or Ctrl-C mid-stream cancels the call instead of leaving it to the GC.
    with closing(client.generate_stream(**kwargs)) as stream:
        try:
            for part in stream:
                if args.json:
                    print(to_json(part, compact=True), file=out, flush=True)
                elif part.text:
                    out.write(part.text)
                    out.flush()
                    open_line = not part.text.endswith("\n")
        except BaseException:
            if open_line:  # keep the error message and the shell prompt off the partial line
                out.write("\n")
                out.flush()
            raise
    if not args.json:
        out.write("\n")
    return 0


def cmd_score(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    choices = args.choices.split(",")
    response = client.score(**_prompt_kwargs(args), choices=choices, adapter=args.adapter)
    if args.json:
        print(to_json(response), file=out)
        return 0
    width = max((len(repr(s.choice)) for s in response.scores), default=0)
    for s in response.scores:
        mark = "*" if s.choice == response.best else " "
        # repr: leading/trailing spaces in a choice matter to the tokenizer, so make them visible.
        print(f"{mark} {s.choice!r:<{width}}  p={s.probability:.4f}  logprob={s.logprob:.4f}", file=out)
    return 0


def cmd_tokenize(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    response = client.tokenize(**_prompt_kwargs(args, raw_key="text"))
    if args.json:
        print(to_json(response), file=out)
        return 0
    for token_id, token in zip(response.token_ids, response.tokens, strict=False):
        print(f"{token_id:>8}  {token!r}", file=out)
    print(f"{len(response.token_ids)} tokens", file=out)
    return 0


def cmd_info(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    response = client.model_info()
    if args.json:
        print(to_json(response), file=out)
        return 0
    for field in response.DESCRIPTOR.fields:
        print(f"{field.name}: {_field_text(field, getattr(response, field.name))}", file=out)
    return 0


def _field_text(field: FieldDescriptor, value: Any) -> str:
    """One field as text: enum names, true/false, lists comma-separated."""
    values = list(value) if field.is_repeated else [value]
    if not values:
        return "(none)"
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = [
            field.enum_type.values_by_number[v].name if v in field.enum_type.values_by_number else v
            for v in values
        ]
    elif field.type == FieldDescriptor.TYPE_BOOL:
        values = ["true" if v else "false" for v in values]
    return ", ".join(str(v) for v in values)


def cmd_health(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    status = client.health(args.service)
    print(status, file=out)
    return 0 if status == "SERVING" else 1


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace, TextIO], int]] = {
    "generate": cmd_generate,
    "score": cmd_score,
    "tokenize": cmd_tokenize,
    "info": cmd_info,
    "health": cmd_health,
    "adapters": cli_adapters.run,
}


if __name__ == "__main__":
    sys.exit(main())
