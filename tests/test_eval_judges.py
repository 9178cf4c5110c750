"""Judges: rule, reward model (a tiny random-init classifier), and the openai judge's protocol,
retries, cache and key handling against a scripted OpenAI-compatible HTTP server on localhost
(the embedded model as a judge behind a real server: test_eval_server.py)."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from align_cli.errors import UserError
from align_cli.eval.judges.cache import JudgmentCache
from align_cli.eval.judges.openai_judge import OpenAIJudge
from align_cli.eval.judges.protocol import (
    choice_preference,
    discrete_preference,
    is_switched,
    shown_order,
    unswitch,
    weighted_preference,
)
from align_cli.eval.judges.reward_model import RewardModelJudge
from align_cli.eval.judges.rule import RuleJudge, rule_preference


def test_rule_judge_prefers_the_correct_answer():
    assert [rule_preference(m, r) for m, r in [(True, False), (False, True), (True, True), (False, False)]] == \
        [2.0, 1.0, 1.5, 1.5]
    pairs = [{"instruction": "What is 2 + 3?", "answer": "2 + 3 = 5", "output_1": "2 + 3 = 5", "output_2": "2 + 3 = 6"},
             {"instruction": "What is 2 * 3?", "answer": "2 * 3 = 6", "output_1": "It is 7", "output_2": "2 * 3 = 6."}]
    assert [j["preference"] for j in RuleJudge().judge(pairs)] == [1.0, 2.0]
    with pytest.raises(UserError, match="verifiable answer"):
        RuleJudge().judge([{"instruction": "Write a poem.", "output_1": "a", "output_2": "b"}])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    directory = tmp_path_factory.mktemp("reward-model")
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_reward_model_preference_is_sigmoid_of_the_reward_gap(reward_model_dir):
    judge = RewardModelJudge(str(reward_model_dir), batch_size=3)
    pairs = [{"instruction": "Say hi.", "output_1": "Hi!", "output_2": "Hello there, nice to meet you."},
             {"instruction": "Count to three.", "output_1": "1 2 3", "output_2": "one"},
             {"instruction": "Name a fruit.", "output_1": "An apple is a fruit that grows on trees.", "output_2": "Pear"}]
    judgments = judge.judge(pairs)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()

    def reward(instruction, output):  # one unpadded sequence at a time, in the chat template: the reference
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), return_tensors="pt",
                        add_special_tokens=False)
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    for pair, judgment in zip(pairs, judgments):
        gap = reward(pair["instruction"], pair["output_2"]) - reward(pair["instruction"], pair["output_1"])
        assert judgment["preference"] == pytest.approx(1 + 1 / (1 + math.exp(-gap)), abs=1e-5)
    assert judge.name == f"reward_model:{reward_model_dir.name}"


def test_output_order_is_seeded_per_instruction():
    instructions = [f"instruction {k}" for k in range(400)]
    switched = [is_switched(text, seed=0) for text in instructions]
    assert switched == [is_switched(text, seed=0) for text in instructions]  # reproducible
    assert 160 < sum(switched) < 240                                         # about half
    assert switched != [is_switched(text, seed=1) for text in instructions]  # the seed matters
    assert shown_order("ref", "model", True) == ("model", "ref") and shown_order("ref", "model", False) == ("ref", "model")
    assert unswitch(1.25, True) == 1.75 and unswitch(1.25, False) == 1.25 and unswitch(None, True) is None


def test_weighted_and_discrete_verdicts():
    top = [{"token": "m", "logprob": math.log(0.5)}, {"token": " m", "logprob": math.log(0.1)},
           {"token": "M", "logprob": math.log(0.2)}, {"token": "The", "logprob": math.log(0.1)}]
    assert weighted_preference(top) == pytest.approx(2 - 0.6 / 0.8)  # P(first) = .6 / (.6 + .2)
    assert weighted_preference([{"token": "M", "logprob": -3.0}]) == pytest.approx(2.0)
    assert weighted_preference([{"token": "The", "logprob": -0.1}]) is None
    assert (discrete_preference("m"), discrete_preference(" M\n"), discrete_preference("The")) == (1.0, 2.0, None)
    no_logprobs = {"message": {"content": "M"}, "logprobs": None}
    assert choice_preference(no_logprobs) == (2.0, "discrete")
    unusable = {"message": {"content": "m"}, "logprobs": {"content": [{"token": "x", "top_logprobs": [{"token": "x", "logprob": 0}]}]}}
    assert choice_preference(unusable) == (1.0, "discrete")


class ScriptedServer:
    """An OpenAI-compatible endpoint whose verdict follows a rule: the output containing GOOD wins
    with probability .9 (as top log-probs). `failures` status codes are answered first, in order."""

    def __init__(self, failures=(), reject_logprobs=False):
        self.failures, self.reject_logprobs = list(failures), reject_logprobs
        self.requests, self.headers = [], []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                owner.headers.append(dict(self.headers))
                if owner.failures:
                    return self._send(owner.failures.pop(0), {"error": {"message": "try later"}})
                if owner.reject_logprobs and body.get("logprobs"):
                    return self._send(400, {"error": {"message": "logprobs are not supported"}})
                user = body["messages"][-1]["content"]
                first_good = user.index('"m"') < user.find("GOOD") < user.index('"M"')
                probability_first = 0.9 if first_good else 0.1
                verdict = "m" if first_good else "M"
                choice = {"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "length"}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": verdict, "logprob": 0.0, "top_logprobs": [
                        {"token": "m", "logprob": math.log(probability_first)},
                        {"token": "M", "logprob": math.log(1 - probability_first)}]}]}
                self._send(200, {"choices": [choice]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(**kwargs):
        servers.append(ScriptedServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _pairs(count):
    return [{"instruction": f"Task {k}", "output_1": f"reference {k}", "output_2": f"GOOD answer {k}"}
            for k in range(count)]


def test_openai_judge_maps_verdicts_back_through_the_shuffle(scripted):
    server = scripted()
    judge = OpenAIJudge("judge", server.base_url, concurrency=3, backoff=0.01)
    judgments = judge.judge(_pairs(12))
    switches = [j["raw_completion"]["is_switched_outputs"] for j in judgments]
    assert any(switches) and not all(switches)
    # whichever side it was shown on, the GOOD model output wins with probability .9
    assert [j["preference"] for j in judgments] == pytest.approx([1.9] * 12)
    assert all(r["max_tokens"] == 1 and r["top_logprobs"] == 5 for r in server.requests)


def test_openai_judge_retries_then_succeeds(scripted):
    server = scripted(failures=[429, 503])
    judge = OpenAIJudge("judge", server.base_url, concurrency=1, backoff=0.01)
    assert judge.judge(_pairs(1))[0]["preference"] == pytest.approx(1.9)
    assert judge.requests_made == 3


def test_openai_judge_gives_up_with_a_clear_error(scripted):
    server = scripted(failures=[500] * 5)
    judge = OpenAIJudge("judge", server.base_url, concurrency=1, max_retries=2, backoff=0.01)
    with pytest.raises(UserError, match="failed 3 times"):
        judge.judge(_pairs(1))


def test_openai_judge_cache_pays_once(scripted, tmp_path):
    server = scripted()
    cache_path = tmp_path / "cache.jsonl"
    first = OpenAIJudge("judge", server.base_url, cache=JudgmentCache(cache_path))
    before = first.judge(_pairs(5))
    again = OpenAIJudge("judge", server.base_url, cache=JudgmentCache(cache_path))
    assert [j["preference"] for j in again.judge(_pairs(5))] == [j["preference"] for j in before]
    assert again.requests_made == 0
    changed = _pairs(5)
    changed[0]["output_2"] = "GOOD but different"
    other_model = OpenAIJudge("another-judge", server.base_url, cache=JudgmentCache(cache_path))
    third = OpenAIJudge("judge", server.base_url, cache=JudgmentCache(cache_path))
    third.judge(changed)
    assert third.requests_made == 1            # only the changed output is judged again
    other_model.judge(_pairs(2))
    assert other_model.requests_made == 2      # another judge model is another question
    reseeded = OpenAIJudge("judge", server.base_url, seed=7, cache=JudgmentCache(cache_path))
    reseeded.judge(_pairs(5))
    flipped = sum(is_switched(p["instruction"], 7) != is_switched(p["instruction"], 0) for p in _pairs(5))
    assert reseeded.requests_made == flipped   # a different order is a different question


def test_api_key_goes_only_into_the_header(scripted, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    server = scripted(failures=[401])
    judge = OpenAIJudge("judge", server.base_url, api_key_env="MY_JUDGE_KEY", cache=JudgmentCache(tmp_path / "c.jsonl"))
    with pytest.raises(UserError) as refused:
        judge.judge(_pairs(1))
    assert "sk-secret" not in str(refused.value) and "HTTP 401" in str(refused.value)
    judgments = judge.judge(_pairs(1))
    assert server.headers[-1]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in json.dumps(judgments) and "sk-secret" not in (tmp_path / "c.jsonl").read_text()


def test_server_without_logprobs_gives_discrete_verdicts(scripted):
    server = scripted(reject_logprobs=True)
    # switching to discrete verdicts is not a failed attempt: it works without any retry allowed
    judgments = OpenAIJudge("judge", server.base_url, concurrency=1, max_retries=0).judge(_pairs(3))
    assert [j["preference"] for j in judgments] == [2.0, 2.0, 2.0]
    assert {j["raw_completion"]["parsed_from"] for j in judgments} == {"discrete"}
