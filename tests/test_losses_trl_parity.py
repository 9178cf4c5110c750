"""Parity of our losses with TRL 1.16's `DPOTrainer` on the same tiny model and batch.

TRL side: a real `DPOTrainer` (random-init Llama policy, a separate random-init reference model object, a
WordLevel tokenizer built in memory; nothing touches the hub) tokenises a small text dataset itself, its own
collator builds the batch, and `trainer.compute_loss` computes the loss with its fused LM head
(trl/trainer/dpo_trainer.py, `_compute_loss`). Our side: per-sequence summed completion log-probs computed
here, independently, with one plain unpadded forward per sequence, then `align_cli.losses`. Loss and gradients
with respect to every policy parameter must agree.

The same for `tpo` and `tpo_l` against TRL 1.16's `trl.experimental.tpo.TPOTrainer` (reference-free, with the
gold-response NLL).
"""

from __future__ import annotations

import pytest
import torch
from align_cli.losses import LOSSES, tensor_inputs
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.experimental.tpo import TPOConfig, TPOTrainer

WORDS = [f"w{i}" for i in range(100)]
CONFIG = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    # Wider than the default 0.02 so that policy and reference differ enough for margins of a few nats,
    # which puts one pair past the hinge and makes the f-divergences differ visibly from reverse KL.
    "initializer_range": 0.3,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": None,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small run faster on one thread: synchronising two costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def dataset():
    generator = torch.Generator().manual_seed(0)

    def sentence(n):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())

    # Different prompt and completion lengths, so padding and the length normalisation both matter.
    rows = [
        {"prompt": sentence(3 + i), "chosen": " " + sentence(2 + i), "rejected": " " + sentence(5 - i)}
        for i in range(4)
    ]
    for i, row in enumerate(rows):  # TPO's gold response; DPOTrainer ignores it
        row["reference"] = " " + sentence(1 + 2 * i)
    return Dataset.from_list(rows)


def fresh_models():
    """Policy and reference, rebuilt for each trainer because `DPOTrainer` patches their `forward`."""
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**CONFIG))
    torch.manual_seed(1)
    reference = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    return policy, reference


def sequence_logp(model, prompt_ids, completion_ids):
    """Sum of the completion tokens' log-probs: one unpadded forward, full softmax."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt_ids) - 1 :].sum()


def our_inputs(policy, reference, rows):
    """Summed completion log-probs and lengths per example, named as the losses take them."""

    def logps(model, key):
        return torch.stack([sequence_logp(model, row["prompt_ids"], row[key]) for row in rows])

    def lengths(key):
        return torch.tensor([len(row[key]) for row in rows])

    inputs = {
        "policy_chosen": logps(policy, "chosen_ids"),
        "policy_rejected": logps(policy, "rejected_ids"),
        "chosen_lengths": lengths("chosen_ids"),
        "rejected_lengths": lengths("rejected_ids"),
    }
    if reference is not None:
        with torch.no_grad():
            inputs["ref_chosen"], inputs["ref_rejected"] = (
                logps(reference, "chosen_ids"),
                logps(reference, "rejected_ids"),
            )
    if "reference_ids" in rows[0]:  # TPO's gold response, tokenised by TPOTrainer
        inputs["policy_gold"], inputs["gold_lengths"] = (
            logps(policy, "reference_ids"),
            lengths("reference_ids"),
        )
    return inputs


def call(name, inputs, **hyper):
    """`mean(loss_name)` on the tensors the loss declares, as the trainer will call it."""
    function = LOSSES[name]
    return function(**{k: inputs[k] for k in tensor_inputs(function) if k in inputs}, **hyper)[0].mean()


# (id, TRL DPOConfig settings, our combined loss as [(weight, name, hyperparameters)])
CASES = [
    ("dpo", {"loss_type": ["sigmoid"], "beta": 0.1}, [(1.0, "dpo", {"beta": 0.1})]),
    ("ipo", {"loss_type": ["ipo"], "beta": 0.1}, [(1.0, "ipo", {"beta": 0.1})]),
    ("hinge", {"loss_type": ["hinge"], "beta": 0.25}, [(1.0, "hinge", {"beta": 0.25})]),
    (
        "rdpo",
        {"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.2},
        [(1.0, "rdpo", {"beta": 0.1, "label_smoothing": 0.2})],
    ),
    (
        "dpo+sft",
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1},
        [(1.0, "dpo", {"beta": 0.1}), (0.5, "sft", {})],
    ),
    (
        "fdpo-forward_kl",
        {"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "forward_kl"},
        [(1.0, "fdpo", {"beta": 0.1, "divergence": "forward_kl"})],
    ),
    (
        "fdpo-js",
        {"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "js_divergence"},
        [(1.0, "fdpo", {"beta": 0.1, "divergence": "js"})],
    ),
    (
        # Paper alpha 0.3 is TRL's f_alpha_divergence_coef = 1 - 0.3.
        "fdpo-alpha",
        {
            "loss_type": ["sigmoid"],
            "beta": 0.1,
            "f_divergence_type": "alpha_divergence",
            "f_alpha_divergence_coef": 0.7,
        },
        [(1.0, "fdpo", {"beta": 0.1, "divergence": "alpha", "alpha": 0.3})],
    ),
    ("sppo", {"loss_type": ["sppo_hard"], "beta": 0.1}, [(1.0, "sppo", {"beta": 0.1})]),
]


def trainer_args(config_class, tmp_path, dataset, settings):
    return config_class(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(dataset),
        save_strategy="no",
        **settings,
    )


def assert_trainer_parity(trainer, policy, reference, ours, columns):
    """TRL's loss on a batch its collator built vs our weighted losses on independently computed log-probs."""
    rows = list(trainer.train_dataset)
    batch = trainer.data_collator([{k: row[k] for k in columns if k in row} for row in rows])
    parameters = [p for p in policy.parameters() if p.requires_grad]
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_grads = torch.autograd.grad(trl_loss, parameters)

    inputs = our_inputs(policy, reference, rows)
    margins = inputs["policy_chosen"] - inputs["policy_rejected"]
    if reference is not None:
        margins = margins - (inputs["ref_chosen"] - inputs["ref_rejected"])
    assert margins.detach().abs().min() > 0.5  # a batch with real margins, both signs
    assert (margins > 0).any() and (margins < 0).any()
    our_loss = sum(weight * call(name, inputs, **hyper) for weight, name, hyper in ours)
    our_grads = torch.autograd.grad(our_loss, parameters)

    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    # Both sides are float32 (TRL's chunked LM head, our full softmax): elementwise agreement up to float32
    # rounding relative to the largest gradient, and the whole gradient vector within 1e-5 relative norm.
    scale = max(g.abs().max() for g in trl_grads)
    assert scale > 0
    for ours_grad, trl_grad in zip(our_grads, trl_grads):
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-4, atol=1e-5 * scale)
    difference = torch.cat([(a - b).flatten() for a, b in zip(our_grads, trl_grads)]).norm()
    assert difference <= 1e-5 * torch.cat([g.flatten() for g in trl_grads]).norm()


@pytest.mark.parametrize("trl_settings, ours", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loss_and_gradients_match_trl_dpo_trainer(trl_settings, ours, tokenizer, dataset, tmp_path):
    policy, reference = fresh_models()
    args = trainer_args(DPOConfig, tmp_path, dataset, trl_settings)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    assert_trainer_parity(trainer, policy, reference, ours, ("prompt_ids", "chosen_ids", "rejected_ids"))


TPO_CASES = [
    (
        "tpo",
        {"loss_type": "sigmoid", "beta": 0.5, "label_smoothing": 0.1, "tpo_alpha": 1.0},
        [(1.0, "tpo", {"beta": 0.5, "label_smoothing": 0.1, "alpha": 1.0})],
    ),
    # alpha = 0: TRL drops the gold branch from the batch; we skip the NLL term.
    (
        "tpo-no-gold",
        {"loss_type": "sigmoid", "beta": 0.5, "tpo_alpha": 0.0},
        [(1.0, "tpo", {"beta": 0.5, "alpha": 0.0})],
    ),
    (
        "tpo_l",
        {"loss_type": "tpo-l", "beta": 2.0, "tpo_l_gamma": 0.7, "tpo_alpha": 0.5},
        [(1.0, "tpo_l", {"beta": 2.0, "gamma": 0.7, "alpha": 0.5})],
    ),
    (
        "tpo_l-label-smoothing",
        {"loss_type": "tpo-l", "beta": 2.0, "tpo_l_gamma": 0.7, "label_smoothing": 0.2, "tpo_alpha": 0.5},
        [(1.0, "tpo_l", {"beta": 2.0, "gamma": 0.7, "label_smoothing": 0.2, "alpha": 0.5})],
    ),
]


@pytest.mark.parametrize("trl_settings, ours", [c[1:] for c in TPO_CASES], ids=[c[0] for c in TPO_CASES])
def test_loss_and_gradients_match_trl_tpo_trainer(trl_settings, ours, tokenizer, dataset, tmp_path):
    policy, _ = fresh_models()
    args = trainer_args(TPOConfig, tmp_path, dataset, trl_settings)
    trainer = TPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer)
    columns = ("prompt_ids", "chosen_ids", "rejected_ids", "reference_ids")
    assert_trainer_parity(trainer, policy, None, ours, columns)
