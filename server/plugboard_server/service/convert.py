"""Protobuf <-> engine value types. No logic beyond the field mapping and proto3 presence rules."""

from __future__ import annotations

from plugboard.v1 import adapters_pb2
from plugboard.v1 import generation_pb2 as pb
from plugboard_server.engine import types as t
from plugboard_server.registry.store import AdapterRef

_FINISH = {
    t.FinishReason.LENGTH: pb.LENGTH,
    t.FinishReason.STOP: pb.STOP,
    t.FinishReason.EOS: pb.EOS,
    t.FinishReason.CANCELLED: pb.CANCELLED,
}


def messages(items) -> tuple[t.ChatMessage, ...]:
    return tuple(t.ChatMessage(role=m.role, content=m.content) for m in items)


def sampling_params(p: pb.GenerationParams) -> t.SamplingParams:
    return t.SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
        temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        logprobs=p.logprobs,
        ignore_eos=p.ignore_eos,
    )


def generate_input(req: pb.GenerateRequest, adapter: AdapterRef | None) -> t.GenerateInput:
    return t.GenerateInput(
        prompt=req.prompt,
        messages=messages(req.messages),
        adapter=adapter,
        params=sampling_params(req.params),
        request_id=req.request_id,
    )


def score_input(req: pb.ScoreRequest, adapter: AdapterRef | None) -> t.ScoreInput:
    return t.ScoreInput(
        prompt=req.prompt,
        messages=messages(req.messages),
        choices=tuple(req.choices),
        adapter=adapter,
        request_id=req.request_id,
    )


def timing(x: t.Timing) -> pb.Timing:
    return pb.Timing(
        queue_seconds=x.queue_seconds,
        prefill_seconds=x.prefill_seconds,
        total_seconds=x.total_seconds,
        first_token_seconds=x.first_token_seconds,
    )


def logprobs(items: tuple[t.TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=x.token_id, token=x.token, logprob=x.logprob) for x in items]


def generate_response(r: t.GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=r.text,
        finish_reason=_FINISH[r.reason],
        prompt_tokens=r.prompt_tokens,
        generated_tokens=r.generated_tokens,
        adapter=r.adapter,
        logprobs=logprobs(r.logprobs),
        timing=timing(r.timing),
        request_id=r.request_id,
        seed=r.seed,
    )


def stream_delta(d: t.TokenDelta) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(text=d.text, token_ids=list(d.token_ids), logprobs=logprobs(d.logprobs))


def stream_end(f: t.Finished, *, adapter: str, request_id: str, seed: int) -> pb.GenerateStreamResponse:
    msg = stream_delta(f.delta) if f.delta is not None else pb.GenerateStreamResponse()
    msg.finish_reason = _FINISH[f.reason]
    msg.prompt_tokens = f.prompt_tokens
    msg.generated_tokens = f.generated_tokens
    msg.adapter = adapter
    msg.timing.CopyFrom(timing(f.timing))
    msg.request_id = request_id
    msg.seed = seed
    return msg


def score_response(r: t.ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        scores=[
            pb.ChoiceScore(choice=s.choice, logprob=s.logprob, probability=s.probability, tokens=s.tokens)
            for s in r.scores
        ],
        best=r.best,
        adapter=r.adapter,
        prompt_tokens=r.prompt_tokens,
        request_id=r.request_id,
    )


def tokenize_response(r: t.Tokenized) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_ids=list(r.token_ids), tokens=list(r.tokens))


def model_info(i: t.ModelInfo, server_version: str) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model=i.model,
        name=i.name,
        fingerprint=i.fingerprint,
        architecture=i.architecture,
        dtype=i.dtype,
        device=i.device,
        quantization=i.quantization,
        max_context_tokens=i.max_context_tokens,
        max_input_tokens=i.max_input_tokens,
        max_new_tokens=i.max_new_tokens,
        default_max_new_tokens=i.default_max_new_tokens,
        max_batch_size=i.max_batch_size,
        vocab_size=i.vocab_size,
        eos_token_ids=list(i.eos_token_ids),
        has_chat_template=i.has_chat_template,
        num_layers=i.num_layers,
        hidden_size=i.hidden_size,
        num_attention_heads=i.num_attention_heads,
        num_key_value_heads=i.num_key_value_heads,
        head_dim=i.head_dim,
        adapter_kinds=[adapters_pb2.AdapterKind.Value(k) for k in i.adapter_kinds],
        max_loaded_adapters=i.max_loaded_adapters,
        max_lora_rank=i.max_lora_rank,
        max_prefix_tokens=i.max_prefix_tokens,
        server_version=server_version,
    )
