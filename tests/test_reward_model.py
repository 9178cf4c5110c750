"""The one reward-model scorer (align_cli/reward_model.py) against a by-hand tokenise + forward of a tiny
random-init reward model, and the RL reward, the iterative ranker and the eval judge giving its numbers."""

import shutil

import pytest
import torch
from iterative_fixtures import reward_model_dir  # noqa: F401  (fixture)

from align_cli.errors import UserError
from align_cli.eval.judges.reward_model import RewardModelJudge
from align_cli.iterative.rankers import RewardModelRanker
from align_cli.reward_model import RewardModelScorer
from align_cli.rl.rewards import build_reward

SYSTEM_PROMPT = [{"role": "system", "content": "Answer with one equation."}, {"role": "user", "content": "What is 3 + 4?"}]
COMPLETIONS = ["3 + 4 = 7", "seven, I think, or maybe eight; it is hard to say", "8"]


def forward_alone(directory, ids: list[int]) -> float:
    """The reference: one unpadded sequence through a freshly loaded model, the logit of output 0."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def chat_ids(directory, prompt, completion: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def plain_reward_model_dir(reward_model_dir, tmp_path_factory):  # noqa: F811
    """The same reward model with a tokenizer that has no chat template."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("plain-reward-model")
    for path in reward_model_dir.iterdir():
        shutil.copy(path, directory / path.name)
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    return directory


def test_batched_scores_equal_each_sequence_alone(reward_model_dir):  # noqa: F811
    scorer = RewardModelScorer(str(reward_model_dir), batch_size=2)  # rows of different lengths share a batch
    prompts = [SYSTEM_PROMPT, SYSTEM_PROMPT, "Say hi."]
    scores = scorer.score(prompts, COMPLETIONS)
    expected = [forward_alone(reward_model_dir, chat_ids(reward_model_dir, p, c)) for p, c in zip(prompts, COMPLETIONS)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3


def test_the_three_users_give_the_scorers_numbers(reward_model_dir):  # noqa: F811
    expected = [forward_alone(reward_model_dir, chat_ids(reward_model_dir, SYSTEM_PROMPT, c)) for c in COMPLETIONS]
    reward = build_reward("reward_model", {"model": str(reward_model_dir), "batch_size": 2})
    assert reward(COMPLETIONS, [{"prompt": SYSTEM_PROMPT}] * 3) == pytest.approx(expected, abs=1e-5)
    ranker = RewardModelRanker(str(reward_model_dir), batch_size=2)
    assert ranker.score([{"prompt": SYSTEM_PROMPT}], [COMPLETIONS]) == [pytest.approx(expected, abs=1e-5)]
    judged = RewardModelJudge(str(reward_model_dir), batch_size=2).judge(
        [{"instruction": "What is 3 + 4?", "output_1": COMPLETIONS[0], "output_2": COMPLETIONS[1]}])
    by_hand = [forward_alone(reward_model_dir, chat_ids(reward_model_dir, "What is 3 + 4?", c)) for c in COMPLETIONS[:2]]
    assert judged[0]["raw_completion"]["reward_reference"] == pytest.approx(by_hand[0], abs=1e-5)
    assert judged[0]["raw_completion"]["reward_model"] == pytest.approx(by_hand[1], abs=1e-5)


def test_without_a_chat_template_the_turns_are_joined_by_a_blank_line(plain_reward_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plain_reward_model_dir)
    scorer = RewardModelScorer(str(plain_reward_model_dir), batch_size=3)
    assert not scorer.uses_chat_template
    scores = scorer.score([SYSTEM_PROMPT] * 3, COMPLETIONS)
    expected = [forward_alone(plain_reward_model_dir,
                              tokenizer(f"Answer with one equation.\n\nWhat is 3 + 4?\n\n{c}").input_ids)
                for c in COMPLETIONS]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_long_inputs_keep_their_end(reward_model_dir):  # noqa: F811
    scorer = RewardModelScorer(str(reward_model_dir), batch_size=3, max_length=8)
    scores = scorer.score([SYSTEM_PROMPT] * 3, COMPLETIONS)
    expected = [forward_alone(reward_model_dir, chat_ids(reward_model_dir, SYSTEM_PROMPT, c)[-8:]) for c in COMPLETIONS]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_the_head_reads_the_tokenizers_pad_id(reward_model_dir, tmp_path):  # noqa: F811
    """A model whose config names another pad id than its tokenizer pads with: the head must look for the
    tokenizer's, or a padded row is scored at a pad token (the RL reward kept the config's before)."""
    from transformers import AutoModelForSequenceClassification

    for path in reward_model_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    model.config.pad_token_id = 0
    model.save_pretrained(tmp_path)
    scores = RewardModelScorer(str(tmp_path), batch_size=3).score([SYSTEM_PROMPT] * 3, COMPLETIONS)
    expected = [forward_alone(tmp_path, chat_ids(tmp_path, SYSTEM_PROMPT, c)) for c in COMPLETIONS]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_a_label_the_model_lacks_and_an_unknown_key_are_user_errors(reward_model_dir):  # noqa: F811
    with pytest.raises(UserError, match="1 output labels; label: 2"):
        build_reward("reward_model", {"model": str(reward_model_dir), "label": 2})
    with pytest.raises(UserError, match="no parameter temperature"):
        build_reward("reward_model", {"model": str(reward_model_dir), "temperature": 1.0})
