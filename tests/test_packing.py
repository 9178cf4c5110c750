"""Padding-free packing, prompt sharing and token budgets: the same log-probs as the padded layout."""


import pytest
import torch

from align_cli.data.batching import collate_groups
from align_cli.data.packing import PAD_MULTIPLE, TokenBudgetOrder, pack_groups, pack_sequences, row_costs
from align_cli.logprobs import sequence_logps
from align_cli.packed_attention import block_mask, dense_mask

GROUPS = ["chosen", "rejected", "gold"]


def tiny_model(family: str, attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "attn_implementation": attention}
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def random_examples(count: int, seed: int, prompt=(3, 40), completion=(1, 30)):
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, 300, (length,), generator=generator).tolist()

    return [{"prompt_ids": ids(*prompt), "chosen_ids": ids(*completion), "rejected_ids": ids(*completion),
             "gold_ids": ids(*completion), "row_index": i} for i in range(count)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_logps_and_gradients_equal_padded(family, attention, share_prompt):
    model = tiny_model(family, attention)
    examples = random_examples(5, seed=1)
    padded = sequence_logps(model, collate_groups(examples, GROUPS, 0).sequences)
    padded.sums.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = sequence_logps(model, pack_groups(examples, GROUPS, 0, share_prompt).sequences)
    packed.sums.sum().backward()
    # fp32 on CPU: equal up to the order of float additions (bitwise equal in our runs with sdpa)
    torch.testing.assert_close(packed.sums, padded.sums, rtol=0, atol=2e-5)
    torch.testing.assert_close(packed.token_counts, padded.token_counts, rtol=0, atol=0)
    torch.testing.assert_close(packed.token_logps, padded.token_logps, rtol=0, atol=2e-6)
    assert torch.equal(packed.token_sequence, padded.token_sequence)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_layout_shares_each_prompt_once_and_names_every_target():
    examples = random_examples(3, seed=2)
    shared = pack_sequences(examples, GROUPS, pad_id=0, share_prompt=True)
    separate = pack_sequences(examples, GROUPS, pad_id=0, share_prompt=False)
    prompts = sum(len(e["prompt_ids"]) for e in examples)
    completions = sum(len(e[f"{g}_ids"]) for e in examples for g in GROUPS)
    assert shared.num_tokens == prompts + completions
    assert separate.num_tokens == 3 * prompts + completions
    assert shared.input_ids.shape[1] % PAD_MULTIPLE == 0 and separate.input_ids.shape[1] % PAD_MULTIPLE == 0
    for batch in (shared, separate):
        assert batch.target_labels.numel() == completions
        assert torch.all(batch.target_sequence[1:] >= batch.target_sequence[:-1]), "sequence-major order"
        # every target's predictor holds the token right before the label in its own sequence
        for position in batch.target_positions.tolist():
            assert batch.attention_mask[0, position] == 1
    # the chosen completion of example 0 starts right after its prompt, at the prompt's length
    first = examples[0]
    start = len(first["prompt_ids"])
    assert shared.position_ids[0, start].item() == len(first["prompt_ids"])
    assert shared.input_ids[0, start: start + len(first["chosen_ids"])].tolist() == first["chosen_ids"]


def test_completions_see_their_prompt_and_nothing_of_their_siblings():
    examples = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9], "row_index": 0},
                {"prompt_ids": [10], "chosen_ids": [11], "rejected_ids": [12, 13], "row_index": 1}]
    batch = pack_sequences(examples, ["chosen", "rejected"], pad_id=0, share_prompt=True)
    allowed = dense_mask(batch.segments, batch.context)[0, 0]
    # row: [5 6][7 8][9][10][11][12 13] pad...
    seen = [[j for j in range(9) if allowed[i, j]] for i in range(9)]
    assert seen[3] == [0, 1, 2, 3]  # token 8 sees 5 6 7 8
    assert seen[4] == [0, 1, 4]  # token 9 sees 5 6 9, not its sibling 7 8
    assert seen[8] == [5, 7, 8]  # token 13 sees 10 12 13
    # sequences: chosen 0, chosen 1, rejected 0, rejected 1; both completions of a prompt start from its end
    assert batch.target_positions.tolist() == [1, 2, 5, 1, 5, 7]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_block_mask_computes_what_the_dense_mask_does(share_prompt):
    from torch.nn.attention.flex_attention import flex_attention

    examples = random_examples(6, seed=3, prompt=(3, 200), completion=(1, 150))
    batch = pack_sequences(examples, ["chosen", "rejected"], pad_id=0, share_prompt=share_prompt)
    length = batch.input_ids.shape[1]
    mask = block_mask(batch.segments, batch.context)
    assert mask.sparsity() > 50, "most blocks of a packed row are skipped"
    q, k, v = (torch.randn(1, 2, length, 16, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=mask)  # eager reference implementation on CPU
    allowed = dense_mask(batch.segments, batch.context)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-12)


def test_token_budget_order_is_pure_resumable_and_within_budget():
    examples = random_examples(60, seed=4)
    columns = {column: [e[column] for e in examples] for column in examples[0]}
    costs = tuple(row_costs(columns, ["chosen", "rejected"], share_prompt=True))
    assert costs[0] == sum(len(examples[0][c]) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    order = TokenBudgetOrder(costs, max_tokens=200, seed=7)
    fresh = TokenBudgetOrder(costs, max_tokens=200, seed=7)
    assert [fresh.batch(k) for k in (9, 3, 40)] == [order.batch(k) for k in (9, 3, 40)], "no replay needed"
    epoch = [order.batch(k) for k in range(order.batches_per_epoch)]
    rows = [row for batch in epoch for row in batch]
    assert sorted(rows) == list(range(60)), "an epoch visits every row once"
    assert all(sum(costs[r] for r in batch) <= 200 or len(batch) == 1 for batch in epoch)
    assert order.batch(order.batches_per_epoch) != order.batch(0), "each epoch is a new permutation"
    ordered = TokenBudgetOrder(costs, 200, 7, shuffle=False)
    assert [row for k in range(ordered.batches_per_epoch) for row in ordered.batch(k)] == list(range(60))
    ranks = [TokenBudgetOrder(costs, 200, 7, world_size=2, rank=r) for r in (0, 1)]
    for k in range(ranks[0].batches_per_epoch):
        assert not set(ranks[0].batch(k)) & set(ranks[1].batch(k))


def run_recipe(path, *overrides, **kwargs):
    from align_cli.pairwise.trainer import train
    from align_cli.recipe import load_recipe

    recipe, recipe_path = load_recipe(str(path), list(overrides))
    return train(recipe, recipe_path, **kwargs)


def test_trainer_packed_run_matches_padded_run(tiny_recipe, tmp_path):
    common = {"training__max_steps": 2, "evaluation__task": None, "output__save_final_model": False}
    padded = run_recipe(tiny_recipe(output__dir=str(tmp_path / "padded"), training__packing=False, **common))
    packed = run_recipe(tiny_recipe(output__dir=str(tmp_path / "packed"), training__packing=True, **common))
    for name in ("loss", "rewards/chosen", "rewards/rejected"):
        expected = padded["final_train_metrics"][name]
        assert packed["final_train_metrics"][name] == pytest.approx(expected, abs=1e-5)
    # the shared prompt is encoded once: fewer tokens run for the same pairs
    assert packed["train_tokens"] < padded["train_tokens"]


def test_trainer_token_budget_resumes_exactly(tiny_recipe, tmp_path):
    import os
    import signal

    from safetensors.torch import load_file

    from align_cli.lifecycle import Interrupted

    overrides = {"training__packing": True, "training__max_tokens_per_batch": 300, "training__max_steps": 3,
                     "evaluation__task": None, "checkpointing__every": 100}
    run_recipe(tiny_recipe(output__dir=str(tmp_path / "straight"), **overrides))

    def stop_after_two(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = tiny_recipe(output__dir=str(tmp_path / "resumed"), **overrides)
    with pytest.raises(Interrupted):
        run_recipe(interrupted, on_step_end=stop_after_two)
    run_recipe(interrupted, resume=True)
    expected = load_file(tmp_path / "straight" / "final_model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final_model" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_token_budget_needs_packing(tiny_recipe):
    from align_cli.errors import UserError

    with pytest.raises(UserError, match="max_tokens_per_batch"):
        run_recipe(tiny_recipe(training__packing=False, training__max_tokens_per_batch=300))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_backend_on_gpu_matches_padded_sdpa(dtype):
    from align_cli.packed_attention import register_backend

    register_backend()
    reference = tiny_model("llama", "sdpa").to("cuda", dtype)
    model = tiny_model("llama", "align_flex").to("cuda", dtype)
    examples = random_examples(8, seed=5, prompt=(3, 300), completion=(1, 400))
    padded = sequence_logps(reference, collate_groups(examples, GROUPS, 0).sequences.to("cuda"))
    padded.sums.sum().backward()
    for share_prompt in (True, False):
        model.zero_grad()
        packed = sequence_logps(model, pack_groups(examples, GROUPS, 0, share_prompt).sequences.to("cuda"))
        packed.sums.sum().backward()
        sums_error = ((packed.sums - padded.sums).abs().max() / padded.sums.abs().max()).item()
        grad_errors = {name: ((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()).item()
                       for (name, p), q in zip(model.named_parameters(), reference.parameters())}
        worst = max(grad_errors.values())
        print(f"{dtype} share_prompt={share_prompt}: sums {sums_error:.2e}, worst grad {worst:.2e}")
        assert sums_error < (1e-4 if dtype == torch.float32 else 2e-2)
        assert max(grad_errors.values()) < (1e-3 if dtype == torch.float32 else 5e-2)
