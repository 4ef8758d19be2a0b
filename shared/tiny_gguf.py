"""Tiny random-weight llama GGUF models with a byte-level vocabulary, for tests and the demo.

They load in the real llama-server in tens of milliseconds and generate thousands of
tokens a second, so they measure the serving path rather than the model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, PoolingType, TokenType

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
N_VOCAB = 259
PRINTABLE = (9, 10, 13, *range(0x20, 0x7F))


def _vocab(n_vocab: int, ascii_only: bool) -> tuple[list[bytes], list[int]]:
    """The byte vocabulary, padded with never-produced words up to `n_vocab` (a real model's
    vocabulary size shapes its output buffer). `ascii_only`: printable ASCII bytes alone, so
    that whatever the model writes is valid UTF-8 (Ollama drops an answer that is not), and
    SPM's space marker, which spells the spaces of a prompt."""
    byte_values = PRINTABLE if ascii_only else range(256)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in byte_values]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.BYTE] * len(byte_values)
    if ascii_only:
        tokens.append("\u2581".encode())
        types.append(TokenType.NORMAL)
    pad = n_vocab - len(tokens)
    tokens += [f"<w{i}>".encode() for i in range(pad)]
    types += [TokenType.USER_DEFINED] * pad
    return tokens, [int(t) for t in types]


def layer_bytes(n_embd: int, n_ff: int, n_embd_kv: int) -> int:
    return 4 * (2 * n_embd + 2 * n_embd * (n_embd + n_embd_kv) + 3 * n_embd * n_ff)


def write_model(
    path: Path,
    *,
    name: str = "tiny",
    n_embd: int = 64,
    n_layer: int = 2,
    n_ff: int | None = None,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_vocab: int = N_VOCAB,
    context_length: int = 4096,
    target_bytes: int | None = None,
    seed: int = 0,
    pooling_type: int = 0,
    ascii_only: bool = False,
) -> Path:
    """Write a model; with `target_bytes` the layer count grows until the file is that big."""
    n_ff = n_ff or 4 * n_embd
    n_embd_kv = n_embd // n_head * (n_head_kv or n_head)
    if target_bytes:
        n_layer = max(1, math.ceil(target_bytes / layer_bytes(n_embd, n_ff, n_embd_kv)))
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    w = GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv or n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(LlamaFileType.ALL_F32)
    if pooling_type:
        w.add_pooling_type(PoolingType(pooling_type))
    tokens, types = _vocab(n_vocab, ascii_only)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", weights(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for t, rows in (("attn_q", n_embd), ("attn_k", n_embd_kv), ("attn_v", n_embd_kv),
                        ("attn_output", n_embd)):
            w.add_tensor(p + t + ".weight", weights(rows, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", weights(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", weights(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", weights(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
