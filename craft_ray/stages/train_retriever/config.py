"""Config of ``craft-ray train-retriever``: data, negatives, loss, LM scoring, CRAFT pairs,
training and Ray Train settings (pydantic, unknown keys are errors)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.runtime import storage
from craft_ray.tasks.fewshots import CRAFT_TEMPLATE, FewShotConfig

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Fields that do not change what is learned: a rerun differing only in these resumes.
RESUME_NEUTRAL = {"stop_after_steps", "max_failures", "log_every_steps",
                  "checkpoint_every_steps", "num_checkpoints_to_keep", "storage_path",
                  "eval_before", "eval_data", "eval_split", "eval_concurrency",
                  "cpus_per_worker", "torch_threads"}


class NegativesSettings(StrictModel):
    """Where each query's hard negatives come from."""

    source: Literal["auto", "given", "mine", "none"] = Field(
        default="auto", description="given: the data's `neg` (jsonl) or qrels with score <= 0 "
        "(BEIR); mine: dense + BM25 top-k with the mine-negatives miner (BEIR data only); "
        "none: in-batch negatives only; auto: given for jsonl, mine for BEIR.")
    per_query: int = Field(default=7, ge=0, le=1024,
                           description="Hard negatives per query in a step (LLM-Embedder: "
                           "train_group_size 8 = 1 positive + 7 negatives).")
    mine_retrievers: list[Literal["dense", "bm25"]] = Field(
        default_factory=lambda: ["dense", "bm25"], min_length=1,
        description="mine: where candidates come from.")
    mine_top_k: int = Field(default=200, ge=1, le=100_000, description="mine: candidates "
                            "per retriever.")
    mine_skip_top: int = Field(
        default=0, ge=0, le=1000, description="mine: drop the first N mined candidates "
        "(likely unlabelled positives).")
    mine_keep: int = Field(default=100, ge=1, le=100_000,
                           description="mine: negatives kept per query (sampled from).")


class LossSettings(StrictModel):
    """Contrastive loss with in-batch and hard negatives, plus optional distillation."""

    temperature: float = Field(default=0.05, gt=0, le=10,
                               description="Softmax temperature of cosine scores (0.05 = "
                               "sentence-transformers' scale 20).")
    in_batch_negatives: bool = Field(
        default=True, description="Score each query against every key of the global batch "
        "(all workers), not only its own group.")
    contrastive_weight: float = Field(default=1.0, ge=0, le=100,
                                      description="Weight of the contrastive (InfoNCE) loss.")
    distill_weight: float = Field(
        default=0.0, ge=0, le=100, description="Weight of the KL loss towards the teacher "
        "distribution over each query's own group (needs teacher scores).")
    teacher_temperature: float = Field(default=1.0, gt=0, le=100,
                                       description="Softmax temperature of teacher scores.")
    select_positive: Literal["random", "first"] = Field(
        default="random", description="Which positive a query uses in a step (one per step).")


class LMScoringSettings(StrictModel):
    """LLM-Embedder's LM scoring: teacher score of key k = mean log p(answer | query, k)."""

    enabled: bool = Field(default=False, description="Score candidates with a causal LM "
                          "(rows with answers and without teacher_scores).")
    model: str = Field(default="", description="Causal LM (HF folder or id).")
    gguf_file: str | None = Field(default=None, description="GGUF file inside `model` "
                                  "(read by transformers with the gguf package).")
    tokenizer: str | None = Field(default=None, description="Tokenizer (default: model).")
    template: str = Field(default="Knowledge: {key}\n\nQuestion: {query}\n\nAnswer: ",
                          description="Prompt before the answer; {key} and {query}.")
    max_candidates: int = Field(default=8, ge=1, le=1024,
                                description="Positives + negatives scored per query (the "
                                "first ones); the others get no teacher score.")
    max_length: int = Field(default=512, ge=16, le=32_768,
                            description="Token limit of prompt + answer (prompt cut first).")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Sequences per forward.")
    rows_per_call: int = Field(default=16, ge=1, le=100_000,
                               description="Queries handed to a scoring actor per call.")
    concurrency: int = Field(default=1, ge=1, le=1024, description="Scoring actors.")
    num_cpus: float = Field(default=1.0, gt=0, le=512, description="CPUs per actor.")
    num_gpus: float = Field(default=0.0, ge=0, le=8, description="GPUs per actor.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Model dtype (auto: bfloat16 on GPU, float32 on CPU).")


class CraftPairsSettings(StrictModel):
    """Training pairs from a CRAFT run: few-shots as queries, their retrieved documents."""

    corpus_samples: str = Field(description="The retrieve stage's corpus_samples.parquet "
                                "(or .jsonl).")
    fewshots: FewShotConfig = Field(description="The few-shots the retrieve stage used.")
    query_template: str = Field(default=CRAFT_TEMPLATE,
                                description="How a few-shot is written as a query "
                                "({Field} of its record; default: the retrieve stage's).")
    positives_per_shot: int = Field(default=4, ge=1, le=10_000,
                                    description="Without relevance: a few-shot's top-N "
                                    "retrieved documents are its positives.")
    relevance: str | None = Field(
        default=None, description="Judge scores: jsonl/parquet of {fewshot_id, doc_id, "
        "relevance}; documents at or above min_relevance are positives, the others "
        "(retrieved for that few-shot) its hard negatives.")
    min_relevance: float = Field(default=0.5, description="Threshold on `relevance`.")


class TrainRetrieverConfig(StrictModel):
    """Config of ``craft-ray train-retriever`` (one retriever fine-tune)."""

    data: str | None = Field(default=None, description="BEIR folder (corpus.jsonl, "
                             "queries.jsonl, qrels/SPLIT.tsv) or LLM-Embedder jsonl "
                             "({query, pos, neg, pos_index, neg_index, answers}).")
    format: Literal["auto", "beir", "jsonl"] = Field(
        default="auto", description="auto: a folder is BEIR, a file is jsonl.")
    split: str = Field(default="train", description="BEIR qrels split to train on.")
    corpus: str | None = Field(default=None, description="jsonl data: corpus (BEIR "
                               "corpus.jsonl or jsonl with `text`) that pos_index/neg_index "
                               "point into, for rows without pos/neg texts.")
    craft: CraftPairsSettings | None = Field(default=None, description="Train on pairs "
                                             "from a CRAFT retrieve stage (instead of or "
                                             "besides `data`).")
    max_reject_fraction: float = Field(default=0.0, ge=0, le=1,
                                       description="Fail when more training rows than this "
                                       "are malformed (they go to rejects.jsonl).")
    out: str = Field(description="Output folder (local or s3:// / gs://): a "
                     "sentence-transformers model, plus metrics.json, stats.json, config.yaml.")
    work_dir: str | None = Field(default=None, description="Local scratch: mined negatives, "
                                 "training examples, logs, and the mining/evaluation "
                                 "embedding stores (default: OUT.work beside a local OUT; for "
                                 "an OUT in object storage a folder of the storage cache, the "
                                 "stores going to OUT.work in the bucket).")
    model: str = Field(default=DEFAULT_MODEL, description="Base sentence-transformers model "
                       "(id or folder; the default is the bundled offline copy).")
    max_seq_length: int = Field(default=256, ge=8, le=8192, description="Token limit of "
                                "queries and keys.")
    negatives: NegativesSettings = Field(default_factory=NegativesSettings,
                                         description="Hard negatives.")
    loss: LossSettings = Field(default_factory=LossSettings, description="The loss.")
    lm_scoring: LMScoringSettings = Field(default_factory=LMScoringSettings,
                                          description="Teacher scores from a causal LM.")
    seed: int = Field(default=1234, ge=0, le=2**31 - 1, description="Seed of the data order, "
                      "the negatives drawn and the initialisation.")
    epochs: int = Field(default=1, ge=1, le=10_000, description="Passes over the queries.")
    batch_size: int = Field(default=32, ge=1, le=65_536, description="Global batch: queries "
                            "per optimizer step over all workers.")
    learning_rate: float = Field(default=2e-5, gt=0, le=1, description="AdamW peak lr.")
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="AdamW weight decay.")
    warmup_ratio: float = Field(default=0.1, ge=0, le=1, description="Linear warm-up "
                                "fraction, then linear decay.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping.")
    dropout: bool = Field(default=True, description="Keep the model's dropout on while "
                          "training (off: steps are deterministic).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 autocast on GPU, fp32 on CPU; fp16: GPU "
        "autocast with a gradient scaler.")
    num_workers: int = Field(default=1, ge=1, le=4096, description="Ray Train workers (DDP).")
    use_gpu: bool = Field(default=False, description="One GPU per worker.")
    cpus_per_worker: float = Field(default=1.0, gt=0, le=1024, description="CPUs per worker.")
    torch_threads: int | None = Field(default=None, ge=1, le=1024,
                                      description="Torch threads per worker (default: "
                                      "cpus_per_worker).")
    checkpoint_every_steps: int | None = Field(default=None, ge=1, description="Also "
                                               "checkpoint every N steps (always at each "
                                               "epoch's end).")
    num_checkpoints_to_keep: int = Field(default=2, ge=1, le=1000,
                                         description="Ray Train checkpoints kept.")
    max_failures: int = Field(default=0, ge=-1, le=1000, description="Worker-group restarts "
                              "from the last checkpoint (-1: unlimited).")
    stop_after_steps: int | None = Field(default=None, ge=1, description="Stop after N steps "
                                         "(the schedule still spans all epochs; a rerun "
                                         "without it resumes).")
    log_every_steps: int = Field(default=1, ge=1, le=100_000,
                                 description="Steps between metrics.jsonl lines.")
    storage_path: str | None = Field(default=None, description="Ray Train storage (shared "
                                     "by all nodes or s3:// / gs://); default OUT.work/ray "
                                     "for an OUT in object storage, else WORK_DIR/ray.")
    eval_data: str | None = Field(default=None, description="BEIR folder for before/after "
                                  "metrics (default: `data` when it is a BEIR folder).")
    eval_split: str | None = Field(default="test", description="qrels split of the "
                                   "before/after metrics; empty: no evaluation.")
    eval_before: bool = Field(default=True, description="Also score the base model.")
    eval_concurrency: int = Field(default=1, ge=1, le=1024,
                                  description="Embedding actors of the evaluation.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")

    @model_validator(mode="after")
    def _check(self) -> TrainRetrieverConfig:
        if self.data is None and self.craft is None:
            raise ValueError("give training data: --data (BEIR folder or LLM-Embedder jsonl) "
                             "or a craft section (a retrieve stage's corpus_samples)")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of num_workers "
                             f"{self.num_workers}; every worker takes batch_size/num_workers "
                             "queries of each step")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision=fp16 needs use_gpu: true (fp16 autocast is CUDA "
                             "only); use auto or fp32 on CPU")
        if self.lm_scoring.enabled and not self.lm_scoring.model:
            raise ValueError("lm_scoring.enabled needs lm_scoring.model (a causal LM)")
        storage.refuse_uris("train-retriever", {"work_dir": self.work_dir}, "work_dir is the "
                            "run's local scratch (mined negatives, evaluation stores); data, "
                            "out and storage_path may be s3:// or gs:// URIs")
        return self

    def data_format(self) -> str | None:
        """'beir' or 'jsonl' (None without data)."""
        if self.data is None:
            return None
        if self.format != "auto":
            return self.format
        if storage.is_uri(self.data):
            return "jsonl" if storage.is_file(self.data) else "beir"
        return "beir" if Path(self.data).is_dir() else "jsonl"

    def negatives_source(self) -> str:
        """The resolved negatives source (auto: mine for BEIR data, given otherwise)."""
        if self.negatives.source != "auto":
            return self.negatives.source
        return "mine" if self.data_format() == "beir" else "given"

    def work_path(self) -> Path:
        """The run's local scratch: work_dir, else OUT.work beside a local OUT, else (OUT in
        object storage) a folder of this machine's storage cache named after OUT."""
        if self.work_dir:
            return Path(self.work_dir)
        if storage.is_uri(self.out):
            key = hashlib.sha256(self.out.encode()).hexdigest()[:16]
            return storage.cache_root() / "train-retriever" / f"{storage.name(self.out)}-{key}"
        out = Path(self.out)
        return out.with_name(out.name + ".work")

    def stores_root(self) -> str:
        """Where the mining and evaluation embed stages keep their converted corpora and
        embedding stores: OUT.work in OUT's bucket when OUT is a URI (the embedding actors may
        run on any node), else the work folder."""
        if storage.is_uri(self.out) and not self.work_dir:
            return f"{self.out.rstrip('/')}.work"
        return str(self.work_path())

    def storage_root(self) -> str:
        """Ray Train's storage (checkpoints, rank 0's metrics.jsonl): storage_path, else
        OUT.work/ray in OUT's bucket, else WORK/ray."""
        if self.storage_path:
            return self.storage_path
        if storage.is_uri(self.out):
            return storage.join(f"{self.out.rstrip('/')}.work", "ray")
        return str(self.work_path() / "ray")

    def localized(self) -> TrainRetrieverConfig:
        """A copy whose input files in object storage (data, corpus, eval_data, the craft
        section's files) are their downloads in this machine's storage cache."""
        def loc(p: str | None) -> str | None:
            return str(storage.local_copy(p)) if p and storage.is_uri(p) else p

        new = self.model_copy(update={k: loc(getattr(self, k))
                                      for k in ("data", "corpus", "eval_data")})
        if self.craft is not None:
            new = new.model_copy(update={"craft": self.craft.model_copy(update={
                "corpus_samples": loc(self.craft.corpus_samples),
                "relevance": loc(self.craft.relevance),
                "fewshots": self.craft.fewshots.model_copy(
                    update={"path": loc(self.craft.fewshots.path)})})})
        return new

    def eval_folder(self) -> str | None:
        """The BEIR folder of the before/after metrics, or None (no evaluation)."""
        if not self.eval_split:
            return None
        if self.eval_data:
            return self.eval_data
        return self.data if self.data_format() == "beir" else None

    def resolved(self) -> TrainRetrieverConfig:
        """A copy with local paths made absolute (Ray workers run elsewhere)."""
        def ab(p: str | None) -> str | None:
            return str(Path(p).expanduser().resolve()) if p and "://" not in p else p

        upd: dict[str, object] = {k: ab(getattr(self, k)) for k in
                                  ("data", "corpus", "out", "work_dir", "storage_path",
                                   "eval_data")}
        if Path(self.model).expanduser().exists():
            upd["model"] = ab(self.model)
        new = self.model_copy(update=upd)
        if self.craft is not None:
            craft = self.craft.model_copy(update={
                "corpus_samples": ab(self.craft.corpus_samples),
                "relevance": ab(self.craft.relevance),
                "fewshots": self.craft.fewshots.model_copy(
                    update={"path": ab(self.craft.fewshots.path)})})
            new = new.model_copy(update={"craft": craft})
        return new

    def resume_key(self) -> str:
        """Hash of the settings that change what is learned (names the Ray Train run)."""
        data = self.model_dump(mode="json", exclude=RESUME_NEUTRAL | {"ray"})
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
