"""`training.liger_kernels` (issue 18, the uncompiled gap): Liger-Kernel's fused RMSNorm, rotary embedding and
SiLU-and-multiply where the decoder runs eagerly on CUDA. On CPU: the decision for every setting, the refusal of
`true` through the CLI, and that a model given the kernels runs transformers' own code off CUDA (the same values
and gradients as an untouched copy, bit for bit). On a GPU (marker `gpu`, liger-kernel installed): log-probs and
gradients against transformers' code, and that the kernels are what ran."""

import copy
import sys

import pytest
import torch
from conftest import align
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from align_cli import liger_kernels
from align_cli.chunked_mlp import chunk_mlps
from align_cli.errors import UserError
from align_cli.liger_kernels import _fusable, liger_decision, restore_rotary, use_liger_kernels


def tiny(kind="llama", layers=2, checkpointing=False, dtype=torch.float32):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(dtype).train()


@pytest.fixture
def restores_rotary():
    """The rotary dispatcher replaces a module-level function process-wide: transformers' is back afterwards."""
    def modeling_of(model):
        return sys.modules[type(model.model.layers[0].self_attn).__module__]
    yield modeling_of
    restore_rotary()


def loss_and_gradients(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def ids(tokens=48, rows=2, seed=1, device="cpu"):
    return torch.randint(0, 128, (rows, tokens), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("setting, device, compiled, model_type, available, expected", [
    (False, "cuda", False, "llama", True, (False, "training.liger_kernels: false")),
    (True, "cuda", True, "qwen2", True, (True, "training.liger_kernels: true")),
    ("auto", "cuda", False, "qwen2", True, (True, "auto: CUDA, decoder layers run eagerly")),
    ("auto", "cuda", True, "qwen2", True, (False, "auto: the decoder layers are compiled (inductor fuses the same "
                                                  "code)")),
    ("auto", "cpu", False, "llama", True, (False, "auto: needs a CUDA device (Liger's kernels are Triton kernels "
                                                  "for GPUs)")),
    ("auto", "cuda", False, "llama", False, (False, "auto: needs liger-kernel, which is not installed or does not "
                                                    "import (pip install liger-kernel, or this package's [gpu] "
                                                    "extra)")),
    ("auto", "cuda", False, "gemma2", True, (False, "auto: needs a model type in llama, mistral, qwen2, qwen3 (this "
                                                    "model is 'gemma2')")),
])
def test_the_decision_for_each_setting(setting, device, compiled, model_type, available, expected, monkeypatch):
    monkeypatch.setattr(liger_kernels, "liger_available", lambda: available)
    assert liger_decision(setting, device_type=device, compiled=compiled, model_type=model_type) == expected


@pytest.mark.parametrize("device, model_type, available, names", [
    ("cpu", "llama", True, "a CUDA device"),
    ("cuda", "llama", False, "pip install liger-kernel"),
    ("cuda", "gemma2", True, "'gemma2'"),
])
def test_true_where_the_kernels_cannot_run_is_the_users_error(device, model_type, available, names, monkeypatch):
    monkeypatch.setattr(liger_kernels, "liger_available", lambda: available)
    with pytest.raises(UserError, match="training.liger_kernels: true needs") as raised:
        liger_decision(True, device_type=device, compiled=False, model_type=model_type)
    assert names in str(raised.value) and "training.liger_kernels: auto" in str(raised.value)


def test_an_install_that_does_not_import_counts_as_missing(monkeypatch):
    """liger-kernel present to the finder but failing to import (a broken Triton): not available, so `auto` is off
    and `true` refused at setup, not a crash at the first forward."""
    monkeypatch.setattr(liger_kernels.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)  # import raises ImportError
    assert not liger_kernels.liger_available()


def test_true_on_this_cpu_exits_2_naming_the_key_before_writing(monkeypatch, capsys, tiny_recipe, tmp_path):
    """Through `align train`: exit 2, one line naming the key and the fix, no traceback, no run directory left."""
    recipe = tiny_recipe(training__liger_kernels=True, evaluation__task=None)
    code, out, err = align(monkeypatch, capsys, "train", str(recipe))
    assert code == 2, (out, err)
    assert "training.liger_kernels: true needs a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_off_cuda_a_model_with_the_kernels_runs_transformers_code(kind, restores_rotary):
    """CPU tensors take the classes' own forwards and transformers' rotary function: loss and every gradient equal
    an untouched copy's exactly, with checkpointing too; names and the state dict do not change; a second call
    changes nothing more (the rotary function is wrapped once)."""
    for checkpointing in (False, True):
        plain = tiny(kind, checkpointing=checkpointing)
        fused = copy.deepcopy(plain)
        modeling = restores_rotary(fused)
        names = list(fused.state_dict())
        assert use_liger_kernels(fused) == {"norms": 5, "mlps": 2, "rotary": [modeling.__name__]}
        wrapped = modeling.apply_rotary_pos_emb
        assert use_liger_kernels(fused)["norms"] == 5 and modeling.apply_rotary_pos_emb is wrapped
        assert not hasattr(wrapped.align_original, "align_original")
        assert list(fused.state_dict()) == names
        restore_rotary()
        assert modeling.apply_rotary_pos_emb is wrapped.align_original
        use_liger_kernels(fused)
        batch = ids()
        expected_loss, expected = loss_and_gradients(plain, batch)
        loss, gradients = loss_and_gradients(fused, batch)
        assert torch.equal(loss, expected_loss)
        for name, gradient in gradients.items():
            assert torch.equal(gradient, expected[name]), name


def test_the_chunked_mlp_runs_the_fused_forward_and_a_copy_keeps_its_own(restores_rotary):
    """`training.mlp_chunk_tokens` after the kernels: each chunk goes through the fused MLP forward (the one it
    replaced), and a deep copy (an iterative loop's snapshot) is bound to its own modules."""
    model = tiny()
    restores_rotary(model)
    use_liger_kernels(model)
    chunk_mlps(model, 64)
    mlp = model.model.layers[0].mlp
    assert mlp.align_mlp_whole_forward.__func__ is liger_kernels._mlp_forward
    copied = copy.deepcopy(model).model.layers[0].mlp
    assert copied.align_mlp_whole_forward.__self__ is copied and copied.forward.__self__ is copied


def test_a_cpu_run_reports_why_the_kernels_are_off(tiny_recipe):
    """summary.json's `liger_kernels` on this CPU: off, and why."""
    from align_cli.pairwise.trainer import train
    from align_cli.recipe import load_recipe

    path = tiny_recipe(training__max_steps=1, evaluation__task=None, checkpointing__every=None,
                       output__save_final_model=False, logging__tensorboard=False)
    summary = train(*load_recipe(str(path)))
    assert summary["liger_kernels"] == {"enabled": False,
                                        "why": "auto: needs a CUDA device (Liger's kernels are Triton kernels for "
                                               "GPUs)"}


# ---------------------------------------------------------------------------------------------------- on a GPU

def _needs_liger():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("liger_kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_on_cuda_the_kernels_match_transformers_code(kind, checkpointing, restores_rotary, monkeypatch):
    """bf16 on CUDA, a row of 512 tokens: loss within bf16 rounding of transformers' code, every gradient close
    (relative to its own scale), and Liger's three functions are what ran (counted), forward and recompute."""
    _needs_liger()
    from liger_kernel.transformers import functional

    calls = {"liger_rms_norm": 0, "liger_swiglu": 0, "liger_rope": 0}
    for name in calls:
        original = getattr(functional, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(functional, name, counted)
    plain = tiny(kind, checkpointing=checkpointing, dtype=torch.bfloat16).cuda()
    fused = copy.deepcopy(plain)
    batch = ids(tokens=512, device="cuda")
    expected_loss, expected = loss_and_gradients(plain, batch)  # before the rotary dispatcher exists
    restores_rotary(fused)
    use_liger_kernels(fused)
    loss, gradients = loss_and_gradients(fused, batch)
    passes = 2 if checkpointing else 1  # the layers' forward runs again in backward
    assert calls == {"liger_rms_norm": 4 * passes + 1, "liger_swiglu": 2 * passes, "liger_rope": 2 * passes}
    torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=2e-2)
    for name, gradient in gradients.items():
        error = (gradient.float() - expected[name].float()).norm() / expected[name].float().norm().clamp_min(1e-12)
        assert error < 0.05, (name, float(error))


@pytest.mark.gpu
def test_compiled_tracing_and_graph_capture_take_transformers_code():
    """Inside torch.compile (fast generation's decode step, compiled layers) and during CUDA-graph capture the
    dispatch says no; on the same CUDA tensor eagerly it says yes."""
    _needs_liger()
    x = torch.ones(4, device="cuda")
    assert _fusable(x)
    assert torch.compile(lambda t: t + float(_fusable(t)), fullgraph=True)(x).tolist() == [1.0] * 4
    graph, seen = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        seen.append(_fusable(x))
        x.add_(1.0)  # something to capture
    assert seen == [False]
