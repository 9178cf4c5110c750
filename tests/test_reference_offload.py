"""`reference.offload` (align_cli/reference_offload.py): the live reference's weights in host memory, on the device
only for its forward. References: the same model never offloaded (outputs), the run without it (bit-identical
losses and weights), the refusals' messages."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from align_cli import run_setup
from align_cli.errors import UserError
from align_cli.pairwise import trainer as pairwise_trainer
from align_cli.recipe import load_recipe
from align_cli.reference_offload import HostResidentWeights

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # CUDA: pinned memory and the copy stream
QUIET = dict(evaluation__task=None, logging__tensorboard=False, checkpointing__every=None)


def tiny_llama(device="cpu"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_weights_visit_the_device_only_inside_resident(device):
    """Outside `resident()` every parameter and buffer is its host copy (pinned on CUDA); inside, a device copy of the
    same values, and the forward equals the never-offloaded model's. The tied embedding / LM head is one tensor."""
    model, plain = tiny_llama(device), tiny_llama(device)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    weights = HostResidentWeights(model, torch.device(device))
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    assert len(weights.tensors) == len(tensors)  # tied: the LM head is the embedding's tensor, counted once
    assert weights.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight

    def on_host():
        return all(t.device.type == "cpu" and t.data_ptr() == h.data_ptr() for t, h in zip(weights.tensors,
                                                                                           weights.host))

    assert on_host() and all(h.is_pinned() == (device == "cuda") for h in weights.host)
    for fetched_ahead in (True, False):  # as the trainer does before the policy's forward; else fetched on entry
        if fetched_ahead:
            weights.fetch()
        with torch.no_grad(), weights.resident():
            assert all(t.device.type == device and t.data_ptr() != h.data_ptr()
                       for t, h in zip(weights.tensors, weights.host))
            got = model(input_ids=ids).logits
        assert on_host()
        assert torch.equal(got, expected)


def run(path, **kwargs):
    recipe, recipe_path = load_recipe(str(path))
    return pairwise_trainer.train(recipe, recipe_path, **kwargs)


def test_trainer_with_the_reference_offloaded_is_bit_identical(tiny_recipe, tmp_path):
    """DPO with held-out evaluation (the reference scores it too): the same losses, reference log-probs and final
    weights bit for bit; summary.json's memory says how much waited in host memory."""
    common = dict(reference__name=None, **QUIET)
    plain = run(tiny_recipe(output__dir=str(tmp_path / "plain"), **common))
    offloaded = run(tiny_recipe(output__dir=str(tmp_path / "offloaded"), reference__offload=True, **common))
    assert plain["memory"]["reference_offloaded_bytes"] == 0
    assert offloaded["memory"]["reference_offloaded_bytes"] > 0
    assert offloaded["after"] == plain["after"]  # held-out metrics, reference margins included
    records = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("offloaded", "plain")]
    strip = [[{k: v for k, v in r.items() if not k.startswith(("time", "seconds", "tokens_per"))} for r in rs]
             for rs in records]
    assert strip[0] == strip[1]
    expected = load_file(os.path.join(tmp_path / "plain", "final_model", "model.safetensors"))
    for name, tensor in load_file(os.path.join(tmp_path / "offloaded", "final_model", "model.safetensors")).items():
        assert torch.equal(tensor, expected[name]), name


def test_lora_has_no_reference_to_offload(tiny_recipe):
    with pytest.raises(UserError, match="reference.offload has nothing to offload with LoRA") as error:
        load_recipe(str(tiny_recipe(peft__enabled=True, reference__offload=True)))
    assert "reference.name" in str(error.value)


def test_sharded_engines_refuse_it_before_writing(tiny_recipe, tmp_path, monkeypatch):
    """Under FSDP / ZeRO-3 (the engine shards the reference with the policy) the run stops with a UserError that names
    the engine and the key, and no run directory is written. The engine is stood in for: one CPU process cannot
    run FSDP here, and the refusal reads only which engine it is."""
    monkeypatch.setattr(run_setup, "shards_parameters", lambda accelerator: True)
    monkeypatch.setattr(run_setup, "engine_name", lambda accelerator: "fsdp2")
    with pytest.raises(UserError, match="reference.offload keeps a whole reference model in host memory, but under "
                                        "fsdp2"):
        run(tiny_recipe(reference__offload=True, **QUIET))
    assert not (tmp_path / "run").exists()
