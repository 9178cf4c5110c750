"""Integration with the real AlpacaEval set in ../shared (skipped where that folder is absent)."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from align_cli.eval.formats import join_references, load_instruction_set, read_records

ALPACA_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
needs_alpaca_eval = pytest.mark.skipif(not ALPACA_EVAL.is_file(), reason=f"{ALPACA_EVAL} is absent")


@needs_alpaca_eval
def test_the_805_instructions_read_and_join():
    rows = load_instruction_set(str(ALPACA_EVAL))
    assert len(rows) == 805
    assert Counter(row["dataset"] for row in rows) == {"helpful_base": 129, "koala": 156, "oasst": 188,
                                                       "selfinstruct": 252, "vicuna": 80}
    assert {row["generator"] for row in rows} == {"gpt4_1106_preview"}
    assert join_references(rows[:10], list(reversed(rows)), "self") == rows[:10]


@needs_alpaca_eval
@pytest.mark.slow
def test_evaluation_on_alpaca_eval_instructions(tmp_path, tiny_model_dir, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align_cli.eval.judges import JudgeSettings
    from align_cli.eval.runner import EvalSettings, run_evaluation
    from align_cli.generation import SamplingSettings

    torch.manual_seed(0)  # a tiny random reward model: the numbers mean nothing, the files and flow do
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    summary = run_evaluation(EvalSettings(
        model=str(tiny_model_dir), instructions=str(ALPACA_EVAL), output_dir=tmp_path / "evals", limit=5, name="tiny",
        judge=JudgeSettings(kind="reward_model", model=str(tmp_path / "rm")),
        sampling=SamplingSettings(max_new_tokens=8, batch_size=5)))
    assert summary["reference"] == "gpt4_1106_preview" and summary["n_total"] == 5
    annotations = read_records(tmp_path / "evals" / "tiny" / "reward_model_rm" / "annotations.json")
    assert all(1 < row["preference"] < 2 for row in annotations)
    assert summary["length_controlled_winrate"] is not None
