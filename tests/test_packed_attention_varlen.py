"""The varlen and padded-batch layouts of packed rows, their attention, and `align_packed`'s measured choice."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_packing import GROUPS, random_examples, tiny_model

from align_cli.attention_choice import CHOOSER, BackendChooser, bucket_of, power_of_two_at_least
from align_cli.data.packing import PADDING_SEGMENT, pack_groups, pack_sequences
from align_cli.logprobs import sequence_logps
from align_cli.packed_attention import PADDED_KWARG, VARLEN_KWARG, dense_mask, model_inputs, register_backend
from align_cli.padded_attention import padded_attention_forward, padded_layout
from align_cli.varlen_attention import flash_varlen_unsupported, varlen_attention_forward, varlen_layout


def visible_by_layout(layout, length: int) -> torch.Tensor:
    """`[T, T]` bool: which row positions each query sees through the layout's bottom-right causal blocks."""
    keys = layout.k_index if layout.k_index is not None else torch.arange(length)
    visible = torch.zeros(length, length, dtype=torch.bool)
    q_start, k_start = 0, 0
    for n, m in zip(layout.query_lengths, layout.key_lengths):
        for i in range(n):
            visible[q_start + i, keys[k_start:k_start + m - n + i + 1]] = True
        q_start, k_start = q_start + n, k_start + m
    return visible


def test_layout_of_shared_prompts_by_hand():
    # prompt (3 tokens), chosen (2), rejected (1), then a second example's prompt (2) and chosen (2), padding (6)
    rows = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10], "row_index": 0},
            {"prompt_ids": [11, 12], "chosen_ids": [13, 14], "rejected_ids": [], "row_index": 1}]
    batch = pack_sequences(rows, ["chosen", "rejected"], pad_id=0, share_prompt=True, pad_multiple=16)
    layout = varlen_layout(batch.segments, batch.context)
    assert layout.query_lengths == (3, 2, 1, 2, 2, 6)
    assert layout.key_lengths == (3, 5, 4, 2, 4, 6)
    assert layout.cu_seq_q.tolist() == [0, 3, 5, 6, 8, 10, 16]
    assert layout.cu_seq_k.tolist() == [0, 3, 8, 12, 14, 18, 24]
    assert layout.k_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 6, 7, 8, 9, *range(10, 16)]
    assert (layout.max_q, layout.max_k) == (6, 6)
    assert layout.cu_seq_q.dtype == layout.cu_seq_k.dtype == torch.int32
    # the rejected completion's one query sees the whole prompt and itself, not its sibling
    assert visible_by_layout(layout, 16)[5].nonzero().squeeze(1).tolist() == [0, 1, 2, 5]


def test_padded_layout_of_shared_prompts_by_hand():
    # the rows of test_layout_of_shared_prompts_by_hand: each completion a batch row [its prompt, itself], the first
    # completion of a prompt also giving the prompt's outputs, the trailing padding no row (its outputs: the zero slot)
    rows = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10], "row_index": 0},
            {"prompt_ids": [11, 12], "chosen_ids": [13, 14], "rejected_ids": [], "row_index": 1}]
    batch = pack_sequences(rows, ["chosen", "rejected"], pad_id=0, share_prompt=True, pad_multiple=16)
    layout = padded_layout(batch.segments, varlen_layout(batch.segments, batch.context))
    assert layout.lengths == (5, 4, 4) and layout.shape == (3, 5)
    assert layout.gather_index.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 5, 0], [6, 7, 8, 9, 0]]
    assert layout.output_index.tolist() == [0, 1, 2, 3, 4, 8, 10, 11, 12, 13, *[15] * 6]
    plain = pack_sequences(rows, ["chosen", "rejected"], pad_id=0, share_prompt=False, pad_multiple=16)
    unshared = padded_layout(plain.segments, varlen_layout(plain.segments, plain.context))
    assert unshared.lengths == (5, 4, 4, 2)   # plain packing: each sequence its own row (the empty rejected: 2)


def test_plain_packing_keys_are_the_queries():
    batch = pack_sequences(random_examples(4, seed=3), GROUPS, pad_id=0, share_prompt=False)
    layout = varlen_layout(batch.segments, batch.context)
    assert layout.k_index is None and layout.cu_seq_k is layout.cu_seq_q
    assert layout.query_lengths == layout.key_lengths
    assert sum(layout.query_lengths) == batch.segments.numel()  # every token a query, padding included
    assert (batch.segments[-1] == PADDING_SEGMENT) and layout.query_lengths[-1] == int(
        (batch.segments == PADDING_SEGMENT).sum())


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_sees_exactly_what_the_mask_rule_allows(share_prompt, seed):
    batch = pack_sequences(random_examples(5, seed=seed), GROUPS, pad_id=0, share_prompt=share_prompt)
    layout = varlen_layout(batch.segments, batch.context)
    length = batch.segments.numel()
    assert torch.equal(visible_by_layout(layout, length), dense_mask(batch.segments, batch.context)[0, 0])
    assert layout.attended_pairs == int(dense_mask(batch.segments, batch.context).sum())


@pytest.mark.parametrize("segments, context, problem", [
    ([0, 0, 1, 1, 0], [-1, -1, -1, -1, -1], "two places"),
    ([0, 0, 1, 1], [-1, -1, 5, 5], "missing"),
    ([0, 0, 1, 1], [1, 1, -1, -1], "before"),
    ([0, 0, 1, 1], [-1, -1, 0, -1], "changes"),
])
def test_rows_outside_the_layout_are_refused(segments, context, problem):
    with pytest.raises(ValueError, match=problem):
        varlen_layout(torch.tensor(segments), torch.tensor(context))


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_reference_varlen_equals_dense_mask_attention(share_prompt, heads, kv_heads):
    batch = pack_sequences(random_examples(4, seed=7), GROUPS, pad_id=0, share_prompt=share_prompt)
    length, dim, scale = batch.segments.numel(), 16, 0.3
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, h, length, dim, generator=generator, requires_grad=True)
              for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(1, length, heads, dim, generator=generator)
    output = varlen_attention_forward(*inputs, varlen_layout(batch.segments, batch.context), scale)
    grads = torch.autograd.grad(output, inputs, grad)
    expected = F.scaled_dot_product_attention(*inputs, attn_mask=dense_mask(batch.segments, batch.context),
                                              scale=scale, enable_gqa=heads != kv_heads).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float32: sums in another order


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("heads, kv_heads, native_gqa", [(4, 4, False), (6, 2, False), (6, 2, True)])
def test_padded_batch_equals_dense_mask_attention_on_real_tokens(share_prompt, heads, kv_heads, native_gqa):
    batch = pack_sequences(random_examples(4, seed=11), GROUPS, pad_id=0, share_prompt=share_prompt)
    length, dim, scale = batch.segments.numel(), 16, 0.3
    real = batch.segments != PADDING_SEGMENT
    assert not real.all()   # the row ends in padding: its outputs are the layout's zeros
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, h, length, dim, generator=generator, requires_grad=True)
              for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(1, length, heads, dim, generator=generator) * real[None, :, None, None]  # no loss on padding
    layout = padded_layout(batch.segments, varlen_layout(batch.segments, batch.context))
    layout = dataclasses.replace(layout, native_gqa=native_gqa)  # grouped heads repeated, or SDPA's enable_gqa
    output = padded_attention_forward(*inputs, layout, scale)
    grads = torch.autograd.grad(output, inputs, grad)
    expected = F.scaled_dot_product_attention(*inputs, attn_mask=dense_mask(batch.segments, batch.context),
                                              scale=scale, enable_gqa=heads != kv_heads).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    torch.testing.assert_close(output[:, real], expected[:, real], rtol=1e-5, atol=1e-6)
    assert torch.equal(output[:, ~real], torch.zeros_like(output[:, ~real]))
    for got, want in zip(grads, expected_grads):   # duplicated prompt tokens: the copies' gradients add up
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def checkpointed(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


@pytest.mark.parametrize("implementation", ["align_varlen", "align_padded", "padded_gqa"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("compiled", [False, True])
def test_tiny_models_through_varlen_equal_the_dense_path(family, compiled, implementation, monkeypatch):
    """Gradient checkpointing, and regional compilation (aot_eager) of the decoder layers, on top of each model's
    own attention call: the layout keyword reaches every layer's attention call, recompute included. `padded_gqa`:
    align_packed's choice made that candidate (the tiny models' 4 query heads share 2 key/value heads)."""
    from align_cli import packed_attention
    from align_cli.compilation import compile_layers

    register_backend()
    if implementation == "padded_gqa":
        monkeypatch.setattr(packed_attention, "measured_kind", lambda model, batch: "padded_gqa")
    backend = "align_packed" if implementation == "padded_gqa" else implementation
    dense, varlen = checkpointed(tiny_model(family, "sdpa")), checkpointed(tiny_model(family, backend))
    compilation = compile_layers(varlen, backend="aot_eager") if compiled else None
    for seed, share_prompt in ((1, True), (2, False)):
        examples = random_examples(5, seed=seed)
        expected = sequence_logps(dense, pack_groups(examples, GROUPS, 0, share_prompt).sequences)
        expected.sums.sum().backward()
        batch = pack_groups(examples, GROUPS, 0, share_prompt).sequences
        if implementation == "padded_gqa":
            assert packed_attention.model_inputs(varlen, batch)[PADDED_KWARG].native_gqa
        got = sequence_logps(varlen, batch)
        got.sums.sum().backward()
        # no [T, T] mask was built (the padded layout is derived from the varlen one)
        assert list(batch._attention) == (["varlen"] if implementation == "align_varlen" else ["varlen", "padded"])
        torch.testing.assert_close(got.sums, expected.sums, rtol=0, atol=2e-5)
        torch.testing.assert_close(got.token_logps, expected.token_logps, rtol=0, atol=2e-6)
        for (name, p), q in zip(varlen.named_parameters(), dense.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        dense.zero_grad(set_to_none=True)
        varlen.zero_grad(set_to_none=True)
    if compilation is not None:
        assert compilation.report()["fell_back"] is None


def test_model_inputs_carry_the_layout_and_build_it_once():
    register_backend()
    model = tiny_model("llama", "align_varlen")
    batch = pack_groups(random_examples(3, seed=4), GROUPS, 0, True).sequences
    first, second = model_inputs(model, batch), model_inputs(model, batch)
    assert first[VARLEN_KWARG] is second[VARLEN_KWARG]
    assert first["attention_mask"].shape == (1, 1, 0, 0)  # a 4-D stand-in: transformers builds no mask


def test_chooser_measures_each_bucket_once_and_leaves_training_untouched():
    register_backend()
    CHOOSER.clear()
    model = tiny_model("qwen2", "align_packed")
    rows = random_examples(6, seed=8, prompt=(20, 40), completion=(20, 30))
    batch = pack_groups(rows[:3], GROUPS, 0, True).sequences
    rng = torch.get_rng_state()
    inputs = model_inputs(model, batch)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global stream
    assert all(p.grad is None for p in model.parameters())
    [decision] = CHOOSER.report()
    # CPU: the candidates that run here (grouped heads: 4 query, 2 key/value, so both padded batches)
    assert set(decision["milliseconds"]) == {"dense", "varlen", "padded", "padded_gqa"}
    assert decision["chosen"] == min(decision["milliseconds"], key=decision["milliseconds"].get)
    assert (VARLEN_KWARG in inputs) == (decision["chosen"] == "varlen")
    assert (PADDED_KWARG in inputs) == decision["chosen"].startswith("padded")
    if PADDED_KWARG in inputs:
        assert inputs[PADDED_KWARG].native_gqa == (decision["chosen"] == "padded_gqa")
    same_bucket = pack_groups(rows[3:], GROUPS, 0, True).sequences
    assert bucket_of(same_bucket.input_ids.shape[1], same_bucket.num_sequences, True, 4, 2, 16, torch.float32,
                     torch.device("cpu")) == bucket_of(batch.input_ids.shape[1], batch.num_sequences, True, 4, 2,
                                                       16, torch.float32, torch.device("cpu"))
    model_inputs(model, same_bucket)
    assert len(CHOOSER.report()) == 1  # cached for the bucket
    model_inputs(model, pack_groups(rows[:3], GROUPS, 0, False).sequences)  # unshared prompts: another bucket
    assert len(CHOOSER.report()) == 2
    CHOOSER.clear()


@pytest.mark.parametrize("implementation, expected", [("align_varlen", VARLEN_KWARG), ("align_padded", PADDED_KWARG),
                                                      ("align_flex", None)])
def test_a_named_backend_is_forced_without_measuring(implementation, expected):
    from torch.nn.attention.flex_attention import BlockMask

    register_backend()
    CHOOSER.clear()
    inputs = model_inputs(tiny_model("llama", implementation),
                          pack_groups(random_examples(3, seed=9), GROUPS, 0, True).sequences)
    assert CHOOSER.report() == []
    if expected:
        assert expected in inputs
    else:
        assert isinstance(inputs["attention_mask"], BlockMask) and VARLEN_KWARG not in inputs


def test_chooser_takes_a_lone_candidate_untimed_and_keeps_the_fastest():
    import time

    chooser = BackendChooser(repeats=2)
    bucket = bucket_of(4096, 8, True, 14, 2, 64, torch.bfloat16, torch.device("cpu"))
    calls = []
    assert chooser.choose(bucket, lambda: {"flex": lambda: calls.append(1)}, {"varlen": "head dim"}) == "flex"
    assert calls == [] and chooser.report()[0]["unavailable"] == {"varlen": "head dim"}
    other = bucket._replace(row_tokens=8192)
    slow, fast = (lambda: time.sleep(0.02)), (lambda: None)
    assert chooser.choose(other, lambda: {"slow": slow, "fast": fast}) == "fast"
    assert chooser.choose(other, lambda: pytest.fail("measured twice")) == "fast"
    assert [power_of_two_at_least(n) for n in (1, 128, 129, 4352)] == [1, 128, 256, 8192]


def test_chooser_never_takes_a_candidate_computing_another_attention():
    import time

    chooser = BackendChooser(repeats=1)
    bucket = bucket_of(1024, 4, True, 4, 2, 16, torch.float32, torch.device("cpu"))
    output = torch.randn(1, 8, 4, 16, generator=torch.Generator().manual_seed(0))

    def slow_reference():
        time.sleep(0.01)
        return output

    wrong = output.clone()
    wrong[0, :2] += 1.0   # the first queries attend elsewhere (e.g. a top-left causal alignment)
    assert chooser.choose(bucket, lambda: {"dense": slow_reference, "varlen": lambda: wrong}) == "dense"
    [decision] = chooser.report()
    assert "differs from dense" in decision["unavailable"]["varlen"] and "varlen" not in decision["milliseconds"]
    close = output + 1e-6   # rounding: still a candidate, and the faster one wins
    other = bucket._replace(row_tokens=2048)
    assert chooser.choose(other, lambda: {"dense": slow_reference, "varlen": lambda: close}) == "varlen"


def test_chooser_never_takes_a_candidate_with_other_gradients():
    chooser = BackendChooser(repeats=1)
    bucket = bucket_of(512, 4, True, 4, 2, 16, torch.float32, torch.device("cpu"))
    output, grad = torch.ones(1, 8, 4, 16), torch.ones(1, 4, 8, 16)
    wrong_grad = grad.clone()
    wrong_grad[0, 0, 3] = -1.0   # same forward, a backward that sends one key's gradient elsewhere
    assert chooser.choose(bucket, lambda: {"dense": lambda: (output, grad, grad, grad),
                                           "padded": lambda: (output, grad, wrong_grad, grad)}) == "dense"
    assert "key gradient differs" in chooser.report()[0]["unavailable"]["padded"]


def test_flash_kernel_is_refused_where_it_cannot_run():
    cpu = torch.device("cpu")
    assert "CUDA" in flash_varlen_unsupported(64, torch.bfloat16, cpu)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert "bf16" in flash_varlen_unsupported(64, torch.float32, cuda)
        assert "head dims" in flash_varlen_unsupported(100, torch.bfloat16, cuda)
        assert "head dims" in flash_varlen_unsupported(320, torch.bfloat16, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["align_varlen", "align_packed"])
def test_varlen_backend_on_gpu_matches_packed_sdpa(implementation):
    register_backend()
    reference = tiny_model("llama", "sdpa").to("cuda", torch.bfloat16)
    model = tiny_model("llama", implementation).to("cuda", torch.bfloat16)
    examples = random_examples(8, seed=5, prompt=(3, 300), completion=(1, 400))
    for share_prompt in (True, False):
        reference.zero_grad()
        model.zero_grad()
        expected = sequence_logps(reference, pack_groups(examples, GROUPS, 0, share_prompt).sequences.to("cuda"))
        expected.sums.sum().backward()
        got = sequence_logps(model, pack_groups(examples, GROUPS, 0, share_prompt).sequences.to("cuda"))
        got.sums.sum().backward()
        assert ((got.sums - expected.sums).abs().max() / expected.sums.abs().max()).item() < 2e-2
        for p, q in zip(model.parameters(), reference.parameters()):
            assert ((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()).item() < 5e-2
