"""The two memory levers of the pairwise trainer (issue 18): `training.optimizer_in_backward` (each parameter's AdamW
step inside backward, its gradient freed) and `training.offload_activations` (checkpointed layer inputs in CPU
memory). References: torch.optim.AdamW (fused: bit for bit; the normal path's default kernel: to rounding), the
run without the lever, an uninterrupted run."""

import copy
import json
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from align_cli import activation_offload
from align_cli.activation_offload import ActivationOffload
from align_cli.checkpoint import list_checkpoints
from align_cli.divergence import TrainingDiverged
from align_cli.errors import UserError
from align_cli.lifecycle import Interrupted
from align_cli.models import decoder
from align_cli.optimizer_in_backward import STEP_OUTCOME, AdamWInBackward
from align_cli.pairwise import trainer as pairwise_trainer
from align_cli.recipe import load_recipe

IN_BACKWARD = dict(training__optimizer_in_backward=True, training__max_grad_norm=None)
QUIET = dict(evaluation__task=None, logging__tensorboard=False)


def run(path, **kwargs):
    recipe, recipe_path = load_recipe(str(path))
    return pairwise_trainer.train(recipe, recipe_path, **kwargs)


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "final_model", "model.safetensors"))


def train_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # CUDA: the fused kernel and the copy stream


def tiny_llama(layers=2, checkpointing=False, device="cpu", hidden=32, intermediate=64, attention="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation=attention)
    model = LlamaForCausalLM(config).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def token_batches(count, seed=1, device="cpu", tokens=16):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, tokens), generator=generator).to(device) for _ in range(count)]


def train_by_hand(model, optimizer, batches, accumulation=1) -> list[float]:
    """Steps of `accumulation` micro-batches each; returns the gradient norm of every step (the optimiser's own in
    backward, else clip_grad_norm_'s to +inf, as divergence.gradient_norm takes it)."""
    in_backward = isinstance(optimizer, AdamWInBackward)
    norms = []
    for start in range(0, len(batches), accumulation):
        for k, ids in enumerate(batches[start:start + accumulation]):
            loss = model(input_ids=ids, labels=ids).loss / accumulation
            if in_backward:
                optimizer.begin_backward(stepping=k == accumulation - 1)
            loss.backward()
        norms.append(optimizer.end_backward() if in_backward else
                     float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def nan_gradient(_module, _args, output) -> None:
    """A forward hook: the gradient reaching this module's output in backward becomes NaN (the loss stays finite)."""
    (output[0] if isinstance(output, tuple) else output).register_hook(lambda grad: grad * float("nan"))


SETTINGS = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


# ---------------------------------------------------------------- optimizer in backward: the optimiser itself


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accumulation", [1, 2])
def test_in_backward_equals_torch_adamw(accumulation, device):
    """6 micro-batches (6 or 3 steps), float32, weight decay on: bit for bit torch.optim.AdamW(fused=True) stepped
    after backward, with the same state_dict (the checkpoint's layout); within rounding of the default AdamW kernel
    the normal path runs (single-tensor on CPU, multi-tensor on CUDA)."""
    reference_model, fused_model, model = (tiny_llama(device=device) for _ in range(3))
    normal = torch.optim.AdamW(reference_model.parameters(), **SETTINGS)
    fused = torch.optim.AdamW(fused_model.parameters(), fused=True, **SETTINGS)
    in_backward = AdamWInBackward(model.parameters(), **SETTINGS)
    batches = token_batches(6, device=device)
    norms = train_by_hand(model, in_backward, batches, accumulation)
    fused_norms = train_by_hand(fused_model, fused, batches, accumulation)
    normal_norms = train_by_hand(reference_model, normal, batches, accumulation)
    for (name, p), q, r in zip(model.named_parameters(), fused_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, tiny_llama(device=device).get_parameter(name)), f"{name} never stepped"
    assert norms == pytest.approx(fused_norms, rel=1e-5) and norms == pytest.approx(normal_norms, rel=1e-5)
    ours, theirs = in_backward.state_dict(), fused.state_dict()
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for index, state in ours["state"].items():
        assert state.keys() == theirs["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(state[key], theirs["state"][index][key]) for key in state)
    assert all(p.grad is None for p in model.parameters())


def test_in_backward_continues_a_normal_path_checkpoint():
    """--resume --allow-recipe-change from a checkpoint of the normal path (fused: None, steps on the CPU): it loads
    into the fused kernel (torch's own AdamW would fall back to the saved group's kernel) and the next steps equal
    the normal path's continuation to rounding."""
    model, batches = tiny_llama(), token_batches(4)
    normal = torch.optim.AdamW(model.parameters(), **SETTINGS)
    train_by_hand(model, normal, batches[:2])
    continued = copy.deepcopy(model)
    in_backward = AdamWInBackward(continued.parameters(), **SETTINGS)
    in_backward.load_state_dict(copy.deepcopy(normal.state_dict()))
    assert in_backward.param_groups[0]["fused"] is True
    train_by_hand(model, normal, batches[2:])
    train_by_hand(continued, in_backward, batches[2:])
    for (name, p), q in zip(continued.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert float(in_backward.state[p]["step"]) == 4.0, name


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_gradient_never_reaches_weights_or_moments(device):
    """A NaN injected into the gradient of layer 0's output at step 2 (the loss stays finite): layer 1 and the final
    norm, whose gradients come first, step with finite values; layer 0 and the (tied) embedding, whose gradients are
    NaN, keep their weights, moments and step count bit for bit; the norm is NaN."""
    model = tiny_llama(device=device)
    optimizer = AdamWInBackward(model.parameters(), **SETTINGS)
    first, second = token_batches(2, device=device)
    train_by_hand(model, optimizer, [first])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}

    handle = decoder(model).layers[0].register_forward_hook(nan_gradient)
    loss = model(input_ids=second, labels=second).loss
    handle.remove()
    assert torch.isfinite(loss)
    optimizer.begin_backward(stepping=True)
    loss.backward()
    norm = optimizer.end_backward()
    assert norm != norm  # NaN: the loop stops the run here (TrainingDiverged)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        state = optimizer.state[p]
        assert all(torch.isfinite(v).all() for v in state.values()), name
        skipped = name.startswith(("model.layers.0.", "model.embed_tokens"))
        assert torch.equal(p, before[name]) == skipped, name
        if skipped:
            assert all(torch.equal(state[k], moments[name][k]) for k in state), name
        else:
            assert float(state["step"]) == 2.0, name


# ---------------------------------------------------------------- optimizer in backward: through the trainer


def test_trainer_in_backward_matches_the_normal_step(tiny_recipe, tmp_path):
    """4 steps of 2 micro-batches, no clipping: the same weights (to float32 rounding of the two AdamW kernels), losses
    and gradient norms as the normal path; summary.json says which ran."""
    common = dict(training__max_grad_norm=None, training__gradient_accumulation_steps=2, training__batch_size=2,
                  checkpointing__every=None, **QUIET)
    normal = run(tiny_recipe(output__dir=str(tmp_path / "normal"), **common))
    ours = run(tiny_recipe(output__dir=str(tmp_path / "ours"), training__optimizer_in_backward=True, **common))
    assert normal["memory"]["optimizer_in_backward"] is False and ours["memory"]["optimizer_in_backward"] is True
    expected = final_weights(tmp_path / "normal")
    for name, tensor in final_weights(tmp_path / "ours").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    for mine, theirs in zip(train_records(tmp_path / "ours"), train_records(tmp_path / "normal"), strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert mine["learning_rate"] == theirs["learning_rate"]


def test_trainer_in_backward_resume_matches_uninterrupted(tiny_recipe, tmp_path):
    """SIGINT after step 2, --resume: the optimiser state comes back from the checkpoint and steps 3-4 give the
    straight run's weights bit for bit (cosine schedule with warm-up, so the LR state matters too)."""
    common = dict(training__lr_scheduler="cosine", training__warmup_steps=1, **IN_BACKWARD, **QUIET)
    run(tiny_recipe(output__dir=str(tmp_path / "straight"), **common))
    interrupted = tiny_recipe(output__dir=str(tmp_path / "interrupted"), checkpointing__every=100, **common)

    def kill_after_two(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run(interrupted, on_step_end=kill_after_two)
    run(interrupted, resume=True)
    expected = final_weights(tmp_path / "straight")
    for name, tensor in final_weights(tmp_path / "interrupted").items():
        assert torch.equal(tensor, expected[name]), name
    losses = [r["loss"] for r in train_records(tmp_path / "interrupted")]
    assert losses == [r["loss"] for r in train_records(tmp_path / "straight")]


def test_trainer_in_backward_non_finite_gradient_stops_with_finite_weights(tiny_recipe, tmp_path, monkeypatch):
    """The NaN injected as above, through the trainer at step 2: TrainingDiverged saying what happened to the step;
    step 1's checkpoint is the only one; the live weights are finite, and layer 0 and the embedding still equal that
    checkpoint."""
    forward, seen = pairwise_trainer.objective_forward, []

    def nan_gradient_at_step_two(model, *args, **kwargs):
        seen.append(model)
        handle = None
        if len(seen) == 2:
            handle = decoder(model).layers[0].register_forward_hook(nan_gradient)
        try:
            return forward(model, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(pairwise_trainer, "objective_forward", nan_gradient_at_step_two)
    with pytest.raises(TrainingDiverged) as error:
        run(tiny_recipe(checkpointing__every=1, checkpointing__keep_last=5, **IN_BACKWARD, **QUIET))
    message = str(error.value)
    assert "at step 2: the gradient norm became nan (the loss" in message and STEP_OUTCOME in message
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step-0000001"] and "step-0000001" in message
    saved = load_file(checkpoints[0] / "model.safetensors")
    for name, parameter in seen[-1].named_parameters():
        assert torch.isfinite(parameter).all(), name
        if name.startswith(("model.layers.0.", "model.embed_tokens")):
            assert torch.equal(parameter.detach(), saved[name]), name
    assert all(p.grad is None for p in seen[-1].parameters())


@pytest.mark.parametrize("overrides, words", [
    ({"training.optimizer_in_backward": True}, ["training.max_grad_norm (1.0)", "training.max_grad_norm: null"]),
    ({**{f"training.{k.split('__')[1]}": v for k, v in IN_BACKWARD.items()}, "training.precision": "fp16"},
     ["training.precision: fp16", "grad scaler"]),
    ({"training.offload_activations": True}, ["training.gradient_checkpointing: true"]),
])
def test_refused_combinations(tiny_recipe, overrides, words):
    with pytest.raises(UserError) as error:
        load_recipe(str(tiny_recipe()), [f"{k}={'null' if v is None else str(v).lower()}" for k, v in overrides.items()])
    assert all(word in str(error.value) for word in words), str(error.value)


@pytest.mark.parametrize("key", ["optimizer_in_backward", "offload_activations"])
def test_online_rl_refuses_the_levers(key):
    extra = ["training.max_grad_norm=null"] if key == "optimizer_in_backward" else ["training.gradient_checkpointing=true"]
    with pytest.raises(UserError, match=f"training.{key} is implemented by the pairwise trainer"):
        load_recipe("recipes/grpo.yaml", [f"training.{key}=true", *extra])


@pytest.mark.parametrize("environment, engine", [({"WORLD_SIZE": "2"}, "DDP (2 processes)"),
                                                 ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
                                                 ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed")])
def test_in_backward_refuses_other_engines_before_writing(tiny_recipe, tmp_path, monkeypatch, environment, engine):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=re.escape(f"one process only, not under {engine}:")):
        run(tiny_recipe(**IN_BACKWARD, **QUIET))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- activation offloading


@pytest.mark.parametrize("device", DEVICES)
def test_offload_moves_the_checkpointed_layer_inputs_and_changes_no_gradient(device):
    """3 checkpointed layers: each layer's input goes through the hooks (and nothing that is a parameter); the
    gradients are bit-equal to the run without; the hooks come off with `remove`."""
    plain, offloaded = (tiny_llama(3, checkpointing=True, device=device) for _ in range(2))
    ids = token_batches(1, device=device)[0]
    plain(input_ids=ids, labels=ids).loss.backward()
    hidden_bytes = ids.numel() * 32 * 4
    offload = ActivationOffload(offloaded, min_bytes=hidden_bytes)  # the [2, 16, 32] float32 hidden states and up
    packed, pack = [], offload._pack

    def recording(tensor):  # the hooks read `_pack` when the decoder's forward begins
        kept = pack(tensor)
        if kept is not tensor:
            assert not isinstance(tensor, torch.nn.Parameter)
            packed.append(tensor.grad_fn.name() if tensor.grad_fn else None)
        return kept

    offload._pack = recording
    offloaded(input_ids=ids, labels=ids).loss.backward()
    # the embedding's output, layers 0 and 1's outputs (inputs of layers 0-2), and what the final norm keeps
    assert packed[:3] == ["EmbeddingBackward0", "AddBackward0", "AddBackward0"]
    assert offload.report() == {"tensors": len(packed), "bytes": len(packed) * hidden_bytes}
    for (name, p), q in zip(offloaded.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    offload.remove()
    offloaded(input_ids=ids, labels=ids).loss.backward()
    assert offload.report()["tensors"] == len(packed)  # not counted again


def test_trainer_offload_is_bit_identical(tiny_recipe, tmp_path, monkeypatch):
    """With gradient checkpointing, with and without offloading (every tensor moved: MIN_BYTES 0), and with the
    optimizer in backward too: the same losses and weights bit for bit."""
    monkeypatch.setattr(activation_offload, "MIN_BYTES", 0)
    common = dict(training__gradient_checkpointing=True, checkpointing__every=None, **QUIET)
    run(tiny_recipe(output__dir=str(tmp_path / "plain"), **common))
    summary = run(tiny_recipe(output__dir=str(tmp_path / "offload"), training__offload_activations=True, **common))
    assert summary["memory"]["offloaded_activations"]["tensors"] >= 2  # the two layers' inputs at least
    run(tiny_recipe(output__dir=str(tmp_path / "in_backward"), **IN_BACKWARD, **common))
    run(tiny_recipe(output__dir=str(tmp_path / "both"), training__offload_activations=True, **IN_BACKWARD, **common))
    for with_it, without in (("offload", "plain"), ("both", "in_backward")):
        expected = final_weights(tmp_path / without)
        for name, tensor in final_weights(tmp_path / with_it).items():
            assert torch.equal(tensor, expected[name]), f"{with_it}: {name}"
        numbers = [[(r["loss"], r["grad_norm"]) for r in train_records(tmp_path / name)] for name in (with_it, without)]
        assert numbers[0] == numbers[1], with_it


@pytest.mark.gpu
def test_offload_lowers_the_cuda_peak_and_keeps_the_gradients():
    """32 checkpointed layers whose inputs (8 MiB each in bf16) outweigh one layer's recomputation: offloading
    lowers the peak of forward + backward by at least half of those inputs, with bit-equal gradients. Exercises the
    copy stream and the prefetch of the previous layer's input. Eager attention: SDPA's memory-efficient backward
    on CUDA is not deterministic (two plain runs differ), the eager one is (checked)."""
    def peak_and_gradients(offload: bool):
        model = tiny_llama(32, checkpointing=True, device="cuda", hidden=512, intermediate=512,
                           attention="eager").to(torch.bfloat16)
        ids = token_batches(1, device="cuda", tokens=4096)[0]
        hooks = ActivationOffload(model) if offload else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        if hooks is not None:
            assert hooks.report()["tensors"] >= 32
            hooks.remove()
        return peak, {name: p.grad for name, p in model.named_parameters()}

    plain_peak, plain = peak_and_gradients(False)
    assert all(torch.equal(grad, plain[name]) for name, grad in peak_and_gradients(False)[1].items())
    offload_peak, offloaded = peak_and_gradients(True)
    inputs = 32 * 2 * 4096 * 512 * 2
    assert plain_peak - offload_peak >= inputs / 2, (plain_peak, offload_peak, inputs)
    for name, grad in plain.items():
        assert torch.equal(offloaded[name], grad), name


@pytest.mark.gpu
def test_in_backward_lowers_the_cuda_peak():
    """bf16 weights: the normal step's peak holds every gradient and the multi-tensor temporary; stepping in backward
    holds neither (a wide MLP, so the weights dominate the activations)."""
    def peak(in_backward: bool):
        model = tiny_llama(4, device="cuda", hidden=1024, intermediate=8192).to(torch.bfloat16)
        parameters = list(model.parameters())
        optimizer = (AdamWInBackward if in_backward else torch.optim.AdamW)(parameters, **SETTINGS)
        batches = token_batches(3, device="cuda", tokens=64)
        train_by_hand(model, optimizer, batches[:1])  # the moments exist from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_by_hand(model, optimizer, batches[1:])
        torch.cuda.synchronize()
        if in_backward:
            optimizer.remove_hooks()
        return torch.cuda.max_memory_allocated(), sum(p.numel() * p.element_size() for p in parameters)

    (normal, weights), (ours, _) = peak(False), peak(True)
    assert normal - ours >= 1.5 * weights, (normal, ours, weights)  # G + the temporary, less what backward keeps
