"""A tiny random-weight GPT-OSS model with the real o200k_harmony tokenizer, for running the
Harmony path on the real llama-server. Random weights say nothing useful, so tests force the
output with a grammar (tests/harmony_grammar.py).

The shape llama.cpp's gpt-oss graph needs: 2 layers (sliding window, then full), MoE experts
with biases, attention sinks, YaRN rope; the vocabulary is o200k_base's 199,998 ranks plus
Harmony's special tokens at their official ids, with merges derived from the ranks so that
llama.cpp's BPE tokenizes as tiktoken does. Written once (about 5 s) and cached.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
from gguf import (
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
    quants,
)

from shared.harmony_encoding import DATA, VOCAB
from shared.llama_server import BUILT_VERSION, built_path

VERSION = 1  # bump when the model written here changes
N_VOCAB, N_BPE = 201088, 199998
SPECIAL = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>",
           200003: "<|constrain|>", 200005: "<|channel|>", 200006: "<|start|>",
           200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
           200018: "<|endofprompt|>"}
E, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, FF = 64, 2, 4, 2, 64, 4, 64


def chat_template() -> Path | None:
    """gpt-oss's chat template as llama.cpp ships it (for `harmony: native`): in the source
    tree of the cached llama-server build, when llama-server was built here."""
    source = built_path().parents[2] / f"build-{BUILT_VERSION}" / "src/llama.cpp"
    path = source / "models/templates/openai-gpt-oss-120b.jinja"
    return path if path.is_file() else None


def cached_model() -> Path:
    cache = Path(os.environ.get("LLAMA_BUILD_CACHE", Path.home() / ".cache/model-serve"))
    path = cache / "test-models" / f"tiny-gptoss-v{VERSION}.gguf"
    if not path.is_file():
        write(path, chat_template())
    return path


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which "gpt2" vocabularies use."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out


def _vocabulary() -> tuple[list[str], list[int], list[str]]:
    ranks = {}
    for line in (DATA / VOCAB).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    tokens = [""] * N_VOCAB
    for token, rank in ranks.items():
        tokens[rank] = text(token)
    for i in range(N_BPE, N_VOCAB):
        tokens[i] = SPECIAL.get(i, f"<|reserved_{i}|>")
    types = [int(TokenType.NORMAL)] * N_BPE + [int(TokenType.CONTROL)] * (N_VOCAB - N_BPE)
    # every split whose halves are tokens, by the rank of the whole: BPE then merges as
    # tiktoken does (lowest-ranked pair first)
    splits = sorted((rank, ranks[t[:i]], ranks[t[i:]], t[:i], t[i:])
                    for t, rank in ranks.items() for i in range(1, len(t))
                    if t[:i] in ranks and t[i:] in ranks)
    return tokens, types, [f"{text(a)} {text(b)}" for *_, a, b in splits]


def write(path: Path, template: Path | None) -> None:
    rng = np.random.default_rng(0)

    def w(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + f".{os.getpid()}.part")
    g = GGUFWriter(str(part), "gpt-oss")
    g.add_name("tiny-gpt-oss")
    g.add_context_length(131072)
    g.add_embedding_length(E)
    g.add_block_count(LAYERS)
    g.add_feed_forward_length(FF)
    g.add_head_count(HEADS)
    g.add_head_count_kv(KV_HEADS)
    g.add_key_length(HEAD_DIM)
    g.add_value_length(HEAD_DIM)
    g.add_rope_dimension_count(HEAD_DIM)
    g.add_rope_freq_base(150000.0)
    g.add_rope_scaling_type(RopeScalingType.YARN)
    g.add_rope_scaling_factor(32.0)
    g.add_rope_scaling_orig_ctx_len(4096)
    g.add_layer_norm_rms_eps(1e-5)
    g.add_sliding_window(128)
    g.add_expert_count(EXPERTS)
    g.add_expert_used_count(2)
    g.add_expert_feed_forward_length(FF)
    g.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    tokens, types, merges = _vocabulary()
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("gpt-4o")
    g.add_token_list(tokens)
    g.add_token_types(types)
    g.add_token_merges(merges)
    g.add_bos_token_id(199998)
    g.add_eos_token_id(200002)
    g.add_pad_token_id(199999)
    g.add_add_bos_token(False)
    if template:
        g.add_chat_template(template.read_text())
    for name, scale in (("token_embd.weight", 1.0), ("output.weight", 0.05)):
        q = quants.quantize(w(N_VOCAB, E, scale=scale), GGMLQuantizationType.Q8_0)
        g.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    g.add_tensor("output_norm.weight", np.ones(E, dtype=np.float32))
    for i in range(LAYERS):
        p = f"blk.{i}."
        g.add_tensor(p + "attn_norm.weight", np.ones(E, dtype=np.float32))
        g.add_tensor(p + "post_attention_norm.weight", np.ones(E, dtype=np.float32))
        for name, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            g.add_tensor(f"{p}attn_{name}.weight", w(rows * HEAD_DIM, E))
            g.add_tensor(f"{p}attn_{name}.bias", w(rows * HEAD_DIM))
        g.add_tensor(p + "attn_output.weight", w(E, HEADS * HEAD_DIM))
        g.add_tensor(p + "attn_output.bias", w(E))
        g.add_tensor(p + "attn_sinks.weight", w(HEADS, scale=1.0))
        g.add_tensor(p + "ffn_gate_inp.weight", w(EXPERTS, E))
        g.add_tensor(p + "ffn_gate_inp.bias", w(EXPERTS))
        for name in ("gate", "up"):
            g.add_tensor(f"{p}ffn_{name}_exps.weight", w(EXPERTS, FF, E))
            g.add_tensor(f"{p}ffn_{name}_exps.bias", w(EXPERTS, FF))
        g.add_tensor(p + "ffn_down_exps.weight", w(EXPERTS, E, FF))
        g.add_tensor(p + "ffn_down_exps.bias", w(EXPERTS, E))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    part.replace(path)
