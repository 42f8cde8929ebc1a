"""``run_train_retriever``: fine-tune a sentence-transformers retriever on Ray Train.

The recipe, top to bottom::

    data (BEIR folder | LLM-Embedder jsonl | CRAFT corpus_samples + few-shots)
      -> examples {query, pos, neg, teacher_scores, answers}        data.py
         (BEIR: negatives mined on the fly with the mine-negatives miner)
      -> optional LM scoring: teacher_scores = log p(answer | q, k)  lm_score.py (Ray Data)
      -> metrics of the base model on the eval split                retrieval_eval
      -> TorchTrainer(train_loop_per_worker), DDP over N workers      loss.py
           every worker: the whole example list (a Ray dataset, not split), the global batch
           of each step, its slice encoded, embeddings all-gathered, loss of the global batch
           -> ray.train.report(metrics, checkpoint) at each epoch end / every N steps / last
      -> OUT/  the sentence-transformers model (SentenceTransformer.save), metrics.json,
               stats.json, config.yaml, _SUCCESS (written last)

Invariants:

* The Ray Train run is named after a hash of the settings that change what is learned, so a
  rerun with the same settings resumes from its last checkpoint (model, AdamW and schedule
  state, data position); a changed config starts afresh.
* ``OUT/_SUCCESS`` is written after the model files and metrics are in place; a finished run
  with the same config is not redone.
* OUT, the inputs and Ray Train's storage may be in object storage (``s3://``, ``gs://``):
  inputs are read from their downloads in the driver's storage cache, the model is uploaded,
  checkpoints and rank 0's metrics.jsonl go to OUT.work/ray in the bucket by default, and the
  embedding stores of negative mining and evaluation to OUT.work/mine and OUT.work/eval-* (the
  embedding actors may run on any node); the work folder (mined negatives, examples, the
  training log) is the driver's local scratch.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from craft_ray.config import ConfigError
from craft_ray.runtime import (
    StageDir,
    StageStats,
    atomic_path,
    atomic_write_text,
    storage,
)
from craft_ray.stages.train_retriever.config import TrainRetrieverConfig
from craft_ray.stages.train_retriever.data import (
    Example,
    RetrieverDataError,
    beir_examples,
    check_rejects,
    craft_examples,
    load_corpus_file,
    load_jsonl_examples,
    load_relevance,
    read_rows,
    write_examples,
)
from craft_ray.stages.train_retriever.loss import epoch_order, global_batch, train_step

logger = logging.getLogger(__name__)

CHECKPOINT_STATE = "train_state.json"
EVAL_CUTOFFS = [10, 100]


# --- data (driver) -------------------------------------------------------------------------


def mined_negatives(cfg: TrainRetrieverConfig, work: Path) -> dict[str, list[str]]:
    """Hard negatives per query id of a BEIR split, mined with the mine-negatives miner."""
    from craft_ray.retrieval.negatives import MineNegativesConfig, run_mine_negatives

    n = cfg.negatives
    out = work / "negatives.jsonl"
    mcfg = MineNegativesConfig(
        data=str(cfg.data), split=cfg.split, out=str(out), retrievers=n.mine_retrievers,
        top_k=n.mine_top_k, num_negatives=n.mine_keep + n.mine_skip_top, model=cfg.model,
        run_dir=storage.join(cfg.stores_root(), "mine"), ray=cfg.ray)
    stats = run_mine_negatives(mcfg)
    logger.info("train-retriever: mined negatives for %d queries (mean %s each)",
                stats["queries"], stats["negatives_mean"])
    negs = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        negs[row["query_id"]] = row["neg"][n.mine_skip_top:]
    return negs


def prepare_examples(cfg: TrainRetrieverConfig, work: Path
                     ) -> tuple[list[Example], list[dict[str, Any]]]:
    """The training examples and the rejected rows (Ray must be initialised to mine or to
    LM-score)."""
    from craft_ray.tasks.fewshots import load_fewshots

    examples: list[Example] = []
    rejects: list[dict[str, Any]] = []
    source = cfg.negatives_source()
    fmt = cfg.data_format()
    if fmt == "beir":
        if source == "mine":
            examples += beir_examples(cfg.data, cfg.split, mined_negatives(cfg, work))
        else:
            examples += beir_examples(cfg.data, cfg.split, {} if source == "none" else None)
    elif fmt == "jsonl":
        corpus = load_corpus_file(cfg.corpus) if cfg.corpus else None
        got, rejects = load_jsonl_examples(str(cfg.data), corpus)
        check_rejects(str(cfg.data), len(got), rejects, cfg.max_reject_fraction)
        if source == "mine":
            raise RetrieverDataError("negatives.source=mine needs BEIR data (a corpus to mine "
                                     "from); jsonl data brings its own `neg`")
        examples += got
    if cfg.craft is not None:
        c = cfg.craft
        rel = load_relevance(c.relevance) if c.relevance else None
        examples += craft_examples(read_rows(c.corpus_samples), load_fewshots(c.fewshots),
                                   c.query_template, c.positives_per_shot, rel,
                                   c.min_relevance, source=c.corpus_samples)
    if source == "none":
        for ex in examples:
            ex.neg = []
    if cfg.lm_scoring.enabled:
        from craft_ray.stages.train_retriever.lm_score import score_examples

        score_examples(examples, cfg.lm_scoring)
    if cfg.loss.distill_weight > 0 and not any(ex.teacher_scores for ex in examples):
        raise ConfigError("loss.distill_weight > 0 but no example has teacher scores; give "
                          "teacher_scores in the data or enable lm_scoring (with answers)")
    return examples, rejects


def make_plan(cfg: TrainRetrieverConfig, n_examples: int) -> dict[str, int]:
    """Steps per epoch and in total."""
    from craft_ray.stages.train_retriever.loss import steps_per_epoch

    per_epoch = steps_per_epoch(n_examples, cfg.batch_size)
    if per_epoch < 1:
        raise ConfigError(f"train-retriever: {n_examples} training queries for a batch of "
                          f"{cfg.batch_size}; lower batch_size")
    return {"examples": n_examples, "steps_per_epoch": per_epoch,
            "total_steps": per_epoch * cfg.epochs}


# --- evaluation (driver) -------------------------------------------------------------------


def evaluate_model(cfg: TrainRetrieverConfig, model: str, tag: str
                   ) -> dict[str, float] | None:
    """nDCG/MRR/Recall@{10,100} of ``model`` on the eval split (None without one)."""
    from craft_ray.retrieval.evaluation import RetrievalEvalConfig, run_eval_retrieval

    folder = cfg.eval_folder()
    if folder is None:
        return None
    run_dir = storage.join(cfg.stores_root(), f"eval-{tag}")
    storage.remove(run_dir)  # a retrained OUT has the same path: re-embed
    ecfg = RetrievalEvalConfig(data=folder, split=str(cfg.eval_split), model=model,
                               cutoffs=EVAL_CUTOFFS, run_dir=run_dir,
                               max_seq_length=cfg.max_seq_length,
                               concurrency=cfg.eval_concurrency,
                               num_gpus=1.0 if cfg.use_gpu else 0.0, ray=cfg.ray)
    return run_eval_retrieval(ecfg)["metrics"]


# --- the Ray Train worker ------------------------------------------------------------------


def _autocast(cfg: TrainRetrieverConfig, on_gpu: bool) -> tuple[Any, Any]:
    """(autocast context or None, GradScaler or None) for the configured precision."""
    import torch

    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if on_gpu else "fp32"
    if prec == "fp32":
        return None, None
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    ctx = torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=dtype)
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None
    return ctx, scaler


def _trim_metrics(path: str, keep_upto_step: int) -> None:
    """On resume, drop the metrics lines of steps after the checkpoint (they are redone)."""
    if not storage.is_file(path):
        return
    keep = [line for line in storage.read_text(path).splitlines()
            if line.strip() and not json.loads(line).get("final")
            and json.loads(line).get("step", 0) <= keep_upto_step]
    storage.write_text(path, "".join(x + "\n" for x in keep))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: contrastive fine-tune of the embedder (DDP over the workers)."""
    import ray.train
    import ray.train.torch
    import torch

    from craft_ray.models.embedder import load_sentence_transformer

    cfg = TrainRetrieverConfig.model_validate(config["cfg"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = load_sentence_transformer(cfg.model, str(device), cfg.max_seq_length, fp16=False)
    examples = _worker_examples()
    optimizer, scheduler = _optimizer(cfg, model, plan["total_steps"])
    state = _resume(model, optimizer, scheduler, rank)
    model.to(device)
    net = model
    if world > 1:  # the pooler of BERT-like models is unused by sentence embeddings
        net = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True})
    net.train(cfg.dropout)  # eval mode = dropout off; gradients flow either way
    # rank 0 writes its metrics to the Ray Train run's storage (shared or an object store, as
    # its checkpoints): the driver never reads a worker's disk
    metrics_path = config["metrics"]
    if rank == 0:
        _trim_metrics(metrics_path, state["global_step"])
    _train_steps(cfg, plan, state, examples, model, net, optimizer, scheduler,
                 device=device, rank=rank, metrics_path=metrics_path)


def _worker_examples() -> list[Example]:
    """Every training example, in the driver's order (each worker reads them all)."""
    import ray.train

    rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: r["idx"])
    return [Example(r["query"], list(r["pos"]), list(r["neg"]),
                    None if r["teacher_scores"] is None else list(r["teacher_scores"]))
            for r in rows]


def _optimizer(cfg: TrainRetrieverConfig, model: Any, total: int) -> tuple[Any, Any]:
    """AdamW and its linear schedule with warm-up over ``total`` steps."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    return optimizer, scheduler


def _resume(model: Any, optimizer: Any, scheduler: Any, rank: int) -> dict[str, int]:
    """Load the last Ray Train checkpoint into the model, optimizer and schedule, if any;
    returns where to go on (epoch, step in epoch, global step)."""
    import ray.train
    import torch

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / CHECKPOINT_STATE).read_text())
            model.load_state_dict(torch.load(Path(d) / "model.pt", map_location="cpu",
                                             weights_only=True))
            opt = torch.load(Path(d) / "optim.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(opt["optimizer"])
            scheduler.load_state_dict(opt["scheduler"])
        logger.info("rank %d: resuming at step %d", rank, state["global_step"])
    return state


def _train_steps(cfg: TrainRetrieverConfig, plan: dict[str, int], state: dict[str, int],
                 examples: list[Example], model: Any, net: Any, optimizer: Any, scheduler: Any,
                 *, device: Any, rank: int, metrics_path: str) -> None:
    """The steps from ``state`` on: rank 0 logs every ``log_every_steps``; a checkpoint at
    each epoch's end and every ``checkpoint_every_steps``; the last one holds the model."""
    import torch

    autocast, scaler = _autocast(cfg, cfg.use_gpu and torch.cuda.is_available())
    total = plan["total_steps"]
    step = state["global_step"]
    stop_at = min(total, cfg.stop_after_steps or total)
    last: dict[str, Any] = {}
    nxt = (state["epoch"], state["step_in_epoch"])
    for epoch in range(state["epoch"], cfg.epochs):
        if step >= stop_at:
            break
        order = epoch_order(len(examples), cfg.seed, epoch)
        first = state["step_in_epoch"] if epoch == state["epoch"] else 0
        for s in range(first, plan["steps_per_epoch"]):
            t0 = time.perf_counter()
            groups = global_batch(examples, order, s, cfg.batch_size, cfg.seed, epoch,
                                  cfg.negatives.per_query, cfg.loss.select_positive)
            out = train_step(net, model.preprocess if hasattr(model, "preprocess")
                             else model.tokenize, groups, optimizer, scheduler, cfg.loss,
                             device=device, max_grad_norm=cfg.max_grad_norm,
                             autocast=autocast, scaler=scaler)
            step += 1
            end_of_epoch = s + 1 == plan["steps_per_epoch"]
            nxt = (epoch + 1, 0) if end_of_epoch else (epoch, s + 1)
            last = {"step": step, "epoch": epoch + (s + 1) / plan["steps_per_epoch"], **out,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "step_s": time.perf_counter() - t0}
            if rank == 0 and (step % cfg.log_every_steps == 0 or step == stop_at):
                storage.append_text(metrics_path,
                                    json.dumps({**last, "time": time.time()}) + "\n")
            if step >= stop_at:
                break
            if end_of_epoch or (cfg.checkpoint_every_steps
                                and step % cfg.checkpoint_every_steps == 0):
                _report(last, nxt, step, rank, model, optimizer, scheduler)
    _report({**last, "step": step, "final": True}, nxt, step, rank, model, optimizer, scheduler,
            final=True)


def _report(metrics: dict[str, Any], nxt: tuple[int, int], step: int, rank: int, model: Any,
            optimizer: Any, scheduler: Any, final: bool = False) -> None:
    """Report ``metrics`` to Ray Train with rank 0's checkpoint: model and optimizer state,
    where to go on (``nxt`` = epoch, step in epoch) and, when ``final``, the model saved for
    use in ``model/``."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ck = None
        if rank == 0:
            torch.save(model.state_dict(), Path(tmp) / "model.pt")
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, Path(tmp) / "optim.pt")
            (Path(tmp) / CHECKPOINT_STATE).write_text(json.dumps(
                {"epoch": nxt[0], "step_in_epoch": nxt[1], "global_step": step}))
            if final:
                model.save(str(Path(tmp) / "model"))
            ck = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ck)


# --- the stage -----------------------------------------------------------------------------


def run_storage(cfg: TrainRetrieverConfig) -> tuple[str, str]:
    """Ray Train's storage of the run (a local path, a folder all nodes mount or an
    ``s3://``/``gs://`` URI, see ``storage_root``) and the run's name in it."""
    return cfg.storage_root(), f"retriever-{cfg.resume_key()}"


def build_trainer(cfg: TrainRetrieverConfig, examples: list[Example], plan: dict[str, int]
                  ) -> Any:
    """The TorchTrainer of one retriever fine-tune (gloo on CPU, NCCL on GPU); rank 0's
    metrics.jsonl goes into the run's folder of Ray Train's storage."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    rows = [{"idx": i, "query": e.query, "pos": e.pos, "neg": e.neg,
             "teacher_scores": e.teacher_scores} for i, e in enumerate(examples)]
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    root, name = run_storage(cfg)
    fs, storage_path = storage.ray_storage(root)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan,
                           "metrics": storage.join(root, name, "metrics.jsonl")},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
                                               use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_checkpoints_to_keep)),
        # every worker reads every example: it builds each step's global batch itself
        datasets={"train": ray.data.from_items(rows)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def _install_model(checkpoint: Any, out: str) -> None:
    """Copy the saved model's files (the checkpoint's ``model/``) into ``out``: uploaded to
    object storage, or locally each through a temporary name and a rename (replacing older
    ones)."""
    if storage.is_uri(out):
        with checkpoint.as_directory() as ckpt:
            storage.upload(Path(ckpt) / "model", out)
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as ckpt:
        for item in (Path(ckpt) / "model").iterdir():
            dst = Path(out) / item.name
            with atomic_path(dst) as tmp:
                if item.is_dir():
                    shutil.copytree(item, tmp)
                else:
                    shutil.copy2(item, tmp)
                if dst.is_dir():  # a rename does not replace a full folder
                    shutil.rmtree(dst)


def _fit(cfg: TrainRetrieverConfig, examples: list[Example], plan: dict[str, int], out: str,
         work: Path) -> Any:
    """Train on Ray Train; the final model installed in ``out``, rank 0's training log copied
    from Ray Train's storage into the work folder. Returns the Ray Train result."""
    result = build_trainer(cfg, examples, plan).fit()
    if result.error is not None:
        raise result.error
    _install_model(result.checkpoint, out)
    root, name = run_storage(cfg)
    log = storage.join(root, name, "metrics.jsonl")
    if storage.is_file(log):
        atomic_write_text(work / "metrics.jsonl", storage.read_text(log))
    return result


def run_train_retriever(cfg: TrainRetrieverConfig, *, force: bool = False) -> dict[str, Any]:
    """Fine-tune the retriever (Ray must be initialised). Returns the run's stats, with the
    before/after metrics when an eval split is configured."""
    cfg = cfg.resolved()
    out, work = cfg.out.rstrip("/"), cfg.work_path()
    stage = StageDir(storage.parent(out), storage.name(out))
    if not force and stage.is_complete(cfg):
        logger.info("train-retriever: %s already complete (same config); skipping",
                    storage.redact(out))
        return {**storage.read_json(storage.join(out, "stats.json")), "skipped": True}
    if force:
        shutil.rmtree(work, ignore_errors=True)
        if not cfg.storage_path and storage.is_uri(out):
            storage.remove(cfg.storage_root())
    work.mkdir(parents=True, exist_ok=True)
    stage.begin(cfg)
    stats = StageStats("train-retriever")
    local = cfg.localized()  # inputs in object storage: read from their downloads
    examples, rejects = prepare_examples(local, work)
    if rejects:
        storage.write_text(storage.join(out, "rejects.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in rejects))
        stats.rejects.update(r["reason"].split(":")[0] for r in rejects)
    write_examples(work / "train_examples.jsonl", examples)
    plan = make_plan(cfg, len(examples))
    logger.info("train-retriever: %d queries, %d workers x %d = batch %d, %d steps/epoch, "
                "%d steps", len(examples), cfg.num_workers, cfg.batch_size // cfg.num_workers,
                cfg.batch_size, plan["steps_per_epoch"], plan["total_steps"])
    before = None
    if cfg.eval_before and local.eval_folder():
        before = evaluate_model(local, cfg.model, "base")
        logger.info("train-retriever: base model %s", before)

    result = _fit(cfg, examples, plan, out, work)
    final = dict(result.metrics or {})
    finished = final.get("step", 0) >= plan["total_steps"]
    after = evaluate_model(local, out, "trained")
    metrics = {"before": before, "after": after, "split": cfg.eval_split,
               "eval_data": local.eval_folder() and (cfg.eval_data or cfg.data),
               "steps": final.get("step"),
               "total_steps": plan["total_steps"], "finished": finished,
               "train_loss": final.get("loss")}
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    stats.rows_in = len(examples) + len(rejects)
    stats.rows_out = len(examples)
    stats.extra.update({"model": out, "finished": finished, "steps": final.get("step"),
                        "total_steps": plan["total_steps"], "train_loss": final.get("loss"),
                        "before": before, "after": after,
                        "checkpoint": result.checkpoint.path})
    if finished:
        return stage.finish(cfg, stats)
    data = stats.finish()
    storage.write_json(storage.join(out, "stats.json"), data)
    logger.info("train-retriever: stopped after %s of %d steps; rerun to resume",
                final.get("step"), plan["total_steps"])
    return data
