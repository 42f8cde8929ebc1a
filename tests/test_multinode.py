"""Multi-node Ray on this machine (``ray.cluster_utils.Cluster``, as Ray's own tests do).

A head with 0 CPUs and 1-CPU worker nodes, all local processes; the run directory is a local
path every "node" sees, except for the job below, whose run directory is an S3 bucket (moto).
The module's cluster starts with two workers (the shape where ``embed.concurrency=2`` used to
hang forever), then a third joins. Faults injected:
``cluster.remove_node(..., allow_graceful=False)`` (SIGKILL of every process of the node) of
the node running an embedding actor (once part files exist), a generation actor (once it is
up) and a Ray Train worker (once a checkpoint is registered; a replacement node then joins).
Each stage must finish with every document / sample once (train: every step once, resumed
from its checkpoint). Also: ``ray job submit`` of the demo pipeline (tiny LM) to the cluster
with its run directory and inputs on S3.

Opt-in (10 tests, 638 s on 2 loaded cores): ``CRAFT_RAY_MULTINODE_TESTS=1``; run the file in
its own pytest process (it connects this process to its own cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from craft_ray.config import load_config
from tests.conftest import s3_environment, write_task_dataset
from tests.test_jobs import _free_ports

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
BEIR_DIR = ROOT / "tests" / "fixtures" / "retrieval" / "coffee_beir"
STACKEXCHANGE_DOCS = 885  # bundled beer + coffee posts the demo config embeds

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(os.environ.get("CRAFT_RAY_MULTINODE_TESTS") != "1",
                       reason="multi-node cluster tests: set CRAFT_RAY_MULTINODE_TESTS=1"),
]


@pytest.fixture(scope="module")
def cluster(s3_server: dict[str, str]) -> Iterator[Any]:
    """Head (0 CPUs) + two 1-CPU worker nodes; this process is the driver. Every node starts
    with the moto S3 server's endpoint and dummy credentials in its environment, as a cloud
    node gets its credentials from its environment or identity (never from a runtime_env)."""
    import ray

    if ray.is_initialized():
        pytest.skip("another Ray is connected in this process; run this file on its own")
    with s3_environment(s3_server):
        yield from _cluster()


def _cluster() -> Iterator[Any]:
    """Start the cluster and connect this process (see :func:`cluster`)."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # the nodes' processes (a job's `python` included) find this environment's python first
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    dash, agent, metrics = _free_ports(3)  # the defaults clash with other Rays here
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dash, "dashboard_agent_listen_port": agent,
        "metrics_export_port": metrics})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture()
def three_workers(cluster: Any) -> Any:
    """The module's cluster topped up to three 1-CPU worker nodes (a node-loss test leaves
    two behind)."""
    while len(cluster.worker_nodes) < 3:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory shared by the module's stages (embed -> retrieve -> generate)."""
    return tmp_path_factory.mktemp("multinode") / "run"

# --- probes -------------------------------------------------------------------------------


class ActorWatch(threading.Thread):
    """Watches the Ray worker processes while a stage runs: the node of every process whose
    title (``ray::MapWorker(MapBatches(Embedder))``, ``ray::RayTrainWorker...``, a task's
    ``ray::MapBatches(read_shards)``) contains one of ``patterns``. Every "node" is local, so
    /proc tells the title, and a worker's parent is its node's raylet.

    With ``when`` given, once ``when()`` is true it SIGKILLs the worker node of one such
    process (never one hosting a process titled ``spare``); with ``replace``, :meth:`tick`
    (called by :func:`bounded` on the main thread: a node registers signal handlers) then
    adds a fresh 1-CPU node, as a lost spot node is replaced.
    """

    def __init__(self, cluster: Any, *patterns: str, when: Callable[[], bool] | None = None,
                 spare: str | None = None, replace: bool = False) -> None:
        super().__init__(daemon=True)
        self.cluster, self.patterns, self.when, self.spare, self.replace = (
            cluster, patterns, when, spare, replace)
        self.replaced = False
        self.placements: set[tuple[int, str]] = set()  # (pid, node id) of matching workers
        self.removed: str | None = None
        self.removed_at: float | None = None
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def _scan(self) -> dict[int, tuple[str, str]]:
        """Ray workers of the cluster's nodes: pid -> (node id, process title)."""
        raylets = {n.all_processes["raylet"][0].process.pid: n.node_id
                   for n in self.cluster.list_all_nodes()}
        out = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                title = (proc / "cmdline").read_bytes().decode(errors="replace")
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if title.startswith("ray::") and ppid in raylets:
                out[int(proc.name)] = (raylets[ppid], title)
        return out

    def _mine(self, title: str) -> bool:
        return any(p in title for p in self.patterns)

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                seen = self._scan()
                self.placements |= {(pid, node) for pid, (node, title) in seen.items()
                                    if self._mine(title)}
                if self.when is not None and self.removed is None and self.when():
                    self._remove(seen)
                time.sleep(0.2)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def _remove(self, seen: dict[int, tuple[str, str]]) -> None:
        mine = {n for n, t in seen.values() if self._mine(t)}
        busy = {n for n, t in seen.values() if self.spare and self.spare in t}
        targets = [w for w in self.cluster.worker_nodes if w.node_id in mine - busy]
        if not targets:
            return
        self.removed = targets[0].node_id
        self.cluster.remove_node(targets[0], allow_graceful=False)  # SIGKILL, as a spot loss
        self.removed_at = time.time()

    def tick(self) -> None:
        """Main thread, while the stage runs: add the replacement node once one was lost."""
        if self.replace and self.removed is not None and not self.replaced:
            self.replaced = True
            self.cluster.add_node(num_cpus=1)

    @property
    def nodes(self) -> set[str]:
        """Every node a matching process ran on."""
        return {n for _, n in self.placements}

    @property
    def processes(self) -> set[int]:
        """Every matching process seen (a restarted actor is a new process)."""
        return {pid for pid, _ in self.placements}

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error


def bounded(fn: Callable[[], Any], timeout_s: float,
            tick: Callable[[], None] | None = None) -> Any:
    """``fn()`` in a thread; fail the test (instead of hanging CI) past ``timeout_s``.
    ``tick()`` runs on the main thread every half second meanwhile."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    deadline = time.time() + timeout_s
    while t.is_alive() and time.time() < deadline:
        t.join(0.5)
        if tick is not None:
            tick()
    if t.is_alive():
        pytest.fail(f"the stage did not finish within {timeout_s:.0f} s (a resource hang?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _cli(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "craft_ray", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def _store_ids(store: Path) -> list[str]:
    import pyarrow.parquet as pq

    files = sorted((store / "data").rglob("*.parquet"))
    return [d for f in files for d in pq.read_table(f, columns=["doc_id"]).column(0).to_pylist()]

# --- the hang of issue 16, as a user typed it ---------------------------------------------


def test_embed_concurrency_2_on_two_1cpu_nodes_finishes(cluster, run_dir):
    """``craft-ray embed --config configs/demo.yaml --address ... --set embed.concurrency=2``
    hung for good here (two 1-CPU embedders, readers starved); now the actors are sized to
    0.5 CPU and the stage finishes, its work (readers, embedders) on both worker nodes."""
    watch = ActorWatch(cluster, "Embedder", "read_shards")
    watch.start()
    proc = _cli(["embed", "--config", str(DEMO), "--address", cluster.address,
                 "--set", f"run_dir={run_dir}", "--set", "embed.concurrency=2",
                 "--set", "embed.batch_size=256", "--json"], timeout_s=420)
    watch.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["rows_out"] == STACKEXCHANGE_DOCS
    ids = _store_ids(run_dir / "embed" / "store")
    assert len(ids) == len(set(ids)) == STACKEXCHANGE_DOCS
    assert len(watch.nodes) == 2, watch.placements  # readers and embedders on both nodes


def test_embed_pool_that_cannot_fit_fails_before_work(cluster, tmp_path):
    proc = _cli(["embed", "--config", str(DEMO), "--address", cluster.address,
                 "--set", f"run_dir={tmp_path / 'run'}", "--set", "embed.concurrency=2",
                 "--set", "embed.num_cpus=1"], timeout_s=180)
    assert proc.returncode == 2, proc.stderr[-3000:]  # a user error, not a crash
    err = " ".join(proc.stderr.split())
    assert "2 actors x 1 CPU (embed.concurrency x embed.num_cpus)" in err, err[-2000:]
    assert "2 CPUs on 3 nodes (CPUs per node: 1, 1, 0; 0 GPUs)" in err
    assert not (tmp_path / "run" / "embed").exists()  # nothing begun

# --- stages spread over three worker nodes --------------------------------------------------


def test_retrieve_spreads_its_actors(three_workers, run_dir):
    from craft_ray.stages.retrieve import RetrieveStageConfig, run_retrieve

    cfg = load_config(RetrieveStageConfig, DEMO, [
        f"run_dir={run_dir}", "retrieve.concurrency=2", "retrieve.k=24"], absolute_paths=True)
    watch = ActorWatch(three_workers, "SimilarityScorer")
    watch.start()
    stats = bounded(lambda: run_retrieve(cfg), 300)
    watch.stop()
    assert stats["rows_out"] == 24
    assert len(watch.nodes) == 2, watch.nodes


def test_eval_retrieval_with_work_on_s3_spreads_its_embedders(three_workers, s3_bucket):
    """eval-retrieval with its BEIR folder and work folder in the bucket: the converted
    corpus is uploaded, two embedding actors on two nodes read it and write the store to the
    bucket, the similarity actors read the store from there (train-retriever's mining and
    held-out evaluation run this way when its OUT is a URI)."""
    from craft_ray.retrieval.evaluation import RetrievalEvalConfig, run_eval_retrieval
    from craft_ray.runtime import storage
    from craft_ray.store.vectors import read_info

    storage.upload(BEIR_DIR, f"{s3_bucket}/beir")
    cfg = RetrievalEvalConfig(data=f"{s3_bucket}/beir", run_dir=f"{s3_bucket}/work",
                              concurrency=2, embed_batch_size=32)
    watch = ActorWatch(three_workers, "Embedder")
    watch.start()
    result = bounded(lambda: run_eval_retrieval(cfg), 300)
    watch.stop()
    assert result["embedded"] == 120 and result["queries"] == 40
    assert result["metrics"]["recall@100"] == 1.0 and result["metrics"]["ndcg@10"] > 0.3
    assert read_info(f"{s3_bucket}/work/embed/store").num_rows == 120
    assert len(watch.nodes) == 2, watch.nodes


def _generate_cfg(run_dir: Path, model: Path, sets: list[str]) -> Any:
    from craft_ray.stages.generate import GenerateStageConfig

    return load_config(GenerateStageConfig, DEMO, [
        f"run_dir={run_dir}", f"generate.model={model}", "generate.max_new_tokens=48",
        "generate.max_prompt_tokens=3000",  # the tiny LM's byte-level tokens are many
        "generate.hf.batch_size=2", "generate.hf.generate_batch_size=2", *sets],
        absolute_paths=True)


def _check_generations(out: Path, stats: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    raw = pq.read_table(out / "raw.parquet").column("sample_id").to_pylist()
    drops = pq.read_table(out / "prompt_drops.parquet").num_rows
    assert len(raw) == len(set(raw))  # no sample twice
    assert stats["prompts"] == 24 == len(raw) + drops  # none lost


def test_generate_hf_spreads_its_actors(three_workers, run_dir, tiny_causal_lm):
    from craft_ray.stages.generate import run_generate

    cfg = _generate_cfg(run_dir, tiny_causal_lm, ["generate.hf.concurrency=2"])
    watch = ActorWatch(three_workers, "HFGenerator")
    watch.start()
    stats = bounded(lambda: run_generate(cfg, force=True), 420)
    watch.stop()
    _check_generations(run_dir / "generate", stats)
    assert len(watch.nodes) == 2, watch.nodes


def _train_cfg(run_dir: str | Path, model: Path, **extra: Any) -> Any:
    from craft_ray.stages.train import TrainStageConfig

    return TrainStageConfig.model_validate({"run_dir": str(run_dir), "train": {
        "base_model": str(model), "task": "medqa", "dataset_size": "S", "seed": 5,
        "num_workers": 2, "per_device_batch_size": 1, "batch_size": 2, "epochs": 1,
        "learning_rate": 2e-3, "eval_fraction": 0.25, "torch_threads": 1, **extra}})


def test_train_two_workers_on_two_nodes(three_workers, tmp_path, tiny_causal_lm):
    from craft_ray.stages.train import run_train

    run = tmp_path / "run"
    write_task_dataset(run, "S", "medqa", ROOT / "data" / "fewshots" / "medqa.jsonl")
    watch = ActorWatch(three_workers, "RayTrainWorker")
    watch.start()
    stats = bounded(lambda: run_train(_train_cfg(run, tiny_causal_lm)), 420)
    watch.stop()
    assert stats["finished"] and stats["steps"] == stats["total_steps"] == 12
    assert len(watch.nodes) == 2, watch.nodes


def test_sweep_two_trials_on_two_nodes_with_run_dir_on_s3(three_workers, s3_bucket, tmp_path,
                                                        tiny_causal_lm):
    """A 2-trial sweep spread over two nodes, its run directory (dataset in, adapters,
    checkpoints, metrics, results out) in the bucket."""
    from craft_ray.runtime import storage
    from craft_ray.stages.sweep import SweepStageConfig, run_sweep

    write_task_dataset(tmp_path / "run", "S", "medqa",
                       ROOT / "data" / "fewshots" / "medqa.jsonl", limit=12)
    run = f"{s3_bucket}/run"
    storage.upload(tmp_path / "run", run)
    cfg = SweepStageConfig.model_validate({
        "run_dir": run,
        # 0.75 CPU per worker: two never share a 1-CPU node, so the trials spread
        "train": {"base_model": str(tiny_causal_lm), "task": "medqa", "num_workers": 1,
                  "cpus_per_worker": 0.75, "torch_threads": 1, "per_device_batch_size": 4,
                  "batch_size": 4, "epochs": 1, "learning_rate": 2e-3,
                  "eval_fraction": 0.25},
        "sweep": {"seeds": [1, 2], "sizes": ["S"], "max_concurrent_trials": 2,
                  "verbose": 0}})
    watch = ActorWatch(three_workers, "RayTrainWorker")
    watch.start()
    stats = bounded(lambda: run_sweep(cfg), 420)
    watch.stop()
    assert stats["rows_out"] == 2 and stats["trials_run"] == 2
    assert len(watch.nodes) == 2, watch.nodes
    rows = [json.loads(x) for x in storage.read_text(f"{run}/sweep/results.jsonl").splitlines()]
    assert sorted(r["seed"] for r in rows) == [1, 2]
    files = storage.list_files(f"{run}/train", recursive=True)
    for seed in (1, 2):  # each trial's adapter, training log and marker are in the bucket
        for name in ("adapter/adapter_config.json", "metrics.jsonl", "_SUCCESS"):
            assert f"{run}/train/S-seed{seed}/{name}" in files, files
    assert storage.is_file(f"{run}/sweep/_SUCCESS")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["filter"]  # nothing local

# --- node loss while a stage runs ------------------------------------------------------------


def test_node_lost_mid_embed_every_document_once(three_workers, run_dir, tmp_path):
    """The embedder's node is removed once part files exist; its actor restarts on a
    surviving node (one CPU there, the readers on the third) and the stage finishes."""
    from craft_ray.stages.embed import EmbedStageConfig, run_embed

    run = tmp_path / "run"
    cfg = load_config(EmbedStageConfig, DEMO, [
        f"run_dir={run}", "embed.batch_size=64", "embed.export_h5=false"],
        absolute_paths=True)
    parts = run / "embed" / "store" / "_parts"
    watch = ActorWatch(three_workers, "Embedder",
                       when=lambda: parts.is_dir() and any(parts.rglob("*.parquet")))
    watch.start()
    t0 = time.time()
    stats = bounded(lambda: run_embed(cfg), 600)
    t1 = time.time()
    watch.stop()
    assert watch.removed is not None and t0 < watch.removed_at < t1, "no node was removed"
    assert len(watch.nodes) == 2  # the embedder ran on the lost node and another
    ids = _store_ids(run / "embed" / "store")
    assert stats["rows_out"] == len(ids) == len(set(ids)) == STACKEXCHANGE_DOCS
    assert set(ids) == set(_store_ids(run_dir / "embed" / "store"))  # the undisturbed run's


def test_node_lost_mid_generate_every_sample_once(three_workers, run_dir, tiny_causal_lm):
    from craft_ray.stages.generate import run_generate

    cfg = _generate_cfg(run_dir, tiny_causal_lm, ["generate.hf.batch_size=1",
                                                  "generate.hf.generate_batch_size=1",
                                                  "generate.max_new_tokens=96"])
    watch = ActorWatch(three_workers, "HFGenerator", when=lambda: True)
    watch.start()
    t0 = time.time()
    stats = bounded(lambda: run_generate(cfg, force=True), 600)
    t1 = time.time()
    watch.stop()
    assert watch.removed is not None and t0 < watch.removed_at < t1, "no node was removed"
    assert len(watch.nodes) == 2, watch.nodes  # restarted on another node
    _check_generations(run_dir / "generate", stats)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_node_lost_mid_train_resumes_from_checkpoint(three_workers, tmp_path, tiny_causal_lm,
                                                     where, request):
    """A worker's node is removed after the first checkpoint; a replacement node joins (as
    a spot node is replaced); Ray Train restarts the group from the last checkpoint. With the
    run directory on local disk (one machine: every node sees it) and in an S3 bucket (the
    checkpoints and rank 0's metrics in the bucket, restored from there)."""
    from craft_ray.runtime import storage
    from craft_ray.stages.train import run_train

    write_task_dataset(tmp_path / "run", "S", "medqa", ROOT / "data" / "fewshots" / "medqa.jsonl")
    run = str(tmp_path / "run")
    if where == "s3":
        run = f"{request.getfixturevalue('s3_bucket')}/run"
        storage.upload(tmp_path / "run", run)
    trial = storage.join(run, "train", "S-seed5")
    metrics = storage.join(trial, "metrics.jsonl")
    seen: dict[str, list[str]] = {}

    def checkpointed() -> bool:
        # A checkpoint counts once the controller registered it (its snapshot names it): one
        # only reported when the group dies is lost, and the restart begins from scratch.
        snaps = [f for f in storage.list_files(storage.join(trial, "ray"), recursive=True)
                 if f.endswith("checkpoint_manager_snapshot.json")]
        if not snaps or "checkpoint_" not in storage.read_text(snaps[0]) or \
                not storage.is_file(metrics):
            return False
        seen["lines"] = storage.read_text(metrics).splitlines()
        return len(seen["lines"]) >= 2

    watch = ActorWatch(three_workers, "RayTrainWorker", when=checkpointed,
                       spare="TrainController", replace=True)
    watch.start()
    cfg = _train_cfg(run, tiny_causal_lm, epochs=2, checkpoint_every_steps=2, max_failures=2)
    stats = bounded(lambda: run_train(cfg), 600, tick=watch.tick)
    watch.stop()
    assert watch.removed is not None and watch.replaced, "no node was removed and replaced"
    assert stats["finished"] and stats["steps"] == stats["total_steps"] == 24
    rows = [json.loads(x) for x in storage.read_text(metrics).splitlines()]
    assert [r["step"] for r in rows if not r.get("final")] == list(range(1, 25))
    # resumed, not restarted: the first two steps' lines are the first attempt's
    assert storage.read_text(metrics).splitlines()[:2] == seen["lines"][:2]
    assert len(watch.processes) > 2  # a second worker group was started

# --- a small pipeline submitted as a Ray job --------------------------------------------------


def test_job_submit_demo_with_run_dir_on_s3(three_workers, s3_bucket, tiny_causal_lm):
    """``ray job submit`` of the demo pipeline (``jobs/run.py --config configs/demo.yaml``) to
    the multi-node cluster's dashboard with its run directory, corpus, few-shots and eval sets
    in an S3 bucket (moto), two embedding actors, the tiny random LM in place of SmolLM2: the
    job succeeds, every stage's outputs are in the bucket, the embedding ran on two nodes.

    The code is on every "node" already (their PYTHONPATH, as in a pre-built image), not
    sent with ``--working-dir``: the simulated nodes share one session folder, and a node's
    runtime-env agent deleted the package under the job's driver (its cwd) mid-run."""
    from tests.test_s3 import check_demo_in_bucket, demo_in_bucket

    sets = [*demo_in_bucket(s3_bucket, str(tiny_causal_lm)), "embed.concurrency=2",
            f"filter.decontamination.eval_sets.0.path={s3_bucket}/eval/medqa.jsonl"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    watch = ActorWatch(three_workers, "Embedder", "read_shards")
    watch.start()
    r = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
         f"http://{three_workers.webui_url}", "--", "python", str(ROOT / "jobs" / "run.py"),
         "--verbose", "--config", str(DEMO), *[a for x in sets for a in ("--set", x)]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    watch.stop()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in r.stdout + r.stderr
    check_demo_in_bucket(f"{s3_bucket}/run")
    assert len(watch.nodes) >= 2, watch.nodes
