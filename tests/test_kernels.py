"""Fused linear -> log-prob kernels against a float64 reference that materialises the logits.

CPU tests exercise the chunked torch path; tests marked `gpu` exercise the Triton path (both
strategies) and are skipped without CUDA.
Inputs are drawn fresh on every run; the seed is in every failure message.
"""

from __future__ import annotations

import random

import pytest
import torch
from align_cli.kernels import chunked, linear_logprobs, resolve_backend, triton_fused, triton_logprobs

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm()).item()


def make_inputs(n, h, v, dtype, gen, *, device="cpu", with_bias=False, ignore_every=0):
    # Logits with a spread like a trained LM head's (std ~3), never zeros.
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=gen) * (3.0 / h**0.5)).to(device=device, dtype=dtype)
    bias = torch.randn(v, generator=gen).to(device=device, dtype=dtype) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    edges = [0, v - 1] + ([31, 32] if v > 32 else [])  # vocabulary edges, a chunk boundary
    labels[: min(n, len(edges))] = torch.tensor(edges[:n])
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, bias, labels.to(device)


def reference(hidden, weight, bias, labels, temperature=1.0):
    """float64 log-probs and entropy (0 at ignored positions) with leaf copies of the inputs."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    z = h @ w.t() + (0 if b is None else b)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != -100
    logprobs = log_p.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * valid
    entropy = -(log_p.exp() * log_p).sum(-1) * valid
    return (h, w, b), logprobs, entropy


def check_against_reference(gen, n, h, v, dtype, *, with_entropy, temperature=1.0, with_bias=False,
                            ignore_every=0, device="cpu", entropy_grad_only=False, **kwargs):
    hidden, weight, bias, labels = make_inputs(n, h, v, dtype, gen, device=device, with_bias=with_bias,
                                               ignore_every=ignore_every)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    logprobs, entropy = linear_logprobs(hidden, weight, labels, with_entropy=with_entropy,
                                        temperature=temperature, bias=bias, **kwargs)
    ref_leaves, ref_logprobs, ref_entropy = reference(hidden, weight, bias, labels, temperature)
    up_lp = torch.randn(n, generator=gen).to(device)
    up_ent = torch.randn(n, generator=gen).to(device)
    loss = 0 if entropy_grad_only else (logprobs * up_lp).sum()
    ref_loss = 0 if entropy_grad_only else (ref_logprobs * up_lp.double()).sum()
    if with_entropy:
        loss = loss + (entropy * up_ent).sum()
        ref_loss = ref_loss + (ref_entropy * up_ent.double()).sum()
    loss.backward()
    ref_loss.backward()

    tol, seed = TOLERANCE[dtype], gen.initial_seed()
    assert logprobs.dtype == torch.float32 and logprobs.shape == (n,)
    assert rel_err(logprobs, ref_logprobs) < tol, f"logprobs, seed {seed}"
    if with_entropy:
        assert entropy.dtype == torch.float32
        assert rel_err(entropy, ref_entropy) < tol, f"entropy, seed {seed}"
    else:
        assert entropy is None
    for name, leaf, ref_leaf in zip(("dH", "dW", "dbias"), leaves, [t for t in ref_leaves if t is not None]):
        assert leaf.grad.dtype == leaf.dtype
        assert rel_err(leaf.grad, ref_leaf.grad) < tol, f"{name}, seed {seed}"
    return hidden, labels


# ---------------------------------------------------------------- CPU: chunked torch path
# Small chunks so that N=37 is not a multiple of the token chunk and V=101 not of the vocabulary chunk.
SMALL_CHUNKS = {"token_chunk": 16, "vocab_chunk": 32}


@pytest.fixture
def small_chunks(monkeypatch):
    # chunked_linear_logprobs binds its chunk defaults at definition time: wrap it with small ones.
    original = chunked.chunked_linear_logprobs

    def small(*args, **kwargs):
        return original(*args, **kwargs, **SMALL_CHUNKS)

    monkeypatch.setattr("align_cli.kernels.chunked_linear_logprobs", small)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_torch_path_matches_float64(gen, small_chunks, dtype, with_entropy):
    check_against_reference(gen, 37, 24, 101, dtype, with_entropy=with_entropy, backend="torch")


@pytest.mark.parametrize("with_entropy", [False, True])
def test_single_tile_path_matches_float64(gen, with_entropy):
    # N x V within one tile's budget: plain autograd over the one tile (the CPU fast path).
    assert 37 * 101 <= chunked.TOKEN_CHUNK * chunked.VOCAB_CHUNK
    check_against_reference(gen, 37, 24, 101, torch.float32, with_entropy=with_entropy, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_temperature_bias_and_ignored_rows(gen, small_chunks, dtype):
    hidden, labels = check_against_reference(gen, 45, 20, 77, dtype, with_entropy=True, temperature=0.7,
                                             with_bias=True, ignore_every=3, backend="torch")
    ignored = labels == -100
    assert (hidden.grad[ignored] == 0).all()


def test_entropy_gradient_alone(gen, small_chunks):
    check_against_reference(gen, 29, 16, 70, torch.float32, with_entropy=True, entropy_grad_only=True,
                            backend="torch")


def test_ignored_positions_are_zero_and_never_reach_the_head(gen, monkeypatch):
    hidden, weight, _, labels = make_inputs(20, 8, 50, torch.float32, gen, ignore_every=4)
    seen_rows = []
    original = chunked.logit_tile

    def spy(h, *args):
        seen_rows.append(h.shape[0])
        return original(h, *args)

    monkeypatch.setattr(chunked, "logit_tile", spy)
    logprobs, entropy = linear_logprobs(hidden, weight, labels, with_entropy=True, backend="torch")
    ignored = labels == -100
    assert (logprobs[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (logprobs[~ignored] < 0).all()
    assert sum(seen_rows) == int((~ignored).sum())


def test_all_ignored_batch_is_zero_and_backpropagates(gen):
    hidden, weight, _, labels = make_inputs(6, 8, 40, torch.float32, gen)
    hidden.requires_grad_()
    weight.requires_grad_()
    labels[:] = -100
    logprobs, entropy = linear_logprobs(hidden, weight, labels, with_entropy=True, backend="torch")
    assert (logprobs == 0).all() and (entropy == 0).all()
    (logprobs.sum() + entropy.sum()).backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_tiles_are_bounded_never_n_by_v(gen, monkeypatch):
    hidden, weight, _, labels = make_inputs(50, 8, 300, torch.float32, gen)
    hidden.requires_grad_()
    largest = []
    original = chunked.logit_tile

    def spy(*args):
        z = original(*args)
        largest.append(z.numel())
        return z

    monkeypatch.setattr(chunked, "logit_tile", spy)
    logprobs, _ = chunked.chunked_linear_logprobs(hidden, weight, labels, token_chunk=16, vocab_chunk=64)
    logprobs.sum().backward()
    assert max(largest) <= 16 * 64


def test_triton_blocks_are_bounded_and_cover_every_logit_once():
    # The Triton path's backward blocks: within the element budget, whatever N and V, tiling N x V exactly;
    # the fused gradient block grows past its floor only within twice the fp32 dH accumulator's bytes.
    for n, h, vocab in [(4096, 896, 151936), (65536, 896, 151936), (65536, 4096, 128256), (300_000, 8192, 256_000)]:
        budget = triton_logprobs.grad_budget(n, h)
        assert triton_logprobs.GRAD_BUFFER_FLOOR <= budget <= triton_logprobs.GRAD_BUFFER_ELEMENTS
        assert budget == triton_logprobs.GRAD_BUFFER_FLOOR or 2 * budget <= 2 * (4 * n * h)  # bf16 vs fp32 dH
        blocks = list(triton_logprobs._blocks(n, vocab, budget))
        assert all((n1 - n0) * (v1 - v0) <= budget for n0, n1, v0, v1 in blocks)
        assert sum((n1 - n0) * (v1 - v0) for n0, n1, v0, v1 in blocks) == n * vocab
        assert len({(n0, v0) for n0, _, v0, _ in blocks}) == len(blocks)


def test_leading_dimensions_are_kept(gen):
    hidden, weight, _, labels = make_inputs(12, 8, 30, torch.float32, gen, ignore_every=5)
    logprobs, entropy = linear_logprobs(hidden.view(3, 4, 8), weight, labels.view(3, 4), with_entropy=True)
    flat, flat_entropy = linear_logprobs(hidden, weight, labels, with_entropy=True)
    assert logprobs.shape == (3, 4) and torch.equal(logprobs.reshape(-1), flat)
    assert torch.equal(entropy.reshape(-1), flat_entropy)


def test_bad_inputs_are_refused(gen):
    hidden, weight, _, labels = make_inputs(5, 8, 30, torch.float32, gen)
    labels[2] = 30
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(hidden, weight, labels)
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(hidden, weight, labels.clamp(max=29), backend="cuda-magic")
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, labels.clamp(max=29), temperature=0.0)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("ALIGN_KERNELS_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("ALIGN_KERNELS_BACKEND", "torch")
    assert resolve_backend(torch.device("cuda")) == "torch"
    assert resolve_backend(torch.device("cuda"), "triton") == "triton"


# ---------------------------------------------------------------- GPU: Triton path
ON_CUDA = torch.cuda.is_available() and triton_fused.AVAILABLE
DEVICE = "cuda"
GPU_DTYPES = [torch.float32, torch.bfloat16]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA and Triton")


@pytest.fixture(params=triton_logprobs.STRATEGIES)
def strategy(request, monkeypatch):
    """Each Triton test runs once per strategy (fused kernels, cuBLAS blocks + Triton fold)."""
    monkeypatch.setenv("ALIGN_KERNELS_STRATEGY", request.param)
    return request.param


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("shape", [(300, 200, 1000), (513, 256, 4099)])
def test_triton_matches_float64(gen, strategy, dtype, with_entropy, shape):
    check_against_reference(gen, *shape, dtype, with_entropy=with_entropy, device=DEVICE, backend="triton")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_triton_pointer_loads(gen, monkeypatch, dtype):
    # Rows that are not 16-byte aligned (or pre-Hopper GPUs) load through pointers instead of TMA.
    monkeypatch.setenv("ALIGN_KERNELS_STRATEGY", "fused")
    monkeypatch.setattr(triton_fused, "use_tma", lambda hidden: False)
    check_against_reference(gen, 129, 100, 515, dtype, with_entropy=True, temperature=1.3, with_bias=True,
                            ignore_every=4, device=DEVICE, backend="triton")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_triton_temperature_bias_ignored_and_entropy_grad(gen, strategy, dtype):
    hidden, labels = check_against_reference(gen, 190, 72, 517, dtype, with_entropy=True, temperature=0.7,
                                             with_bias=True, ignore_every=3, device=DEVICE, backend="triton")
    assert (hidden.grad[labels == -100] == 0).all()
    check_against_reference(gen, 64, 128, 333, dtype, with_entropy=True, entropy_grad_only=True,
                            device=DEVICE, backend="triton")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_triton_token_chunked(gen, strategy, monkeypatch, dtype):
    # Force several token chunks and vocabulary chunks: dW then accumulates across token chunks in fp32,
    # and the fused forward runs in launches of 128 tokens, the last one short.
    for name, value in [("GRAD_BUFFER_ELEMENTS", 128 * 256), ("TILE_ELEMENTS", 128 * 256),
                        ("MIN_VOCAB_CHUNK", 256), ("MAX_VOCAB_CHUNK", 256)]:
        monkeypatch.setattr(triton_logprobs, name, value)
    monkeypatch.setattr(triton_fused, "FORWARD_TOKEN_CHUNK", 128)
    check_against_reference(gen, 300, 64, 700, dtype, with_entropy=True, device=DEVICE, backend="triton")


@gpu
@needs_cuda
def test_triton_all_ignored(gen, strategy):
    hidden, weight, _, labels = make_inputs(8, 64, 100, torch.float32, gen, device=DEVICE)
    hidden.requires_grad_()
    labels[:] = -100
    logprobs, _ = linear_logprobs(hidden, weight, labels, backend="triton")
    logprobs.sum().backward()
    assert (logprobs == 0).all() and (hidden.grad == 0).all()


@gpu
@needs_cuda
def test_triton_real_vocabulary_bf16(gen, strategy):
    # Qwen2.5-0.5B's head: H=896, V=151936 (not a multiple of any tile), bf16.
    check_against_reference(gen, 2048, 896, 151936, torch.bfloat16, with_entropy=True, device="cuda")


def peak_extra_bytes(n, h, v, gen) -> int:
    hidden, weight, _, labels = make_inputs(n, h, v, torch.bfloat16, gen, device="cuda")
    hidden.requires_grad_()
    weight.requires_grad_()

    def step():
        logprobs, entropy = linear_logprobs(hidden, weight, labels, with_entropy=True)
        (logprobs.sum() + entropy.sum()).backward()
        torch.cuda.synchronize()

    step()  # compile and tune (and their timing buffers) outside the count
    weight.grad = hidden.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - base


@gpu
@needs_cuda
def test_triton_memory_is_bounded(gen, strategy):
    # Doubling V may grow the peak by the weight gradient it returns, never by N x V-sized buffers.
    n, h, v = 4096, 512, 65536
    small, large = peak_extra_bytes(n, h, v, gen), peak_extra_bytes(n, h, 2 * v, gen)
    growth_allowed = 1.25 * v * h * 2 + 16 * 2**20
    assert large - small < growth_allowed, f"{small / 2**20:.0f} -> {large / 2**20:.0f} MiB"
    assert large < n * 2 * v * 2, "more than the bf16 logits alone"


@gpu
@needs_cuda
def test_strategy_is_timed_once_and_kept(gen, monkeypatch):
    monkeypatch.delenv("ALIGN_KERNELS_STRATEGY", raising=False)
    monkeypatch.setattr(triton_logprobs, "_chosen", {})
    monkeypatch.setattr(triton_fused, "FORWARD_TOKEN_CHUNK", 256)  # 1000 tokens: one launch is timed too
    hidden, weight, _, labels = make_inputs(1000, 256, 3000, torch.bfloat16, gen, device="cuda")
    hidden.requires_grad_()
    linear_logprobs(hidden, weight, labels)[0].sum().backward()
    chosen = {key[0]: name for key, name in triton_logprobs._chosen.items()}
    assert sorted(chosen) == ["backward", "forward"]
    assert chosen["forward"] in (*triton_logprobs.STRATEGIES, "fused-one-launch")
    assert chosen["backward"] in triton_logprobs.STRATEGIES
