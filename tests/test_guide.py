"""docs/guide.md stays true: every ```bash block runs, in order, in an empty folder.

The guide's config comes from `craft-ray init`; after that command the test makes it small
(the tiny random LM as generator and base model, the coffee dump only, 4 few-shots, k=3) so
the whole walk-through stays bounded. Blocks marked ```text (cluster commands) are not run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
STARTER_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def guide_commands() -> list[str]:
    """The commands of the guide's ```bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_the_guide_has_the_walkthrough_commands():
    cmds = guide_commands()
    assert cmds[0] == "craft-ray init myfaq"
    for stage in ("embed", "retrieve", "generate", "filter", "run", "evaluate"):
        assert any(c.startswith(f"craft-ray {stage} --config myfaq.yaml") for c in cmds), stage
    assert all(c.startswith("craft-ray ") for c in cmds)


def _shrink(config: Path, tiny_lm: Path) -> None:
    """The guide's config, small: tiny LM, one small dump, 4 few-shots, k=3, S=6."""
    text = config.read_text().replace(STARTER_MODEL, str(tiny_lm))
    cfg = yaml.safe_load(text)
    (corpus,) = cfg["embed"]["corpora"]
    corpus["paths"] = [str(Path(corpus["paths"][0]) / "coffee.stackexchange.com")]
    for section in ("retrieve", "generate", "filter"):
        cfg[section]["fewshots"]["limit"] = 4
    cfg["retrieve"]["k"] = 3
    # the tiny LM writes random strings: cap them so every JSON object closes in time
    cfg["generate"].update(max_new_tokens=160, guided_max_string_chars=40)
    cfg["filter"]["datasets"]["sizes"] = {"S": 6}
    cfg["evaluate"]["generation"]["max_new_tokens"] = 24
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.slow
def test_every_command_of_the_guide_runs(tmp_path: Path, tiny_causal_lm: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    outputs = {}
    for cmd in guide_commands():
        argv = [sys.executable, "-m", "craft_ray", *shlex.split(cmd)[1:]]
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-4000:]}"
        assert "Traceback" not in p.stderr, cmd
        outputs[cmd] = p.stdout + p.stderr
        if cmd == "craft-ray init myfaq":
            _shrink(tmp_path / "myfaq.yaml", tiny_causal_lm)
    assert "valid; stages it runs: embed, retrieve, generate, filter, train, evaluate" in \
        outputs["craft-ray config validate myfaq.yaml"]
    assert "retrieve.k: int" in outputs["craft-ray config show retrieve"]
    run = tmp_path / "runs" / "myfaq"
    for stage in ("embed", "retrieve", "generate", "filter", "evaluate"):
        assert (run / stage / "_SUCCESS").is_file(), stage
    assert (run / "train" / "S-seed1234" / "adapter").is_dir()
    assert (run / "report.html").is_file() and (run / "summary.json").is_file()
    results = (run / "evaluate" / "results.json").read_text()
    assert "faq_heldout" in results and "lora-S" in results
