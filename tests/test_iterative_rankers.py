"""Rankers: the rule tiers, a reward model against its own forward, and the pairwise judge against a real
OpenAI-compatible HTTP server on localhost (round robin, ties, disk cache)."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from iterative_fixtures import reward_model_dir  # noqa: F401  (fixture)

from align_cli.config import RankerConfig
from align_cli.errors import UserError
from align_cli.iterative.rankers import RewardModelRanker, RuleRanker, make_ranker, win_probabilities

PROMPT = [{"role": "user", "content": "What is 3 + 4? Reply with just the equation and its result."}]


def test_rule_ranker_tiers():
    ranker = RuleRanker()
    row = {"prompt": PROMPT, "answer": "3 + 4 = 7"}
    texts = ["3 + 4 = 7", "3 + 4 = 7.", "The answer is 7", "3 + 4 = 8", "I like numbers"]
    assert ranker.score([row], [texts]) == [[1.0, 1.0, 0.5, 0.25, 0.0]]
    with pytest.raises(UserError, match="answer"):
        ranker.score([{"prompt": PROMPT}], [["3 + 4 = 7"]])


def _row_means_with_self_half(preference: torch.Tensor) -> list[float]:
    """SPPO's P(y_i > pi) from a full K x K matrix of P(y_i > y_j), written out: diagonal 1/2, row mean."""
    matrix = preference.clone().double()
    matrix.fill_diagonal_(0.5)
    return matrix.mean(dim=1).tolist()


def test_win_probabilities_follow_the_sppo_pipeline():
    rule = torch.tensor([1.0, 0.5, 0.5, 0.0])
    step = (rule[:, None] > rule[None, :]).double() + 0.5 * (rule[:, None] == rule[None, :]).double()
    assert win_probabilities("rule", rule.tolist()) == pytest.approx(_row_means_with_self_half(step))
    assert win_probabilities("rule", rule.tolist()) == pytest.approx([0.875, 0.5, 0.5, 0.125])

    rewards = torch.tensor([2.0, -1.0, 0.3, 0.3, 5.0], dtype=torch.float64)
    bradley_terry = torch.sigmoid(rewards[:, None] - rewards[None, :])
    assert win_probabilities("reward_model", rewards.tolist()) == pytest.approx(_row_means_with_self_half(bradley_terry))

    # A judge's score is the sum of its verdicts against the others; the matrix behind it is any P with P + P^T = 1.
    torch.manual_seed(0)
    upper = torch.rand(4, 4, dtype=torch.float64).triu(1)
    verdicts = upper + (1 - upper.T).tril(-1)
    scores = (verdicts.sum(dim=1) - verdicts.diagonal()).tolist()
    assert win_probabilities("judge", scores) == pytest.approx(_row_means_with_self_half(verdicts))
    for kind, values in (("rule", rule.tolist()), ("reward_model", rewards.tolist()), ("judge", scores)):
        assert sum(win_probabilities(kind, values)) == pytest.approx(len(values) / 2)  # each meeting hands out 1


def test_reward_model_ranker_scores_the_chat_rendering(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ranker = make_ranker(RankerConfig(name="reward_model", model=str(reward_model_dir), batch_size=2))
    assert isinstance(ranker, RewardModelRanker)
    samples = [["3 + 4 = 7", "seven", "3 + 4 = 8"], ["ok"]]
    rows = [{"prompt": PROMPT}, {"prompt": [{"role": "user", "content": "hi"}]}]
    scores = ranker.score(rows, samples)
    assert [len(s) for s in scores] == [3, 1]
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for row, texts, row_scores in zip(rows, samples, scores):
        for text, score in zip(texts, row_scores):  # one sequence at a time: no padding at all
            rendered = tokenizer.apply_chat_template([*row["prompt"], {"role": "assistant", "content": text}],
                                                     tokenize=False)
            ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                expected = float(model(**ids).logits[0, 0])
            assert score == pytest.approx(expected, abs=1e-4)


class ShorterWins(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that prefers the shorter output and calls equal lengths for the first."""

    requests = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests += 1
        outputs = re.findall(r'"output": """(.*?)"""', body["messages"][-1]["content"], re.DOTALL)
        verdict = "M" if len(outputs[1]) < len(outputs[0]) else "m"
        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), ShorterWins)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("ALIGN_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ShorterWins.requests = 0
    yield ShorterWins
    server.shutdown()


def test_judge_ranker_round_robin_with_cache(judge_server, tmp_path):
    config = RankerConfig(name="judge", model="local-judge", concurrency=2)
    samples = [["a", "ccc", "bb"], ["xx", "yy"]]
    rows = [{"prompt": PROMPT}, {"prompt": "plain text prompt"}]
    scores = make_ranker(config, tmp_path).score(rows, samples)
    # Shorter wins every meeting: "a" beats both, "bb" beats "ccc". Equal lengths: whichever was shown first
    # wins, so the order the judge saw decides; the two scores still sum to the one meeting.
    assert scores[0] == [2.0, 0.0, 1.0]
    assert sorted(scores[1]) == [0.0, 1.0]
    assert judge_server.requests == 4                       # 3 + 1 pairs
    again = make_ranker(config, tmp_path).score(rows, samples)
    assert again == scores and judge_server.requests == 4   # every verdict came from the disk cache
    assert (tmp_path / "judgments.jsonl").exists()


def test_judge_ranker_needs_its_base_url(monkeypatch):
    monkeypatch.delenv("ALIGN_JUDGE_BASE_URL", raising=False)
    with pytest.raises(UserError, match="ALIGN_JUDGE_BASE_URL"):
        make_ranker(RankerConfig(name="judge", model="m"))
