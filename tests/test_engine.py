"""The shared generation engine: which backend serves a request, the transformers backend against a plain
`model.generate` written out here, the CLI's error for an engine that cannot run, and (where vLLM and a GPU
exist) vLLM's greedy answers against transformers'."""

import importlib.util

import pytest
import torch
from conftest import align

from align_cli.config import ModelConfig
from align_cli.engine import TransformersEngine, choose_engine, open_engine, vllm_usable
from align_cli.errors import UserError
from align_cli.generation import SamplingSettings

PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], "Plain text prompt:"]


def test_backend_choice():
    assert choose_engine("transformers") == "transformers"
    assert choose_engine("auto", needs_transformers=True) == "transformers"
    assert choose_engine("auto") == ("vllm" if vllm_usable() else "transformers")
    with pytest.raises(UserError, match="Unknown generation engine 'tgi'"):
        choose_engine("tgi")
    if not vllm_usable():
        with pytest.raises(UserError, match="needs the vllm package and a CUDA GPU"):
            choose_engine("vllm")


def test_transformers_engine_matches_plain_generate(tiny_model_dir, tokenizer):
    engine = open_engine(str(tiny_model_dir), tokenizer, ModelConfig(name=str(tiny_model_dir)), torch.float32,
                         "transformers", system_prompt="Be brief.")
    assert isinstance(engine, TransformersEngine)
    answers = engine.generate(PROMPTS, SamplingSettings(max_new_tokens=5, batch_size=1))
    # Written out independently: render each prompt, greedy-decode it alone (no padding), cut the prompt off.
    rendered = [tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *PROMPTS[0]],
                                              tokenize=False, add_generation_prompt=True), PROMPTS[1]]
    for text, answer in zip(rendered, answers):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = engine.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert answer == [tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)]
    engine.close()


def test_eval_and_generate_refuse_an_engine_that_cannot_run(monkeypatch, capsys, tmp_path, tiny_model_dir):
    if vllm_usable():
        pytest.skip("vLLM can run here")
    code, _, err = align(monkeypatch, capsys, "generate", "--model", str(tiny_model_dir), "--prompts",
                         "builtin:arithmetic_prompts", "--num-prompts", "2", "--engine", "vllm",
                         "--output", str(tmp_path / "out.jsonl"))
    assert code == 2 and "vllm package and a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_vllm_greedy_answers_match_transformers(smollm_dir, tokenizer):
    settings = SamplingSettings(max_new_tokens=16, batch_size=4)
    prompts = [[{"role": "user", "content": f"What is {a} + {a + 3}? Reply with just the equation."}] for a in range(8)]
    config = ModelConfig(name=str(smollm_dir), dtype="float32")
    hf = open_engine(str(smollm_dir), tokenizer, config, torch.float32, "transformers")
    expected = hf.generate(prompts, settings)
    hf.close()
    vllm = open_engine(str(smollm_dir), tokenizer, config, torch.float32, "vllm")
    got = vllm.generate(prompts, settings)
    vllm.close()
    agree = sum(a == b for a, b in zip(got, expected))
    assert agree >= 6, list(zip(got, expected))  # float32 greedy: kernels may flip a near-tie token
