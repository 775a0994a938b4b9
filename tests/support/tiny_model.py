"""Tiny randomly initialised causal LMs with a real byte-level BPE tokenizer, saved to a directory.

Tests load them through the server's own loading code. Everything is built in-process from a fixed
seed: no hub, no network, and the same weights on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

EOS = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", EOS]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Plugboard serves many learned task modules on one frozen language model.",
    "Prefix tuning, prompt tuning and LoRA adapters share one running batch.",
    "Café, naïve, façade, 東京, Москва, emoji 🙂🚀 and other multi-byte characters.",
    "fresh rotten good bad yes no positive negative 0123456789",
] * 20


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(
    path: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    init_range: float = 0.1,
) -> Path:
    """Save a tiny Llama (GQA: `heads` query heads over `kv_heads` KV heads) and its tokenizer to path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=None,
        initializer_range=init_range,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "plugboard.json").write_text(json.dumps({"name": f"tiny-llama-s{seed}"}))
    return path


def build_gpt2(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4) -> Path:
    """Save a tiny GPT-2 (fused c_attn Conv1D, absolute positions) and its tokenizer to path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=512,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "plugboard.json").write_text(json.dumps({"name": f"tiny-gpt2-s{seed}"}))
    return path
