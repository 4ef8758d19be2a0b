"""What a model is for, decided from its GGUF header (the catalog's `Entry.info`)."""

from __future__ import annotations

from collections.abc import Sequence

EMBEDDING, RERANK, GENERATE = "embedding", "rerank", "generate"
# llama.cpp's pooling types (`<arch>.pooling_type`): a model that pools its tokens into one
# vector is an embedding model; RANK pools into a relevance score, a reranker.
POOLING_NONE, POOLING_RANK = 0, 4
# Encoder architectures, embedding models whatever their header says of pooling: llama.cpp
# pools them by default.
ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                      "neo-bert", "modern-bert", "t5encoder", "gemma-embedding"})
# llama-server flags that make any model serve as one (custom_models.yaml may give them)
FLAGS = {"--embedding": EMBEDDING, "--embeddings": EMBEDDING, "--rerank": RERANK,
         "--reranking": RERANK}


def kind(info: dict, args: Sequence[str] = ()) -> str:
    """EMBEDDING, RERANK or GENERATE (a model that writes text), from the header and the
    flags the model is run with."""
    for arg in args:
        if arg in FLAGS:
            return FLAGS[arg]
    pooling = info.get("pooling_type") or POOLING_NONE
    if pooling == POOLING_RANK:
        return RERANK
    if pooling != POOLING_NONE or info.get("architecture") in ENCODERS:
        return EMBEDDING
    return GENERATE
