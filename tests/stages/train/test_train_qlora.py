"""QLoRA on CPU: a 4-bit NF4 (double-quantised) tiny Llama trains LoRA with the library's
model builder and step function through bitsandbytes' CPU backend; the adapter reloads on a
4-bit base with the same logits."""

from __future__ import annotations

import logging
import math
import os

import pytest

from tests.conftest import shared_data, write_task_dataset
from tests.stages.train.test_train import _examples


def _cpu_4bit_reason() -> str | None:
    """None when bitsandbytes can quantise to NF4 on this CPU, else why not."""
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); pip install 'craft-ray[qlora]'"
    try:
        w = torch.randn(64, 64)
        q, st = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        if not torch.isfinite(bnbf.dequantize_4bit(q, st)).all():
            return "bitsandbytes' CPU NF4 round trip gives non-finite values"
    except Exception as exc:  # an old bitsandbytes without the CPU backend raises here
        return f"this bitsandbytes has no CPU 4-bit backend: {exc!r}"
    return None


_REASON = _cpu_4bit_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def _qlora_cfg(base, **over):
    from craft_ray.stages.train.config import TrainConfig

    return TrainConfig(base_model=base, learning_rate=5e-3, per_device_batch_size=2,
                       batch_size=4, seed=7, lora={"r": 8, "dropout": 0.0},
                       qlora={"enabled": True}, **over)


def test_qlora_trains_on_cpu_and_adapter_reloads_on_4bit_base(tiny_lm, tmp_path, caplog):
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from craft_ray.stages.train.data import collate_batch
    from craft_ray.stages.train.lora import (
        build_lora_model,
        build_optimizer,
        lora_state_dict,
        save_adapter,
    )
    from craft_ray.stages.train.step import train_step

    cfg = _qlora_cfg(str(tiny_lm))
    assert not cfg.use_gpu  # a CPU-worker config is valid
    with caplog.at_level(logging.WARNING, logger="craft_ray.stages.train"):
        model = build_lora_model(cfg, torch.device("cpu"), on_gpu=False)
    assert any("slow" in r.message for r in caplog.records)  # CPU QLoRA is flagged
    # every projection of the base is a bitsandbytes 4-bit NF4 layer, double-quantised
    lin4 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(lin4) == 2 * 7, sorted(lin4)  # 2 layers x q/k/v/o/gate/up/down
    for m in lin4.values():
        assert m.weight.quant_type == "nf4" and m.weight.quant_state.nested
        assert m.weight.dtype == torch.uint8 and not m.weight.requires_grad
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    examples, pad_id = _examples(tiny_lm, 8)
    batches = [examples[i:i + 4] for i in range(0, 8, 4)] * 3  # 6 steps, 2 batches seen 3x
    opt, sched = build_optimizer(cfg, model, len(batches))
    model.train()
    losses = []
    for gb in batches:
        mbs = [collate_batch([r[0] for r in gb[i:i + 2]], [r[1] for r in gb[i:i + 2]], pad_id,
                             loss_on="completion") for i in (0, 2)]
        losses.append(train_step(model, mbs, opt, sched, device="cpu",
                                 max_grad_norm=cfg.max_grad_norm)["loss"])
    assert all(math.isfinite(x) for x in losses), losses
    # the same two batches: the third pass has lower loss than the first
    assert losses[4] + losses[5] < losses[0] + losses[1] - 0.1, losses

    out = tmp_path / "adapter"
    save_adapter(out, model, lora_state_dict(model))
    probe = collate_batch([examples[0][0]], [0], pad_id)["input_ids"]
    model.eval()
    with torch.no_grad():
        want = model(input_ids=probe).logits
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm), quantization_config=quant,
                                                device_map={"": "cpu"}, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = reloaded(input_ids=probe).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # and the adapter matters: without it the logits differ
        with reloaded.disable_adapter():
            assert (reloaded(input_ids=probe).logits - want).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CRAFT_RAY_SLOW_TESTS"),
                    reason="slow (a Ray Train fit); set CRAFT_RAY_SLOW_TESTS=1")
def test_qlora_fit_on_ray_train_cpu_worker(ray_local, tiny_lm, tmp_path):
    """`run_train` with qlora on one CPU Ray Train worker finishes and its adapter loads on a
    4-bit base."""
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from craft_ray.stages.train.config import TrainStageConfig
    from craft_ray.stages.train.stage import run_train

    run_dir = tmp_path / "run"
    write_task_dataset(run_dir, "S", "bioqa", shared_data("craft-fewshots/bioqa.jsonl"),
                       limit=16)
    cfg = TrainStageConfig.model_validate({"run_dir": str(run_dir), "train": {
        "base_model": str(tiny_lm), "task": "bioqa", "seed": 3, "per_device_batch_size": 2,
        "batch_size": 4, "epochs": 2, "learning_rate": 5e-3, "eval_fraction": 0.25,
        "lora": {"r": 8}, "qlora": {"enabled": True}}})
    stats = run_train(cfg)
    assert stats["finished"] is True and stats["steps"] == 6
    assert math.isfinite(stats["train_loss"]) and math.isfinite(stats["eval_loss"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm), quantization_config=quant,
                                                device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, stats["adapter"])
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
