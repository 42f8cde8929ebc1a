"""Typed settings of the generation strategies (``generate.cst``, ``generate.multihop``,
``generate.rag_answer``); each section is read only when ``generate.strategy`` names it."""

from __future__ import annotations

from pydantic import Field

from craft_ray.config import StrictModel
from craft_ray.judging import JudgeModelConfig
from craft_ray.tasks.strategies import DEFAULT_RAG_SYSTEM

DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class CSTConfig(StrictModel):
    """AugCon's Context-Split-Tree: a question per node of a recursive split of each document."""

    min_chars: int = Field(
        default=200, ge=10, le=1_000_000,
        description="A node shorter than this is neither asked about nor split (AugCon's "
        "minimum context length).")
    max_depth: int = Field(default=3, ge=0, le=12,
                           description="Deepest level of the tree (root = 0).")
    split_by: str = Field(
        default="sentences", pattern="^(sentences|tokens)$",
        description="Where a node is cut in two: the sentence boundary nearest its middle "
        "('sentences', falling back to whitespace), or the whitespace token nearest its middle "
        "('tokens').")
    max_context_chars: int = Field(
        default=2000, ge=50, le=1_000_000,
        description="A document longer than this is cut (at a word boundary) before splitting, "
        "so the root's prompt fits small-context generators.")
    keep_fraction: float = Field(
        default=0.6, gt=0, le=1,
        description="Fraction of the scored questions kept, best first (AugCon's scorer "
        "filter).")
    dedup_threshold: float = Field(
        default=0.95, gt=0, le=1,
        description="A kept question whose cosine similarity to a better-scored kept question "
        "reaches this is a duplicate (exact duplicates after normalisation always are).")
    scorer_model: str = Field(
        default=DEFAULT_EMBED_MODEL,
        description="Bi-encoder scoring (context, question) pairs by cosine similarity (the "
        "offline all-MiniLM-L6-v2 by default).")
    answer_max_new_tokens: int | None = Field(
        default=None, ge=1, le=131_072,
        description="Answer budget (default: generate.max_new_tokens or 256).")


class MultihopConfig(StrictModel):
    """qa-expert's multi-hop items: pairs of neighbouring documents, sub-questions, answers."""

    store: str | None = Field(
        default=None,
        description="Embedding store whose vectors pair the documents (default RUN_DIR/embed/"
        "store: the one the retrieve stage searched).")
    min_similarity: float = Field(
        default=0.3, ge=-1, le=1,
        description="Two documents pair only when their cosine similarity reaches this "
        "(neighbours sharing a topic).")
    max_similarity: float = Field(
        default=0.97, ge=-1, le=1,
        description="...and stays below this (near-duplicates make no multi-hop question).")
    max_pairs: int | None = Field(default=None, ge=1,
                                  description="Use at most this many pairs.")
    unanswerable_fraction: float = Field(
        default=0.2, ge=0, le=1,
        description="Fraction of items whose second paragraph is swapped for an unrelated "
        "document, so its sub-question is unanswerable (qa-expert's negative items).")
    paragraph_max_chars: int = Field(
        default=800, ge=50, le=1_000_000,
        description="Each paragraph is cut to about this many characters (word boundary).")
    long_answer_temperature: float = Field(
        default=0.0, ge=0, le=5,
        description="Temperature of the long answers (qa-expert regenerates them at 0 to avoid "
        "hallucination).")


class RagAnswerConfig(StrictModel):
    """Instruction-FineTuning's RAG data: chunk questions, question evaluation, noisy answers."""

    store: str | None = Field(
        default=None,
        description="Embedding store whose neighbours give the noisy chunks (default "
        "RUN_DIR/embed/store).")
    chunk_chars: int = Field(default=400, ge=50, le=1_000_000,
                             description="Target chunk size in characters (sentence cuts).")
    chunks_per_prompt: int = Field(
        default=2, ge=1, le=64,
        description="Consecutive chunks shown in one question prompt (the repository's "
        "input_pages); together they are the item's gold context.")
    max_windows_per_doc: int = Field(default=2, ge=1, le=1000,
                                     description="Question prompts per document at most.")
    questions_per_prompt: int = Field(default=2, ge=1, le=32,
                                      description="Questions asked per prompt.")
    noisy_chunks: int = Field(
        default=2, ge=0, le=64,
        description="k: irrelevant chunks (from the gold document's store neighbours) mixed "
        "with the gold context in each answer prompt.")
    neighbours: int = Field(default=4, ge=1, le=1000,
                            description="Store neighbours of a document the noise is drawn from.")
    scenario: str = Field(
        default="A helpful assistant answering questions about coffee and beer brewing.",
        min_length=1,
        description="The deployment scenario that 'global relevance' is judged against.")
    topics: str = Field(default="the main facts of the text", min_length=1,
                        description="What the questions should be about.")
    min_score: float = Field(
        default=3.0, ge=1, le=5,
        description="Threshold of the question evaluation: relevance, global relevance and "
        "coverage (1-5) must each reach it.")
    evaluator: JudgeModelConfig | None = Field(
        default=None,
        description="Model scoring the questions (the judge machinery of craft_ray.judging). "
        "None: the generator itself, guided to the score schema.")
    system_prompt: str = Field(
        default=DEFAULT_RAG_SYSTEM, min_length=1,
        description="The system turn of the answer prompts and training prompts.")
