"""Train stage: label masking, config checks, data-parallel equivalence, a real 2-worker fit."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from craft_ray.config import ConfigError
from craft_ray.models.chat import encode_example
from craft_ray.models.tokenizers import load_train_tokenizer
from craft_ray.stages.train.checkpoint import deepspeed_config
from craft_ray.stages.train.config import TrainConfig, TrainStageConfig, check_resources
from craft_ray.stages.train.data import (
    IGNORE_INDEX,
    apply_max_length,
    choose_max_length,
    collate_batch,
)
from craft_ray.stages.train.datasets import split_rows
from craft_ray.stages.train.stage import make_plan
from tests.conftest import shared_data, write_task_dataset

# --- label masking and formatting (no Ray) --------------------------------------------------


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_only_answer_tokens_carry_labels(tiny_lm, template):
    tok = load_train_tokenizer(str(tiny_lm))
    pairs = [("Which base replaces thymine in RNA?\nA. Uracil\nB. Adenine", "A"),
             ("Summarize: the brewer added hops.", "Hops were added to the beer.")]
    encoded = [encode_example(tok, p, c, template=template) for p, c in pairs]
    batch = collate_batch([e[0] for e in encoded], [e[1] for e in encoded], tok.pad_token_id)
    for i, ((_, completion), (ids, plen)) in enumerate(zip(pairs, encoded)):
        labels = batch["labels"][i]
        labelled = labels[labels != IGNORE_INDEX].tolist()
        # exactly the completion's tokens followed by EOS, nothing from prompt or padding
        assert labelled == tok(completion, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id]
        assert tok.decode(labelled, skip_special_tokens=True) == completion
        assert (labels[:plen] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == len(ids)
    # dynamic padding: the batch is as wide as its longest example, not a fixed max_length
    assert batch["input_ids"].shape[1] == max(len(e[0]) for e in encoded)
    prompt_text = tok.decode(encoded[0][0][: encoded[0][1]])
    assert pairs[0][0].splitlines()[0] in prompt_text
    if template == "chat":
        assert prompt_text.endswith("<|assistant|>\n")


def test_full_sequence_loss_labels_everything_but_padding(tiny_lm):
    tok = load_train_tokenizer(str(tiny_lm))
    a = encode_example(tok, "short prompt", "yes", template="plain")
    b = encode_example(tok, "a much longer prompt than the first one", "no", template="plain")
    batch = collate_batch([a[0], b[0]], [a[1], b[1]], tok.pad_token_id, loss_on="full")
    assert batch["labels"][0, : len(a[0])].tolist() == a[0]
    assert (batch["labels"][0, len(a[0]):] == IGNORE_INDEX).all()


def test_max_length_percentile_truncate_and_drop():
    import numpy as np

    cfg = TrainConfig(base_model="m", max_length_percentile=50)
    assert choose_max_length(cfg, np.array([10, 20, 30, 40])) == 25
    assert apply_max_length(list(range(30)), 28, 25, "drop") is None
    ids, plen = apply_max_length(list(range(30)), 28, 25, "truncate")
    assert len(ids) == 25 and plen == 25


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="not a multiple of per_device_batch_size"):
        TrainConfig(base_model="m", batch_size=16, per_device_batch_size=3)
    with pytest.raises(ValueError, match="plain_template must contain"):
        TrainConfig(base_model="m", plain_template="no placeholder")
    with pytest.raises(ValueError, match="fp16: GPU only .*set use_gpu: true"):
        TrainConfig(base_model="m", precision="fp16")
    for block in ({"qlora": {"enabled": True}}, {"precision": "fp16"}):
        cfg = TrainConfig(base_model="m", use_gpu=True, **block)  # valid on a GPU cluster
        with pytest.raises(ConfigError, match="the Ray cluster has no GPUs"):
            check_resources(cfg, gpu_available=False)
    # QLoRA is allowed on CPU workers (bitsandbytes' CPU backend), with a warning
    assert TrainConfig(base_model="m", qlora={"enabled": True}).qlora.enabled
    # DeepSpeed also runs on CPU workers (its CPU accelerator, gloo), in fp32
    ds = TrainConfig(base_model="m", deepspeed={"enabled": True, "stage": 3, "extra": {
        "zero_optimization": {"stage3_param_persistence_threshold": 0}}})
    ds_cfg = deepspeed_config(ds, on_gpu=False)
    assert ds_cfg["zero_optimization"] == {  # extra is merged into, not over, the section
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True,
        "stage3_param_persistence_threshold": 0}
    assert not ds_cfg["bf16"]["enabled"] and not ds_cfg["fp16"]["enabled"]
    assert deepspeed_config(ds, on_gpu=True)["bf16"]["enabled"]
    with pytest.raises(ValueError, match="deepspeed on CPU workers trains in fp32"):
        TrainConfig(base_model="m", precision="bf16", deepspeed={"enabled": True})
    assert TrainConfig(base_model="m", num_workers=2, per_device_batch_size=2).grad_accum == 4


def test_split_and_plan_are_deterministic():
    cfg = TrainConfig(base_model="m", eval_fraction=0.25, max_train_samples=10, seed=1)
    tr, ev = split_rows(40, cfg, has_eval_path=False)
    tr2, ev2 = split_rows(40, cfg.model_copy(update={"seed": 2}), has_eval_path=False)
    assert len(ev) == 10 and len(tr) == 10 and not set(tr) & set(ev)
    assert tr.tolist() == tr2.tolist() and ev.tolist() == ev2.tolist()  # same data per seed
    plan = make_plan(TrainConfig(base_model="m", num_workers=2, per_device_batch_size=2,
                                 batch_size=8, epochs=3), 25)
    # 12 rows/worker -> 6 micro-batches -> 3 steps of 2 accumulated micro-batches
    assert plan == {"rows_per_worker": 12, "micro_batches_per_epoch": 6, "steps_per_epoch": 3,
                    "total_steps": 9, "grad_accum": 2}


# --- data-parallel equivalence of the step function (torch.distributed gloo, no Ray) --------


def _examples(tiny_lm, n):
    from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots
    from craft_ray.tasks.registry import get_task

    task = get_task("bioqa")
    shots = load_fewshots(FewShotConfig(path=str(shared_data("craft-fewshots/bioqa.jsonl")),
                                        limit=n))
    tok = load_train_tokenizer(str(tiny_lm))
    return [encode_example(tok, *task.training_pair(task.fewshot_record(s)), template="chat")
            for s in shots], tok.pad_token_id


def _run_steps(rank, world, per_device, accum, global_batches, base, pad_id, out, init,
               zero=0):
    """Train a few steps on this rank's slice of each global batch; save losses + weights.

    ``zero`` 2 or 3: through a DeepSpeed ZeRO engine (CPU accelerator, gloo) instead of DDP;
    the adapter is then also saved with the library's gather-and-save path and rank 0 keeps
    the engine's logits on a probe batch, to compare with the reloaded adapter.
    """
    import datetime

    import torch
    import torch.distributed as dist

    from craft_ray.stages.train.checkpoint import deepspeed_config
    from craft_ray.stages.train.lora import (
        build_lora_model,
        build_optimizer,
        lora_state_dict,
        save_adapter,
    )
    from craft_ray.stages.train.step import train_step

    torch.set_num_threads(1)
    if world > 1 and not dist.is_initialized():
        # a rank whose peer is gone or stuck raises (into its log) instead of waiting 30 min
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=_DDP_BOUND_S - 30))
    ds = {"enabled": True, "stage": zero,
          # ZeRO-3 keeps parameters under this size whole on every rank; 0: LoRA weights
          # really are partitioned, so saving must gather them
          "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
    cfg = TrainConfig(base_model=base, learning_rate=5e-3, per_device_batch_size=per_device,
                      batch_size=per_device * accum * world, num_workers=world, seed=7,
                      lora={"dropout": 0.0},  # dropout off: the runs must be comparable
                      deepspeed=ds if zero else {})
    model = build_lora_model(cfg, "cpu", False)
    opt, sched = build_optimizer(cfg, model, len(global_batches))
    engine = None
    if zero:
        import deepspeed

        # what a launcher (torchrun, Ray Train's torch backend) sets for DeepSpeed
        os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))

        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt,
                                                     lr_scheduler=sched,
                                                     config=deepspeed_config(cfg, False))
        net = engine
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    losses = []
    for gb in global_batches:
        mine = gb[rank * per_device * accum:(rank + 1) * per_device * accum]
        mbs = [collate_batch([r[0] for r in mine[i:i + per_device]],
                             [r[1] for r in mine[i:i + per_device]], pad_id, loss_on="full")
               for i in range(0, len(mine), per_device)]
        losses.append(train_step(net, mbs, opt, sched, device="cpu", max_grad_norm=1.0,
                                 engine=engine)["loss"])
    lora = [p for p in model.parameters() if p.requires_grad]
    partitioned = any(p.numel() == 0 for p in lora)  # ZeRO-3 shards live outside p.data
    weights = lora_state_dict(model, zero)  # every rank: a collective under ZeRO-3
    probe = collate_batch([global_batches[0][0][0]], [0], pad_id)
    net.eval()
    with torch.no_grad():  # under ZeRO-3 a forward is a collective too
        logits = net(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    if rank == 0:
        if zero:
            save_adapter(Path(out).with_suffix(""), model, weights)
        torch.save({"losses": losses, "lora": weights, "partitioned": partitioned,
                    "logits": logits.detach().cpu(), "probe": probe["input_ids"]}, out)


def rank_log(rank, log_dir):
    """In a spawned rank: stdout/stderr to a file (pytest's capture would drop them on a
    hang) and a stack dump of every thread shortly before the parent gives up."""
    import faulthandler
    import sys

    log = open(Path(log_dir) / f"rank{rank}.log", "w", buffering=1)  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.enable(log)
    faulthandler.dump_traceback_later(_DDP_BOUND_S - 15, exit=False, file=log)
    print(f"rank {rank} pid {os.getpid()} start", flush=True)


def _rank_main(rank, log_dir, init, jobs):
    """Spawned rank: run ``_run_steps`` for each job (``init`` goes in after 7 arguments)."""
    import torch.distributed as dist

    rank_log(rank, log_dir)
    for job in jobs:
        _run_steps(rank, *job[:7], init, *job[7:])
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


def spawn_two_ranks(tmp_path, main, args):
    """Run ``main(rank, str(tmp_path), init_method, *args)`` on 2 spawned ranks (gloo over
    TCP on a free port); fail, with both ranks' logs, if they are not done in _DDP_BOUND_S."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    t0 = time.time()
    ctx = mp.start_processes(main, nprocs=2, join=False, start_method="spawn",
                             args=(str(tmp_path), init, *args))
    while not ctx.join(timeout=5):
        if time.time() - t0 > _DDP_BOUND_S:
            for proc in ctx.processes:
                proc.kill()
            logs = "\n".join(f"--- rank {i} (exit {p.exitcode}):\n"
                             + (tmp_path / f"rank{i}.log").read_text()[-4000:]
                             for i, p in enumerate(ctx.processes))
            pytest.fail(f"the 2-process gloo run was not done in {_DDP_BOUND_S} s:\n{logs}")


def _spawn_two_ranks(tmp_path, jobs):
    """Run ``_run_steps`` jobs on 2 spawned ranks."""
    spawn_two_ranks(tmp_path, _rank_main, (jobs,))


# Normally ~20 s (~60 s with the DeepSpeed pair); generous because a 2-core machine shared
# with other test runs has been seen to stretch a spawn + import of torch/transformers a lot.
_DDP_BOUND_S = 300


def test_two_workers_match_one_worker_with_double_batch(tiny_lm, tmp_path):
    import torch

    examples, pad_id = _examples(tiny_lm, 16)
    # full-sequence loss on examples of different lengths: per-worker label counts differ,
    # which is what a per-worker mean loss would get wrong
    global_batches = [examples[i:i + 4] for i in range(0, 16, 4)]
    ref, acc, ddp = tmp_path / "ref.pt", tmp_path / "acc.pt", tmp_path / "ddp.pt"
    _run_steps(0, 1, 4, 1, global_batches, str(tiny_lm), pad_id, ref, "")
    _run_steps(0, 1, 2, 2, global_batches, str(tiny_lm), pad_id, acc, "")
    _spawn_two_ranks(tmp_path, [(2, 2, 1, global_batches, str(tiny_lm), pad_id, ddp)])
    r, a, d = (torch.load(p, weights_only=True) for p in (ref, acc, ddp))
    assert r["losses"][-1] < r["losses"][0]  # it does learn
    for other in (a, d):
        assert other["losses"] == pytest.approx(r["losses"], rel=1e-4, abs=1e-5)
        for k, v in r["lora"].items():
            torch.testing.assert_close(other["lora"][k], v, rtol=1e-4, atol=1e-5)


def test_deepspeed_zero2_and_zero3_on_two_cpu_ranks(tiny_lm, tmp_path):
    """ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator over gloo) give the same steps as one
    process, and the ZeRO-3 adapter, gathered from its shards, reloads with the same logits."""
    pytest.importorskip("deepspeed")
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    examples, pad_id = _examples(tiny_lm, 8)
    global_batches = [examples[i:i + 4] for i in range(0, 8, 4)]
    ref = tmp_path / "ref.pt"
    _run_steps(0, 1, 4, 1, global_batches, str(tiny_lm), pad_id, ref, "")
    # 2 ranks x micro-batch 1 x 2 accumulated micro-batches = the reference's batch of 4
    _spawn_two_ranks(tmp_path, [(2, 1, 2, global_batches, str(tiny_lm), pad_id,
                                 tmp_path / f"z{z}.pt", z) for z in (2, 3)])
    r = torch.load(ref, weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    for z in (2, 3):
        got = torch.load(tmp_path / f"z{z}.pt", weights_only=True)
        assert got["partitioned"] is (z == 3)  # the ZeRO-3 save really had to gather
        assert got["losses"] == pytest.approx(r["losses"], rel=1e-4, abs=1e-5)
        saved = load_file(tmp_path / f"z{z}" / "adapter_model.safetensors")
        assert set(saved) == set(r["lora"])
        for k, v in r["lora"].items():
            torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-5)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / f"z{z}")).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=got["probe"]).logits
        torch.testing.assert_close(logits, got["logits"], rtol=1e-4, atol=1e-4)
        base = reloaded.unload()


# --- a real Ray Train fit: 2 CPU workers, stopped, resumed, adapter reloaded, merged ---------


def _eval_loss_on_driver(model, tok, rows, task):
    import torch

    from craft_ray.stages.train.step import token_loss_sum

    tot, n = 0.0, 0
    with torch.no_grad():
        for rec in rows:
            ids, plen = encode_example(tok, *task.training_pair(rec), template="chat")
            b = collate_batch([ids], [plen], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            tot += float(token_loss_sum(logits, b["labels"]))
            n += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    return tot / n


def test_two_worker_fit_resumes_and_adapter_reloads(ray_local, tiny_lm, tmp_path):
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from craft_ray.stages.train.lora import merge_adapter
    from craft_ray.stages.train.stage import run_train
    from craft_ray.tasks.registry import get_task

    run_dir = tmp_path / "run"
    hf_dir = write_task_dataset(run_dir, "S", "bioqa",
                                shared_data("craft-fewshots/bioqa.jsonl"))
    base = {"run_dir": str(run_dir), "train": {
        "base_model": str(tiny_lm), "task": "bioqa", "dataset_size": "S", "seed": 3,
        "num_workers": 2, "per_device_batch_size": 2, "batch_size": 8, "epochs": 3,
        "learning_rate": 2e-3, "eval_fraction": 0.25, "stop_after_steps": 2}}
    stopped = run_train(TrainStageConfig.model_validate(base))
    trial = run_dir / "train" / "S-seed3"
    assert stopped["finished"] is False and stopped["steps"] == 2
    assert not (trial / "_SUCCESS").exists()
    first_lines = (trial / "metrics.jsonl").read_text().splitlines()
    assert json.loads(first_lines[-1])["final"] is True  # the run's summary line
    first_lines = first_lines[:-1]
    assert [json.loads(x)["step"] for x in first_lines] == [1, 2]

    base["train"].pop("stop_after_steps")
    stats = run_train(TrainStageConfig.model_validate(base))
    assert stats["finished"] is True and (trial / "_SUCCESS").is_file()
    # 32 rows - 8 eval = 24 -> 12 per worker -> 6 micro-batches -> 3 steps/epoch x 3
    assert stats["total_steps"] == 9 and stats["steps"] == 9
    rows = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if not r.get("final")]
    assert steps == list(range(1, 10))
    # resumed, not restarted: the lines of steps 1-2 are the ones the first run wrote
    assert (trial / "metrics.jsonl").read_text().splitlines()[:2] == first_lines
    step_rows = [r for r in rows if not r.get("final")]
    assert all(r["tokens_per_s"] > 0 for r in step_rows)
    lrs = [r["lr"] for r in step_rows]  # warm-up to the peak, then linear decay to 0
    assert max(lrs) == pytest.approx(2e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    losses = [r["loss"] for r in rows if not r.get("final")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    lengths = json.loads((trial / "length_stats.json").read_text())
    assert lengths["lengths"]["count"] == 24 and lengths["lengths"]["p50"] > 100

    # the saved adapter reproduces the workers' final model: same eval loss on the driver
    adapter = Path(stats["adapter"])
    assert (adapter / "adapter_config.json").is_file()
    task = get_task("bioqa")
    hf = datasets.load_from_disk(str(hf_dir))
    cfg = TrainStageConfig.model_validate(base).train
    _, eval_idx = split_rows(len(hf), cfg, has_eval_path=False)
    eval_rows = [hf[int(i)] for i in eval_idx]
    tok = load_train_tokenizer(str(tiny_lm))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm)),
                                         str(adapter)).eval()
    assert _eval_loss_on_driver(reloaded, tok, eval_rows, task) == pytest.approx(
        stats["eval_loss"], rel=1e-4)
    plain_base = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    assert not math.isclose(_eval_loss_on_driver(plain_base, tok, eval_rows, task),
                            stats["eval_loss"], rel_tol=1e-3)

    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    probe = torch.tensor([tok("Which base replaces thymine?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits,
                                   reloaded(input_ids=probe).logits, rtol=1e-4, atol=1e-4)

    # a finished trial with the same config is not trained again
    mtime = os.path.getmtime(adapter / "adapter_model.safetensors")
    again = run_train(TrainStageConfig.model_validate(base))
    assert again["skipped"] is True
    assert os.path.getmtime(adapter / "adapter_model.safetensors") == mtime


# --- a killed `craft-ray train` resumes from its last checkpoint ---------------------------


def test_sigkilled_train_command_resumes_from_its_checkpoint(tiny_lm, tmp_path):
    """`craft-ray train` in its own process group (with its own embedded Ray) is SIGKILLed
    once Ray Train has registered a checkpoint; the same command again continues from it."""
    import signal
    import subprocess
    import sys

    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    write_task_dataset(run_dir, "S", "bioqa", shared_data("craft-fewshots/bioqa.jsonl"),
                       limit=16)
    cfg_file = tmp_path / "train.yaml"
    epochs = 6  # 16 rows x 6 epochs = 96 steps: still running when the kill lands
    cfg_file.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "ray": {"num_cpus": 2},
        "train": {"base_model": str(tiny_lm), "task": "bioqa", "seed": 5, "num_workers": 1,
                  "per_device_batch_size": 1, "batch_size": 1, "epochs": epochs,
                  # truncated to 128 tokens the answer may be cut off: learn the whole text
                  "max_length": 128, "overlong": "truncate", "loss_on": "full",
                  "lora": {"r": 4}, "checkpoint_every_steps": 4, "report_every_steps": 4}}))
    total = 16 * epochs
    trial = run_dir / "train" / "S-seed5"
    cmd = [sys.executable, "-m", "craft_ray", "train", "--config", str(cfg_file)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, start_new_session=True, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def registered() -> list[int]:
        """Steps of the checkpoints Ray Train has registered (what a rerun resumes from; a
        checkpoint folder alone is not enough)."""
        for snap in trial.glob("ray/*/checkpoint_manager_snapshot.json"):
            try:
                data = json.loads(snap.read_text())
            except (OSError, json.JSONDecodeError):  # being rewritten
                return []
            return [r["metrics"]["step"] for r in data["checkpoint_results"]]
        return []

    proc = start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not registered():
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert not (trial / "_SUCCESS").exists()
    ckpt_steps = registered()
    assert ckpt_steps and all(s % 4 == 0 for s in ckpt_steps), ckpt_steps
    killed_lines = (trial / "metrics.jsonl").read_text().splitlines()
    assert max(ckpt_steps) <= len(killed_lines) < total  # killed part-way

    proc = start()
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-5000:]
    stats = json.loads((trial / "stats.json").read_text())
    assert stats["finished"] is True and stats["steps"] == stats["total_steps"] == total
    lines = (trial / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if not json.loads(x).get("final")]
    assert steps == list(range(1, total + 1))
    assert all(json.loads(x)["loss"] > 0 for x in lines)  # it trained on real labels
    # continued, not restarted: the metrics lines up to the checkpoint it resumed from are
    # the killed run's own (same wall-clock stamps); a restart from step 0 rewrites them all
    kept = next((i for i, (a, b) in enumerate(zip(lines, killed_lines)) if a != b),
                len(killed_lines))
    # ... from the newest checkpoint Ray Train had (registered, or reported and pending in
    # its snapshot): at least the one registered before the kill, and a real checkpoint
    on_disk = {json.loads(p.read_text())["global_step"]
               for p in trial.glob("ray/*/checkpoint_*/train_state.json")}
    assert kept >= max(ckpt_steps) and kept % 4 == 0, (kept, ckpt_steps)
    assert kept in on_disk or kept < min(on_disk), (kept, on_disk)  # (old ones are pruned)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm)),
                                      stats["adapter"])
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CRAFT_RAY_SLOW_TESTS"),
                    reason="slow (a DeepSpeed Ray Train fit); set CRAFT_RAY_SLOW_TESTS=1")
def test_deepspeed_zero3_fit_on_ray_train(ray_local, tiny_lm, tmp_path):
    """`run_train` with DeepSpeed ZeRO-3 on 2 CPU Ray Train workers, stopped after one step
    and resumed: the Ray Train checkpoint holds both ranks' ZeRO shards, the resumed run's
    losses are those of an uninterrupted one, and the adapter saved from the gathered shards
    gives the workers' eval loss on the driver. (~3 min on 2 cores.)"""
    pytest.importorskip("deepspeed")
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from craft_ray.stages.train.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG
    from craft_ray.stages.train.stage import run_train
    from craft_ray.tasks.registry import get_task

    def fit(run_dir, **over):
        write_task_dataset(run_dir, "S", "bioqa", shared_data("craft-fewshots/bioqa.jsonl"),
                           limit=16)
        cfg = TrainStageConfig.model_validate({"run_dir": str(run_dir), "train": {
            "base_model": str(tiny_lm), "task": "bioqa", "seed": 3, "num_workers": 2,
            "per_device_batch_size": 2, "batch_size": 4, "epochs": 1, "learning_rate": 2e-3,
            "eval_fraction": 0.25, "lora": {"r": 4, "dropout": 0.0}, **over,
            "deepspeed": {"enabled": True, "stage": 3, "extra": {
                "zero_optimization": {"stage3_param_persistence_threshold": 0}}}}})
        return cfg, run_train(cfg)

    def losses(run_dir):
        rows = (run_dir / "train" / "S-seed3" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in rows if not json.loads(x).get("final")]

    _, stopped = fit(tmp_path / "run", stop_after_steps=1)
    assert stopped["finished"] is False and stopped["steps"] == 1
    ckpts = sorted(p for p in (tmp_path / "run" / "train" / "S-seed3").glob("ray/*/checkpoint_*")
                   if p.is_dir())  # (not checkpoint_manager_snapshot.json)
    assert ckpts, "no Ray Train checkpoint"
    state = ckpts[-1] / DEEPSPEED_DIR / DEEPSPEED_TAG
    assert {p.name for p in state.glob("zero_pp_rank_*optim_states.pt")} == {
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}  # both ranks' shards
    assert (ckpts[-1] / "adapter" / "adapter_model.safetensors").is_file()
    cfg, stats = fit(tmp_path / "run")
    assert stats["finished"] is True and stats["steps"] == 3 and stats["eval_loss"] > 0
    _, straight = fit(tmp_path / "straight")
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)
    assert stats["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-4)

    hf = datasets.load_from_disk(str(tmp_path / "run" / "filter" / "datasets" / "S" / "hf"))
    _, eval_idx = split_rows(len(hf), cfg.train, has_eval_path=False)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm)),
                                         stats["adapter"]).eval()
    got = _eval_loss_on_driver(reloaded, load_train_tokenizer(str(tiny_lm)),
                               [hf[int(i)] for i in eval_idx], get_task("bioqa"))
    assert got == pytest.approx(stats["eval_loss"], rel=1e-4)
