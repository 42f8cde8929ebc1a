"""Backends: hf (direct, guided per-row grammars), openai (a real local HTTP server serving
the tiny model, with server errors and timeouts), vllm (config on CPU; GPU test marked)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.backends import (
    ERR_ENGINE,
    ERR_REJECTED,
    ERR_SERVER,
    ERR_TIMEOUT,
    cap_string_lengths,
)
from craft_ray.backends.openai_compat import (
    OpenAIBackendConfig,
    OpenAIGenerator,
    _RateLimiter,
    preflight,
)
from craft_ray.backends.vllm import (
    VLLMBackendConfig,
    postprocess,
    preprocess,
    processor_config,
    sampling_params,
)
from craft_ray.config import ConfigError, load_config
from craft_ray.models.tokenizers import load_chat_tokenizer
from craft_ray.stages.generate.config import GenerateStageConfig
from craft_ray.stages.generate.prompts import (
    PromptSettings,
    build_prompt_rows,
    make_shot_pool,
    prompt_schema,
)
from craft_ray.stages.generate.stage import run_generate
from craft_ray.tasks.fewshots import FewShotConfig
from craft_ray.tasks.registry import get_task
from tests.conftest import FIXTURES

GEN = FIXTURES / "generate"
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 0, "guided": True}
CANNED = ('Here is the sample:\n```json\n{"question": "Why should freshly roasted coffee '
          'rest before brewing?", "options": ["A. It degasses CO2", "B. It gains caffeine", '
          '"C. It cools down", "D. It dries"], "answer": "A"}\n```')


def test_cap_string_lengths_keeps_min_and_enums():
    schema = get_task("recipegen").output_schema()
    capped = cap_string_lengths(schema, 8)
    assert capped["properties"]["instruction"] == {"type": "string", "minLength": 16,
                                                   "maxLength": 16}
    assert "maxLength" not in schema["properties"]["instruction"]  # the original is untouched
    assert cap_string_lengths(schema, None) is schema
    mc = cap_string_lengths(get_task("csqa").output_schema(), 8)["properties"]
    assert "maxLength" not in mc["answer"]  # an enum stays as it is
    # a pattern says how the string ends: bounded inside the pattern, never cut by maxLength
    assert "maxLength" not in mc["question"]
    assert mc["question"]["pattern"] == "^\\S.{14,14}[?.!:]$"
    options = cap_string_lengths(get_task("medqa").output_schema(), 30)["properties"]["options"]
    assert options["prefixItems"][0]["pattern"] == "^A\\. \\S.{1,30}$"


def _prompt_table(tok, task_name: str, n: int, fewshots, **kw) -> pa.Table:
    task = get_task(task_name)
    pool = make_shot_pool(task, FewShotConfig(path=str(fewshots)), text_max_chars=200)
    st = PromptSettings(task_name=task_name, num_shots=1, samples_per_doc=1, seed=0,
                        max_new_tokens=kw.get("max_new_tokens", 96), max_prompt_tokens=None,
                        long_prompt="drop", min_text_tokens=8,
                        guided_max_string_chars=kw.get("cap", 16))
    docs = [json.loads(line) for line in (GEN / "corpus_samples.jsonl").open()][:n]
    for d in docs:
        d["text"] = d["text"][:300]
    return pa.Table.from_pylist(build_prompt_rows(docs, task, pool, st, tok),
                                schema=prompt_schema())


def test_hf_generator_guided_per_row_grammars_and_seeded(tiny_causal_lm):
    from craft_ray.backends.hf import HFGenerator

    tok = load_chat_tokenizer(str(tiny_causal_lm))
    batch = _prompt_table(tok, "csqa", 4, GEN / "csqa_quirk.jsonl")
    assert len(set(batch.column("variant").to_pylist())) == 2  # both variants in one batch
    gen = HFGenerator(str(tiny_causal_lm), None,
                      {"batch_size": 4, "generate_batch_size": 4, "torch_threads": 1}, SAMPLING)
    out = gen(batch).to_pylist()
    for r in out:
        assert r["error"] == "" and r["finish_reason"] == "stop", r["text"]
        # each row follows its own variant's schema (question or statement key)
        jsonschema.validate(json.loads(r["text"], strict=False), json.loads(r["schema"]))
        assert r["tokens_in"] == len(r["prompt_token_ids"]) and r["tokens_out"] > 0
        assert r["gen_seconds"] > 0
    again = gen(batch).to_pylist()
    assert [r["text"] for r in again] == [r["text"] for r in out]  # seeded per batch


# --- openai: a real local server --------------------------------------------------------


class _Server:
    """OpenAI-compatible server on 127.0.0.1 serving the tiny model, with scripted faults.

    Markers in the last user message: [[canned]] a valid sample in prose, [[500-once]] one
    HTTP 500 then normal, [[500]] always HTTP 500, [[slow]] sleeps past the client's timeout,
    [[400]] HTTP 400. Anything else: the tiny model's greedy continuation. GET /v1/models
    lists the model "tiny" (401 when ``required_key`` is set and not sent).
    """

    def __init__(self, model_dir):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)  # oversubscribed threads make a tiny model 10x slower
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.torch = torch
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.slow_s = 4.0  # how long [[slow]] sleeps: past the clients' timeout
        self.required_key: str | None = None  # GET /v1/models answers 401 without it
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):  # noqa: N802 - the preflight's GET /v1/models
                key = server.required_key
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    code, payload = 401, {"error": {"message": "invalid api key"}}
                elif self.path.rstrip("/") == "/v1/models":
                    code, payload = 200, {"object": "list", "data": [{"id": "tiny"}]}
                else:
                    code, payload = 404, {"error": {"message": "not found"}}
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload = server.answer(self.path, body, dict(self.headers))
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path, body, headers):
        last = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        marker = next((m for m in ("[[canned]]", "[[500-once]]", "[[500]]", "[[slow]]",
                                   "[[400]]") if m in last), "")
        with self.lock:
            self.bodies.append(body)
            self.headers.append(headers)
            self.attempts[marker] = self.attempts.get(marker, 0) + 1
            n = self.attempts[marker]
        if marker == "[[500]]" or (marker == "[[500-once]]" and n == 1):
            return 500, {"error": {"message": "engine overloaded"}}
        if marker == "[[400]]":
            return 400, {"error": {"message": "prompt too long"}}
        if marker == "[[slow]]":
            time.sleep(self.slow_s)
        if marker == "[[canned]]":
            text, n_in, n_out = CANNED, 100, 40
        else:
            text, n_in, n_out = self.generate(body)
        choice = ({"message": {"role": "assistant", "content": text}} if "messages" in body
                  else {"text": text})
        choice.update(index=0, finish_reason="length" if n_out >= body["max_tokens"] else "stop")
        return 200, {"id": "x", "object": "chat.completion", "choices": [choice],
                     "usage": {"prompt_tokens": n_in, "completion_tokens": n_out}}

    def generate(self, body):
        prompt = self.tok.apply_chat_template(body["messages"], tokenize=False,
                                              add_generation_prompt=True)
        ids = self.tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with self.lock, self.torch.inference_mode():
            out = self.model.generate(ids, max_new_tokens=min(body["max_tokens"], 24),
                                      do_sample=False, pad_token_id=self.tok.pad_token_id)
        gen = out[0, ids.shape[1]:].tolist()
        return self.tok.decode(gen, skip_special_tokens=True), ids.shape[1], len(gen)

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_causal_lm):
    s = _Server(tiny_causal_lm)
    yield s
    s.close()


def _row(text: str, i: int = 0) -> dict:
    msgs = [{"role": "user", "content": f"Please write one question.\nText: {text}"}]
    return {"sample_id": f"c/s#{i}@0", "prompt": "", "messages": json.dumps(msgs),
            "schema": json.dumps(get_task("bioqa").output_schema()), "max_new_tokens": 16}


def test_openai_requests_retries_and_failures(server, monkeypatch):
    monkeypatch.setenv("CRAFT_TEST_KEY", "sk-local-test")
    cfg = {"base_url": server.url, "timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.05,
           "qps": 1000, "api_key_env": "CRAFT_TEST_KEY"}
    gen = OpenAIGenerator(cfg, "tiny", SAMPLING, actors=1)

    ok = gen.request(_row("Coffee rests for days after roasting."))
    assert ok["error"] == "" and ok["tokens_in"] > 0 and 0 < ok["tokens_out"] <= 16
    assert ok["finish_reason"] in ("stop", "length") and ok["gen_seconds"] > 0
    body, headers = server.bodies[-1], server.headers[-1]
    assert body["model"] == "tiny" and body["max_tokens"] == 16 and body["top_k"] == 40
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == [
        "question", "options", "answer"]
    assert headers["Authorization"] == "Bearer sk-local-test"

    canned = gen.request(_row("[[canned]]"))
    assert get_task("bioqa").parse(canned["text"])["answer"] == "A"

    once = gen.request(_row("[[500-once]]"))  # retried, then fine
    assert once["error"] == "" and server.attempts["[[500-once]]"] == 2

    fail = gen.request(_row("[[500]]"))
    assert fail["error"] == ERR_SERVER and fail["finish_reason"] == "error"
    assert server.attempts["[[500]]"] == 3 and "HTTP 500" in fail["error_detail"]

    one_retry = OpenAIGenerator(dict(cfg, max_retries=1), "tiny", SAMPLING, actors=1)
    slow = one_retry.request(_row("[[slow]]"))
    assert slow["error"] == ERR_TIMEOUT and server.attempts["[[slow]]"] == 2

    rejected = gen.request(_row("[[400]]"))  # a client error is not retried
    assert rejected["error"] == ERR_REJECTED and server.attempts["[[400]]"] == 1


def test_rate_limiter_spaces_requests():
    lim = _RateLimiter(qps=40)
    t0 = time.monotonic()
    for _ in range(9):
        lim.wait()
    assert time.monotonic() - t0 >= 8 / 40 - 0.01


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_names_the_url_and_what_to_check(server, monkeypatch, caplog):
    ok = OpenAIBackendConfig(base_url=server.url)
    assert preflight(ok, "tiny") == ["tiny"]
    caplog.set_level("WARNING")
    assert preflight(ok, "other") == ["tiny"]  # a warning: some servers take any name
    assert any("generate.model='other' is not among the models" in r.message
               for r in caplog.records)
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ConfigError, match=f"cannot reach the server at {dead}/models .*"
                                          "check that it is running"):
        preflight(OpenAIBackendConfig(base_url=dead), "tiny")
    with pytest.raises(ConfigError, match="judge.judge.openai: GET .*/models answered HTTP "
                                          "404; .*ending in /v1"):
        preflight(OpenAIBackendConfig(base_url=server.url[:-3]), "tiny", "judge.judge")
    assert preflight(OpenAIBackendConfig(base_url=dead, preflight=False), "tiny") == []
    server.required_key = "sk-right"
    try:
        monkeypatch.setenv("CRAFT_TEST_KEY", "sk-wrong")
        keyed = OpenAIBackendConfig(base_url=server.url, api_key_env="CRAFT_TEST_KEY")
        with pytest.raises(ConfigError, match="refused the request with the key in "
                                              "\\$CRAFT_TEST_KEY \\(HTTP 401"):
            preflight(keyed, "tiny")
        monkeypatch.setenv("CRAFT_TEST_KEY", "sk-right")
        assert preflight(keyed, "tiny") == ["tiny"]
    finally:
        server.required_key = None


def test_unreachable_server_fails_generate_before_any_work(tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    cfg = load_config(GenerateStageConfig, None, [
        f"run_dir={tmp_path / 'run'}", "generate.task=bioqa", "generate.backend=openai",
        "generate.model=tiny", f"generate.fewshots.path={GEN / 'fewshots_short.jsonl'}",
        f"generate.input_path={GEN / 'corpus_samples.jsonl'}", "generate.num_shots=2",
        f"generate.openai.base_url={dead}"])
    with pytest.raises(ConfigError, match=f"generate.openai: cannot reach the server at {dead}"):
        run_generate(cfg)  # no Ray needed: it fails before any work
    assert not (tmp_path / "run" / "generate").exists()


def test_openai_backend_end_to_end(ray_local, server, tmp_path):
    docs = [json.loads(line) for line in (GEN / "corpus_samples.jsonl").open()]
    markers = ["[[canned]]", "[[canned]]", "[[500-once]]", "[[500]]", "[[slow]]", ""]
    for d, m in zip(docs, markers):
        d["text"] = f"{m} {d['text'][:200]}"
    path = tmp_path / "corpus_samples.parquet"
    pq.write_table(pa.Table.from_pylist(docs), path)
    server.attempts.clear()
    cfg = load_config(GenerateStageConfig, None, [
        f"run_dir={tmp_path / 'run'}", "generate.task=bioqa", "generate.backend=openai",
        "generate.model=tiny", f"generate.fewshots.path={GEN / 'fewshots_short.jsonl'}",
        f"generate.input_path={path}", "generate.num_shots=2", "generate.max_new_tokens=16",
        f"generate.openai.base_url={server.url}", "generate.openai.timeout_s=2.0",
        "generate.openai.max_retries=1", "generate.openai.backoff_s=0.05",
        "generate.openai.max_concurrent_requests=4"])
    stats = run_generate(cfg)
    out = tmp_path / "run" / "generate"
    raw = pq.read_table(out / "raw.parquet").to_pylist()
    rejects = {r["doc_id"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    clean = pq.read_table(out / "clean.parquet").to_pylist()
    assert len(raw) == 6 == len(clean) + len(rejects) and stats["prompts"] == 6
    assert {c["doc_id"] for c in clean} >= {docs[0]["doc_id"], docs[1]["doc_id"]}
    assert rejects[docs[3]["doc_id"]]["reject_reason"] == ERR_SERVER
    assert rejects[docs[4]["doc_id"]]["reject_reason"] == ERR_TIMEOUT
    assert "2 attempts" in rejects[docs[4]["doc_id"]]["error_detail"]
    assert docs[2]["doc_id"] not in rejects or rejects[docs[2]["doc_id"]]["reject_reason"] \
        not in (ERR_SERVER, ERR_TIMEOUT)  # recovered after one retry
    assert server.attempts["[[500]]"] == 2 and server.attempts["[[500-once]]"] == 2
    assert stats["backend_errors"] == 2 and stats["generation_rejects"][ERR_SERVER] == 1
    assert stats["tokens_in"] > 0 and stats["prompt_budget_tokens"] is None  # no tokenizer


# --- vllm ------------------------------------------------------------------------------


def test_vllm_processor_config_on_cpu():
    cfg = VLLMBackendConfig(tensor_parallel_size=2, pipeline_parallel_size=2, concurrency=3,
                            batch_size=32, max_num_seqs=128, max_model_len=16384,
                            engine_kwargs={"enforce_eager": True})
    pc = processor_config(cfg, "mistralai/Mistral-7B-Instruct-v0.2")
    assert pc.model_source == "mistralai/Mistral-7B-Instruct-v0.2"
    assert pc.engine_kwargs["tensor_parallel_size"] == 2
    assert pc.engine_kwargs["pipeline_parallel_size"] == 2
    assert pc.engine_kwargs["max_num_seqs"] == 128 and pc.engine_kwargs["max_model_len"] == 16384
    assert pc.engine_kwargs["enforce_eager"] is True
    assert pc.concurrency == 3 and pc.batch_size == 32 and pc.should_continue_on_error
    assert pc.chat_template_stage is False and pc.tokenize_stage is False


def test_vllm_row_mapping():
    row = {"sample_id": "c/s#1@0", "prompt": "<s>hi", "prompt_token_ids": [0, 5, 6],
           "schema": '{"type": "object"}', "max_new_tokens": 256, "doc_id": "c/s#1"}
    pre = preprocess(row, SAMPLING)
    assert pre["tokenized_prompt"] == [0, 5, 6] and pre["doc_id"] == "c/s#1"
    sp = pre["sampling_params"]
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["max_tokens"]) == (0.7, 0.9, 40, 256)
    assert sp["structured_outputs"] == {"json": '{"type": "object"}',
                                        "disable_any_whitespace": True}
    assert "structured_outputs" not in sampling_params(row, dict(SAMPLING, guided=False))
    ok = postprocess({**pre, "generated_text": "{}", "num_generated_tokens": 256,
                      "num_input_tokens": 3, "time_taken_llm": 0.5, "__inference_error__": ""})
    assert ok["finish_reason"] == "length" and ok["tokens_in"] == 3 and ok["error"] == ""
    assert "sampling_params" not in ok and ok["doc_id"] == "c/s#1"
    bad = postprocess({**pre, "generated_text": "", "num_generated_tokens": 0,
                       "time_taken_llm": -1, "__inference_error__": "ValueError: boom"})
    assert bad["error"] == ERR_ENGINE and bad["finish_reason"] == "error"
    assert bad["gen_seconds"] == 0.0 and "boom" in bad["error_detail"]


def test_vllm_missing_gives_install_hint():
    pytest.importorskip("ray.data.llm")
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here")
    from craft_ray.backends.vllm import vllm_generate

    with pytest.raises(ImportError, match="craft-ray\\[gpu\\]"):
        vllm_generate(None, "m", VLLMBackendConfig(), SAMPLING)


@pytest.mark.gpu
def test_vllm_backend_on_gpu(request, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    pytest.importorskip("vllm")
    request.getfixturevalue("ray_local")  # only now: a skipped test starts no Ray
    from craft_ray.models.tiny import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "tiny", hidden_size=256)
    cfg = load_config(GenerateStageConfig, None, [
        f"run_dir={tmp_path / 'run'}", "generate.task=bioqa", "generate.backend=vllm",
        f"generate.model={model}", f"generate.fewshots.path={GEN / 'fewshots_short.jsonl'}",
        f"generate.input_path={GEN / 'corpus_samples.jsonl'}", "generate.num_shots=2",
        "generate.max_new_tokens=200", "generate.guided_max_string_chars=24",
        "generate.vllm.max_model_len=4096", "generate.vllm.gpu_memory_utilization=0.3"])
    stats = run_generate(cfg)
    raw = pq.read_table(tmp_path / "run" / "generate" / "raw.parquet").to_pylist()
    assert stats["generations"] == len(raw) == 6
    schema = cap_string_lengths(get_task("bioqa").output_schema(), 24)
    for r in raw:
        jsonschema.validate(json.loads(r["text"], strict=False), schema)
