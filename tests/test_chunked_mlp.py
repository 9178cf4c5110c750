"""`training.mlp_chunk_tokens` (issue 18's memory levers): each decoder MLP over chunks of tokens, each checkpointed.
References: the same model with its MLP over the whole row (values and gradients), torch's memory tracker's count
of live bytes for the peak, and a run without the key through the trainer."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from align_cli import chunked_mlp
from align_cli.chunked_mlp import chunk_mlps
from align_cli.compilation import compile_layers
from align_cli.errors import UserError
from align_cli.pairwise import trainer as pairwise_trainer
from align_cli.recipe import load_recipe

QUIET = dict(evaluation__task=None, logging__tensorboard=False, checkpointing__every=None)


def tiny(kind="llama", intermediate=96, layers=2, checkpointing=False):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = (LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def loss_and_gradients(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def ids(tokens=100, rows=2, seed=1):
    return torch.randint(0, 128, (rows, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_mlp_gives_the_whole_rows_loss_and_gradients(kind, checkpointing):
    """200 tokens in chunks of 64 (the last one short): loss and every gradient equal the unchunked model's to
    float32 rounding; the state dict's names do not change."""
    whole, chunked = tiny(kind, checkpointing=checkpointing), tiny(kind, checkpointing=checkpointing)
    names = list(chunked.state_dict())
    assert chunk_mlps(chunked, 64) == 2
    assert list(chunked.state_dict()) == names
    batch = ids()
    expected_loss, expected = loss_and_gradients(whole, batch)
    loss, gradients = loss_and_gradients(chunked, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunks_run_only_while_gradients_are_recorded(monkeypatch):
    """Under no_grad (evaluation, the reference, generation) and for rows no longer than a chunk the MLP runs its
    own forward: the chunk loop is never entered."""
    calls = []
    original = chunked_mlp._run_in_chunks
    monkeypatch.setattr(chunked_mlp, "_run_in_chunks", lambda *a: calls.append(a[1]) or original(*a))
    model = tiny()
    chunk_mlps(model, 64)
    with torch.no_grad():
        model(input_ids=ids())
    assert calls == []
    model(input_ids=ids(tokens=32))  # 64 tokens: one chunk
    assert calls == []
    model(input_ids=ids(tokens=40))  # 80 tokens: chunked, in both layers
    assert calls == [64, 64]


def test_chunking_again_replaces_the_chunk_size_and_a_copy_chunks_its_own_mlps():
    """A second call sets the new size; a deep copy of a chunked model (an iterative loop's snapshot) runs its own
    weights, chunked, not the original's."""
    model = tiny()
    chunk_mlps(model, 64)
    assert chunk_mlps(model, 128) == 2
    mlp = model.model.layers[0].mlp
    assert mlp.align_mlp_chunk_tokens == 128 and mlp.forward.__self__ is mlp
    assert chunk_mlps(model, None) == 0
    copied = copy.deepcopy(model)
    assert copied.model.layers[0].mlp.forward.__self__ is copied.model.layers[0].mlp
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.mul_(0.5)
    batch = ids()
    expected = tiny()
    with torch.no_grad():
        for parameter in expected.parameters():
            parameter.mul_(0.5)
    torch.testing.assert_close(loss_and_gradients(copied, batch)[0], loss_and_gradients(expected, batch)[0])


def peak_bytes_of_backward(model, batch) -> int:
    """The peak of live CPU bytes (parameters, gradients, activations, temporaries) during one forward + backward,
    as torch's own memory tracker counts them (torch.distributed._tools.mem_tracker: every tensor storage created,
    until it is freed)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(input_ids=batch, labels=batch).loss.backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_mlp_lowers_the_peak(checkpointing):
    """A wide MLP (intermediate 2048) over 2,048 tokens: gate, up, their product and their gradients are 16 MiB
    apiece over the whole row, 1 MiB in chunks of 128 tokens. The tracked peak falls below a third (measured:
    175 -> 14 MB without checkpointing, 106 -> 13 MB with)."""
    whole = tiny(intermediate=2048, layers=2, checkpointing=checkpointing)
    chunked = tiny(intermediate=2048, layers=2, checkpointing=checkpointing)
    chunk_mlps(chunked, 128)
    batch = ids(tokens=1024)
    full, tiled = peak_bytes_of_backward(whole, batch), peak_bytes_of_backward(chunked, batch)
    assert tiled < full / 3, (full / 2**20, tiled / 2**20)


def test_compiled_layers_compile_around_the_chunked_mlp(monkeypatch):
    """Regional compilation (aot_eager on CPU) of layers whose MLP is chunked: the same loss and gradients as the
    uncompiled chunked model, no fallback to eager, and a second row length does not fail."""
    monkeypatch.setenv("ALIGN_COMPILE_BACKEND", "aot_eager")
    eager, compiled = tiny(checkpointing=True), tiny(checkpointing=True)
    chunk_mlps(eager, 64), chunk_mlps(compiled, 64)
    layers = compile_layers(compiled)
    for tokens in (100, 72):
        expected_loss, expected = loss_and_gradients(eager, ids(tokens=tokens))
        loss, gradients = loss_and_gradients(compiled, ids(tokens=tokens))
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
        for name, gradient in gradients.items():
            torch.testing.assert_close(gradient, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert layers.report()["fell_back"] is None


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_trainer_with_chunked_mlps_matches_the_run_without(tiny_recipe, tmp_path, monkeypatch):
    """4 DPO steps with gradient checkpointing, MLPs in chunks of 64 tokens (each micro-batch has more): the same
    losses as without, to float32 rounding; summary.json says how many MLPs ran chunked."""
    calls = []
    original = chunked_mlp._run_in_chunks
    monkeypatch.setattr(chunked_mlp, "_run_in_chunks", lambda *a: calls.append(1) or original(*a))
    common = dict(training__gradient_checkpointing=True, **QUIET)
    plain = pairwise_trainer.train(*load_recipe(str(tiny_recipe(output__dir=str(tmp_path / "plain"), **common))))
    assert calls == []
    chunked = pairwise_trainer.train(*load_recipe(str(tiny_recipe(output__dir=str(tmp_path / "chunked"),
                                                                  training__mlp_chunk_tokens=64, **common))))
    assert calls, "no micro-batch was long enough to be chunked"
    assert plain["memory"]["chunked_mlps"] == 0 and plain["memory"]["mlp_chunk_tokens"] is None
    assert chunked["memory"]["chunked_mlps"] > 0 and chunked["memory"]["mlp_chunk_tokens"] == 64
    assert train_losses(tmp_path / "chunked") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-5)


def test_a_chunk_below_64_tokens_is_refused(tiny_recipe):
    with pytest.raises(UserError) as error:
        load_recipe(str(tiny_recipe()), ["training.mlp_chunk_tokens=8"])
    assert "training.mlp_chunk_tokens" in str(error.value) and "64" in str(error.value)


def test_the_fast_decode_step_still_compiles_whole_with_chunked_mlps():
    """Generation runs without gradients, so a chunked MLP is its own forward there: the fast path's compiled
    decode step (aot_eager) traces it without a break and gives the unchunked model's tokens."""
    from align_cli import fast_generation
    from align_cli.fast_generation import Sampling, fast_generate

    plain, chunked = tiny().eval(), tiny().eval()
    chunk_mlps(chunked, 64)
    prompts, sampling = [[1, 7, 9, 11], [3, 4, 5, 6, 8, 10]], Sampling(1.0, 1.0, seed=5)
    expected = fast_generate(plain, prompts, 2, 10, sampling, {5}, compile_step=False)
    out = fast_generate(chunked, prompts, 2, 10, sampling, {5},
                        compile_step=fast_generation.Compile(backend="aot_eager"))
    assert out.stats.get("compiled", 0) >= 1 and "compile_error" not in out.stats
    assert out.tokens == expected.tokens
