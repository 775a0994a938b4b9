"""Request builders shared by the sync and async clients: Python arguments -> protobuf requests.

Ranges are not checked here: the server is the authority and answers INVALID_ARGUMENT. What is checked
is what only the client can get wrong: giving both or neither of prompt and messages, and malformed
chat messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

from plugboard.v1 import generation_pb2 as pb

# A chat message as a ChatMessage, a {"role": ..., "content": ...} mapping or a (role, content) pair.
MessageLike: TypeAlias = pb.ChatMessage | Mapping[str, str] | tuple[str, str]
Messages: TypeAlias = Iterable[MessageLike]


def chat_message(item: MessageLike) -> pb.ChatMessage:
    """One chat message in any accepted form, as a ChatMessage."""
    if isinstance(item, pb.ChatMessage):
        return item
    if isinstance(item, Mapping):
        missing = {"role", "content"} - set(item)
        if missing:
            raise ValueError(f"chat message {dict(item)!r} lacks {', '.join(sorted(missing))}")
        extra = set(item) - {"role", "content"}
        if extra:
            # A typo such as "text" for "content" would otherwise be dropped silently.
            raise ValueError(f"chat message {dict(item)!r} has unknown keys: {', '.join(sorted(extra))}")
        return pb.ChatMessage(role=item["role"], content=item["content"])
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"chat message tuple must be (role, content), got {item!r}")
        return pb.ChatMessage(role=item[0], content=item[1])
    raise TypeError(
        f"chat message must be a ChatMessage, a {{'role', 'content'}} dict or a (role, content) tuple, "
        f"not {type(item).__name__}"
    )


def chat_messages(messages: Messages) -> list[pb.ChatMessage]:
    if isinstance(messages, str | bytes | Mapping | pb.ChatMessage):
        # A single message or a string where a list was meant: iterating it would go wrong quietly.
        raise TypeError(f"messages must be a list of chat messages, not {type(messages).__name__}")
    return [chat_message(m) for m in messages]


def _prompt_or_messages(
    prompt: str | None, messages: Messages | None, *, prompt_name: str = "prompt"
) -> tuple[str, list[pb.ChatMessage]]:
    if prompt is not None and messages is not None:
        raise ValueError(f"give either {prompt_name} or messages, not both")
    if prompt is None and messages is None:
        raise ValueError(f"give {prompt_name} or messages")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"{prompt_name} must be a str, not {type(prompt).__name__}")
        return prompt, []
    assert messages is not None
    return "", chat_messages(messages)


def _strings(values: str | Iterable[str], name: str) -> list[str]:
    # A lone string is one stop sequence, not one per character.
    if isinstance(values, str):
        return [values]
    out = list(values)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{name} must be strings, got {type(v).__name__}")
    return out


def generation_params(
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] = (),
    logprobs: bool = False,
    ignore_eos: bool = False,
) -> pb.GenerationParams:
    """GenerationParams; the `optional` fields are set only when given, so the server's defaults apply."""
    params = pb.GenerationParams(
        temperature=temperature,
        top_k=top_k,
        stop=_strings(stop, "stop"),
        logprobs=logprobs,
        ignore_eos=ignore_eos,
    )
    # proto3 presence: assigning even the default value marks the field as set, which the server reads
    # differently from "unset" (e.g. max_new_tokens=0 is refused, unset means the server's default).
    if max_new_tokens is not None:
        params.max_new_tokens = max_new_tokens
    if top_p is not None:
        params.top_p = top_p
    if repetition_penalty is not None:
        params.repetition_penalty = repetition_penalty
    if seed is not None:
        params.seed = seed
    return params


def generate_request(
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    adapter: str = "",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] = (),
    logprobs: bool = False,
    ignore_eos: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of `prompt` (raw text) and `messages` (chat-templated)."""
    text, msgs = _prompt_or_messages(prompt, messages)
    return pb.GenerateRequest(
        adapter=adapter,
        prompt=text,
        messages=msgs,
        params=generation_params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            ignore_eos=ignore_eos,
        ),
        request_id=request_id,
    )


def score_request(
    prompt: str | None = None,
    *,
    choices: Sequence[str],
    adapter: str = "",
    messages: Messages | None = None,
    request_id: str = "",
) -> pb.ScoreRequest:
    """A ScoreRequest; `choices` must be a list of strings (a lone string is refused, not split)."""
    if isinstance(choices, str):
        raise TypeError("choices must be a list of strings, not one string")
    text, msgs = _prompt_or_messages(prompt, messages)
    return pb.ScoreRequest(
        adapter=adapter,
        prompt=text,
        messages=msgs,
        choices=_strings(choices, "choices"),
        request_id=request_id,
    )


def tokenize_request(text: str | None = None, *, messages: Messages | None = None) -> pb.TokenizeRequest:
    """A TokenizeRequest from exactly one of `text` and `messages`."""
    raw, msgs = _prompt_or_messages(text, messages, prompt_name="text")
    return pb.TokenizeRequest(text=raw, messages=msgs)
