"""The recipe schema: every key a recipe may set, with its type, default and meaning.

One pydantic model per YAML section. Each field's `description` is the user documentation
(`align recipes show --schema` prints it), so this file is the one place keys are documented.
Unknown keys are errors (`extra="forbid"`), reported with the closest valid key by `recipe.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .methods import METHOD_NAMES, METHODS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field("builtin:smollm2-135m-instruct",
                      description="`builtin:NAME`, a local Hugging Face model directory, or a hub id (hub only when online).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. `auto`: bfloat16 on GPUs that support it, else float32.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model repository. Off unless you trust it.")
    attn_implementation: Optional[str] = Field(
        None, description="transformers attention backend (`sdpa`, `eager`, `flash_attention_2`), or one of ours for "
                          "packed rows: `align_packed` (per batch FlexAttention, flash varlen or the padded batch, "
                          "whichever measured fastest for the batch's shape bucket), `align_flex` (FlexAttention), "
                          "`align_varlen` (flash varlen; bf16/fp16, head dim <= 256), `align_padded` (the row as a "
                          "right-padded batch through SDPA's causal kernel, cuDNN's on Hopper). None: "
                          "`align_packed` with packing on CUDA, else the model's default (docs/throughput.md).")
    tokenizer: Optional[str] = Field(None, description="Tokenizer location if it differs from `name`.")


class ReferenceConfig(Section):
    name: Optional[str] = Field(
        None, description="Frozen reference model. None: the starting policy (with LoRA, the adapter-disabled policy, no second copy).")
    precompute: bool = Field(
        False, description="Compute reference log-probs once before training and cache them on disk, keyed by a hash "
                           "of the reference model, the data and the tokenisation settings; later runs with the same key reuse them.")
    cache_dir: Optional[str] = Field(None, description="Where reference log-prob caches live (default: the align cache, `$ALIGN_CACHE`).")
    offload: bool = Field(
        False, description="Keep the live reference model's weights in pinned host memory and copy them to the GPU "
                           "for each step's reference forward only (overlapped with the policy's forward), so they are "
                           "not on the GPU during backward, where memory peaks. Same results; one host-to-device "
                           "copy of the weights per step. Needs a separate reference model (not LoRA's "
                           "adapter-disabled policy) and one process or DDP (FSDP and DeepSpeed shard the reference).")


class ColumnMap(Section):
    prompt: str = Field("prompt", description="Column holding the prompt (string or chat messages).")
    chosen: str = Field("chosen", description="Column holding the preferred completion.")
    rejected: str = Field("rejected", description="Column holding the dispreferred completion.")
    gold: str = Field("gold", description="Column holding the gold (reference) response of triple data (TPO); "
                                          "read only when a loss needs it.")
    preference_probability: str = Field(
        "preference_probability", description="Column holding P(chosen beats rejected) in [0, 1], used as a soft label "
                                              "by losses that take one (SRPO); optional, hard labels without it.")
    chosen_win_probability: str = Field(
        "chosen_win_probability", description="Column holding the chosen response's win probability P(y_w beats pi) "
                                              "in [0, 1], SPPO's soft target; optional (hard label 1 without it). "
                                              "APO writes it from the ranker's scores.")
    rejected_win_probability: str = Field(
        "rejected_win_probability", description="Column holding the rejected response's win probability P(y_l beats "
                                                "pi) in [0, 1] (SPPO); optional (hard label 0 without it).")
    completions: str = Field("completions", description="`format: rated_to_triples`: column holding the list of rated "
                                                        "responses (UltraFeedback-style).")
    response: str = Field("response", description="`format: rated_to_triples`: key of a response's text inside each "
                                                  "completion.")
    score: str = Field("score", description="`format: rated_to_triples`: key of a response's rating inside each "
                                            "completion (UltraFeedback: `overall_score`).")


class DataSource(Section):
    source: str = Field(..., description="`builtin:NAME`, a local .json/.jsonl/.parquet/.csv file or a saved dataset directory, or a hub dataset name.")
    split: str = Field("train", description="Split to read.")
    subset: Optional[str] = Field(None, description="Hub dataset configuration name.")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Map the dataset's column names onto prompt/chosen/rejected (and gold).")
    format: Literal["preference", "rated_to_triples"] = Field(
        "preference", description="`preference`: rows are prompt/chosen/rejected (plus gold for triples) after `columns`. "
                                  "`rated_to_triples`: rows are a prompt with several rated responses (`completions` of "
                                  "{response, score}); each becomes a triple: highest score = gold, second = chosen, "
                                  "lowest = rejected (rows with fewer than 3 responses or no score gap are dropped).")
    triple_margin: float = Field(
        2.0, ge=0, description="`format: rated_to_triples`: keep a triple only when the chosen scores at least this "
                               "much below the gold and the rejected at least this much below the chosen (2: the TPO "
                               "authors' released UltraFeedback triples); the others are dropped and counted in a "
                               "warning. 0: any chosen that beats its rejected.")
    max_rows: Optional[int] = Field(None, ge=1, description="Use only the first N rows (after shuffling when `shuffle`).")


class DataConfig(Section):
    train: DataSource = Field(default_factory=lambda: DataSource(source="builtin:arithmetic_pairs"),
                              description="Training data.")
    eval: Optional[DataSource] = Field(None, description="Held-out data. None: split `eval_fraction` off the training data.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of training rows held out when `eval` is not given.")
    max_eval_rows: Optional[int] = Field(256, ge=1, description="Cap on held-out rows used for evaluation.")
    max_length: int = Field(512, ge=8, description="Max tokens of prompt + completion per sequence.")
    max_prompt_length: int = Field(256, ge=1, description="Longest prompt in tokens; longer prompts follow `prompt_truncation`.")
    prompt_truncation: Literal["drop", "keep_end"] = Field(
        "drop", description="Prompts over max_prompt_length: `drop` the row, or `keep_end` (keep the last tokens). "
                            "Completions are cut on the right to fit max_length. Both are counted in a warning.")
    system_prompt: Optional[str] = Field(None, description="System message prepended to chat prompts that have none.")
    chat_template: Optional[str] = Field(None, description="Jinja chat template (text or path) overriding the tokenizer's.")
    num_proc: Optional[int] = Field(None, ge=1, description="Processes for tokenisation (`datasets.map`); None: one per core, at most 8.")
    shuffle_seed: int = Field(0, description="Seed of the train/eval split.")


class LossTerm(BaseModel):
    """One weighted loss; any other key is a hyperparameter of that loss (checked against its signature)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(..., description="A name from `align_cli.losses.LOSSES`.")
    weight: float = Field(1.0, ge=0, description="Weight of this term in the sum of mean losses (>= 0: a negative "
                                                  "weight maximises the loss).")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


DEFAULT_REVISION_TEMPLATE = ("{prompt}\n\nHere is an example answer:\n{example}\n\n"
                             "Write an improved answer. Reply with the answer only.")


class SrpoConfig(Section):
    """SRPO's two prompt templates (used identically in training, reference scoring and inference) and revisions."""

    generate_template: str = Field(
        "{prompt}", description="Prompt of the generative policy pi(y|x); `{prompt}` is the user's prompt (for chat "
                                "data, the last user message). The default leaves the prompt unchanged.")
    revision_template: str = Field(
        DEFAULT_REVISION_TEMPLATE,
        description="Prompt of the self-improvement policy pi(y'|x, y): `{prompt}` as above, `{example}` the previous "
                    "answer to improve on. Training, reference scoring, `align generate --revisions` and the run's "
                    "revision evaluation all render it the same way.")
    min_example_tokens: int = Field(
        32, ge=1, description="Truncation: a revision sequence too long for data.max_length first loses the end of its "
                              "example answer, down to this many tokens (never the whole example), then the end of its "
                              "completion; both counted in a warning.")
    revisions: int = Field(
        2, ge=0, description="Self-revisions y_1..y_K evaluated before and after training on the evaluation task "
                             "(greedy): the summary reports each revision's accuracy and how often it beats y_0.")
    draft_temperature: float = Field(
        0.0, ge=0.0, description="Also evaluate revisions of sampled drafts: y_0 ~ pi(.|x) at this temperature "
                                 "(seeded by training.seed), revisions greedy; reported under `sampled_draft/`. "
                                 "0: only the all-greedy evaluation.")

    @model_validator(mode="after")
    def _check_placeholders(self) -> "SrpoConfig":
        if "{prompt}" not in self.generate_template:
            raise ValueError("method.srpo.generate_template must contain {prompt}")
        if "{prompt}" not in self.revision_template or "{example}" not in self.revision_template:
            raise ValueError("method.srpo.revision_template must contain {prompt} and {example}")
        return self


class RewardTerm(BaseModel):
    """One weighted reward; any other key is a parameter of that reward function."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(..., description="`arithmetic` (the shipped task's strict verifier), `answer_match` (robust "
                                       "final-answer extraction), `format` (regex `pattern`), `reward_model` (`model:` "
                                       "a local sequence-classification model), or a Python callable `module:function` "
                                       "with signature `(completions: list[str], rows: list[dict], **params) -> list[float]`.")
    weight: float = Field(1.0, description="Weight of this reward in the sum.")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class D3SConfig(Section):
    """D^3S down-sampling (Wang et al., ICLR 2026), docs/ALGORITHMS.md section 8. The paper's schedule values are not
    public: the defaults train early steps on half the rollouts of a group of 8 and a fifth of their tokens (the
    high-entropy minority), late steps on every rollout and 60% of the tokens."""

    enabled: bool = Field(False, description="Down-sample rollouts and tokens after computing advantages with all G.")
    sample_scope: Literal["group", "batch"] = Field(
        "batch", description="`batch` (the paper's D3S, which selects \"across groups\"): the max-variance subset of "
                             "m x prompts rollouts across the step's batch, so a group may keep more or fewer than m; "
                             "`group` (the paper's D3S-I variant): of m rollouts within each group.")
    token_scope: Literal["batch", "sequence"] = Field(
        "batch", description="Top-K% tokens by |A|*H over all kept rollouts of the step (`batch`, per process) or "
                             "within each rollout (`sequence`). Dropped tokens get no gradient and do not count in "
                             "the loss normaliser.")
    m_init: int = Field(4, ge=1, description="Rollouts kept per group at the start of training (at most G).")
    m_final: int = Field(8, ge=1, description="Rollouts kept per group at the end (linear in between, rounded).")
    keep_init: float = Field(20.0, gt=0, le=100, description="Percent of tokens kept at the start.")
    keep_final: float = Field(60.0, gt=0, le=100, description="Percent of tokens kept at the end (linear in between).")


# What each HAPO preset sets where the recipe does not (docs/online_rl.md, "HAPO presets"). `paper`: the paper's
# text; `released`: github.com/starriver030515/HAPO as its recipes run it (verl/trainer/ppo/core_algos.py,
# dp_actor.py, recipe/*.sh). `loss` holds the defaults of the `hapo` loss term's hyperparameters.
HAPO_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"entropy_sign": "paper", "tau": 0.1, "signal_source": "rollout_step", "score_temperature": "sampled",
              "loss": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": None}},
    "released": {"entropy_sign": "released_code", "tau": 0.05, "signal_source": "micro_batch",
                 "score_temperature": "base", "loss": {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 10.0}},
}


@dataclass(frozen=True)
class HapoSettings:
    entropy_sign: str
    tau: float
    signal_source: str
    score_temperature: str
    loss_defaults: dict[str, Any]  # the `hapo` loss term's hyperparameters unless the recipe sets them


class HapoConfig(Section):
    """HAPO's sampling and advantage parts (Liu et al. 2025), docs/ALGORITHMS.md section 9. Its loss parts
    (advantage redistribution, adaptive clipping) are the `hapo` loss's hyperparameters in `method.losses`.
    `preset` fills every key below that the recipe leaves out, and the `hapo` loss term's eps_low, eps_high and
    dual_clip: `paper` (default: the method as the paper writes it) or `released` (the authors' code exactly).
    Code reads the resolved values from `settings`."""

    preset: Literal["paper", "released"] = Field(
        "paper", description="`paper`: entropy_sign paper, tau 0.1, eps 0.2/0.28, no dual clip, signal from pi_old "
                             "per step, tokens scored at their sampled temperature. `released` (the authors' code and "
                             "recipes): entropy_sign released_code, tau 0.05, eps 0.2/0.2, dual clip 10, signal from "
                             "the current policy per micro-batch, tokens scored at rl.temperature. Keys set in the "
                             "recipe win over the preset.")
    entropy_sign: Optional[Literal["paper", "released_code"]] = Field(
        None, description="`paper`: low-entropy tokens get a negative signal (h / |min h|). `released_code`: the "
                          "released code's h / min h, which makes every signal non-negative and disables every "
                          "low-entropy branch. None: from preset.")
    signal_source: Optional[Literal["rollout_step", "micro_batch"]] = Field(
        None, description="Entropies behind the loss's signal ht: `rollout_step`: pi_old's, normalised over "
                                    "every completion token of the step; `micro_batch` (released code): the current "
                                    "policy's in each micro-batch of the update, normalised within it. None: "
                                    "from preset.")
    score_temperature: Optional[Literal["sampled", "base"]] = Field(
        None, description="With adaptive_temperature: `sampled` scores each token (pi_old, pi_theta, reference, "
                          "entropies) under the temperature it was sampled at; `base` (released code) under "
                          "rl.temperature. None: from preset.")
    rho: float = Field(0.8, gt=0, lt=1, description="Quantile of log-entropy that separates high from low entropy.")
    adaptive_temperature: bool = Field(
        False, description="Sample at T * (1 + tau * ht) per token, ht from the previous step's entropy statistics "
                           "(off on the first step).")
    tau: Optional[float] = Field(None, ge=0, lt=1, description="Adaptive temperature range (paper 0.1, released code "
                                                               "0.05). None: from preset.")
    token_level_advantage: bool = Field(
        False, description="Token-level group average advantages (length-weighted group mean and std) instead of GRPO's.")
    advantage_fallback: Optional[float] = Field(
        5.0, gt=0, description="With token_level_advantage, a group where any |A| reaches this uses GRPO advantages "
                               "(the released code's safeguard); None: never.")

    @property
    def settings(self) -> HapoSettings:
        """The preset-controlled values, each the recipe's where it sets one, else the preset's. (Resolved here,
        not at validation, so that `--set method.rl.hapo.preset=released` still changes them: overrides apply
        to the validated recipe with every field filled in.)"""
        preset = HAPO_PRESETS[self.preset]
        chosen = {name: getattr(self, name) for name in ("entropy_sign", "tau", "signal_source", "score_temperature")}
        return HapoSettings(**{name: preset[name] if value is None else value for name, value in chosen.items()},
                            loss_defaults=dict(preset["loss"]))


class RLConfig(Section):
    """Online RL (`method.name: grpo`): rollout -> reward -> advantage -> select -> update, docs/ALGORITHMS.md 7-9.
    The policy loss is the single term of `method.losses`: `grpo`, `dapo`, `gspo` or `hapo`."""

    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts (groups) per training step, per process.")
    max_new_tokens: int = Field(64, ge=1, description="L_max: completion budget; completions without an end token are truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (HAPO's T_base).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    generation_batch_size: int = Field(16, ge=1, description="Prompts per generate call (each yields G completions).")
    passes: int = Field(1, ge=1, description="Optimisation passes over each step's rollouts (GRPO's mu).")
    mini_batches: int = Field(1, ge=1, description="Optimiser steps per pass; each is split into micro-batches of "
                                                   "training.batch_size completions (gradient accumulation).")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal and sample more "
                                                      "prompts until prompts_per_step groups remain.")
    max_sampling_rounds: int = Field(4, ge=1, description="Dynamic sampling gives up after this many rounds and trains "
                                                          "on the groups it has.")
    overlong_shaping: bool = Field(False, description="DAPO: add 0 up to L_max - overlong_buffer tokens, then down to -1 "
                                                      "at L_max, to the reward.")
    overlong_buffer: int = Field(4, ge=0, description="L_cache of the overlong shaping.")
    mask_truncated: bool = Field(False, description="DAPO overlong filtering: truncated completions get no gradient "
                                                    "(they still count in their group's advantages).")
    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="arithmetic")],
                                      description="Reward terms, summed with weights: `- {name: arithmetic, weight: 1.0}`.")
    d3s: D3SConfig = Field(default_factory=D3SConfig, description="D^3S sample- and token-level down-sampling.")
    hapo: HapoConfig = Field(default_factory=HapoConfig, description="HAPO adaptive temperature and token-level advantages.")

    @model_validator(mode="after")
    def _check_sizes(self) -> "RLConfig":
        d3s = self.d3s
        if d3s.enabled and max(d3s.m_init, d3s.m_final) > self.num_generations:
            raise ValueError(f"method.rl.d3s.m_init/m_final ({d3s.m_init}, {d3s.m_final}) must not exceed "
                             f"method.rl.num_generations ({self.num_generations})")
        if not self.rewards:
            raise ValueError("method.rl.rewards needs at least one reward")
        return self


class RankerConfig(Section):
    """How iterative methods score sampled responses (align_cli/iterative/rankers.py); equal scores are ties and make no pair."""

    name: Literal["rule", "reward_model", "judge"] = Field(
        "rule", description="`rule`: the shipped task's verifier (needs an `answer` per prompt): 1 exactly right, 0.5 the "
                            "right result in a wrong format, 0.25 a wrong result in the bare-equation format, 0 else. "
                            "`reward_model`: a Hugging Face sequence-classification model (`model`), batched. `judge`: "
                            "an OpenAI-compatible endpoint judging every pair of a prompt's responses (round robin; a "
                            "response's score is its summed win probability), with retries and a disk cache in the run dir.")
    model: Optional[str] = Field(None, description="`reward_model`: the model directory. `judge`: the model name the "
                                                   "endpoint serves.")
    base_url_env: str = Field("ALIGN_JUDGE_BASE_URL", description="`judge`: environment variable holding the endpoint's "
                                                                  "base URL (e.g. http://127.0.0.1:8000/v1).")
    api_key_env: str = Field("OPENAI_API_KEY", description="`judge`: environment variable holding the API key (sent only "
                                                           "in the Authorization header; local servers need none).")
    batch_size: int = Field(16, ge=1, description="`reward_model`: sequences per forward.")
    concurrency: int = Field(4, ge=1, description="`judge`: requests in flight at once.")
    max_retries: int = Field(5, ge=0, description="`judge`: retries per request, with exponential backoff.")


class SamplingConfig(Section):
    """Sampling responses for iterative methods (align_cli/iterative/sampling.py)."""

    samples_per_prompt: int = Field(5, ge=2, description="K responses sampled per prompt (5 in the SPPO/APO pipelines).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled response in tokens.")
    generation_batch_size: int = Field(16, ge=1, description="Prompts per generate call (each yields K responses).")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="`auto`: vLLM when it is installed and a GPU is present, else transformers `generate`; "
                            "APO's extrapolated_logits always runs on transformers (two models per decoding step).")
    ranker: RankerConfig = Field(default_factory=RankerConfig, description="Scores the sampled responses.")


class ApoConfig(SamplingConfig):
    """APO (He, Yuan, Gu 2024; docs/ALGORITHMS.md 6): T iterations of sample -> rank -> best vs worst -> proximal step
    with the extrapolated reference. `data.train` holds the prompts (with `answer` for the rule ranker); `data.eval`
    (pairs), when given, is each iteration's held-out pair set; `evaluation` measures task accuracy per iteration."""

    iterations: int = Field(3, ge=1, description="T: generate-rank-train iterations.")
    prompts_per_iteration: int = Field(64, ge=1, description="Prompts sampled per iteration: iteration t takes the t-th "
                                                            "block of data.train (fresh prompts, wrapping around).")
    alpha: float = Field(0.3, ge=0, description="Momentum: the anchor of iteration t+1 is (1+alpha)*logp(pihat_t) - "
                                                "alpha*logp(pihat_{t-1}) - log Z(x), from the two checkpoints; log Z "
                                                "cancels in margin losses (dpo, cdpo, rdpo, hinge) and is estimated "
                                                "from the samples for the others (sppo, ipo, fdpo), which then need "
                                                "sample_from: policy, temperature 1, top_p 1. 0: plain iterative DPO.")
    sample_from: Literal["extrapolated_logits", "extrapolated_weights", "policy"] = Field(
        "extrapolated_logits", description="Which policy samples iteration t+1's responses: per-token logits "
                                           "(1+alpha)*z_t - alpha*z_{t-1} (both checkpoints run while decoding), the "
                                           "weights theta_t + alpha*(theta_t - theta_{t-1}) (cheap heuristic), or the "
                                           "trained pihat_t. The first iteration always samples the starting model.")


class CurryConfig(SamplingConfig):
    """Curry-DPO (Pattnaik et al. 2024; docs/ALGORITHMS.md 5): several pairs per prompt (best vs each lower-rated),
    trained easy to hard. The sampling keys and `ranker` apply with `responses: generated`."""

    variant: Literal["iterative", "single_stage"] = Field(
        "iterative", description="`iterative`: stage k trains on the k-th easiest pair of every prompt, from stage k-1's "
                                 "model, which is also its reference. `single_stage`: one unshuffled easy-to-hard pass "
                                 "over all pairs with the fixed starting reference.")
    criterion: Literal["rating_gap", "reference_margin"] = Field(
        "rating_gap", description="Easiest first by the largest rating gap, or by the starting reference's largest "
                                  "log-prob margin logp(chosen) - logp(rejected) (computed once, before stage 1).")
    stages: Optional[int] = Field(None, ge=1, description="Use only the first N difficulty levels; None: all (N-1 for "
                                                          "N responses per prompt).")
    responses: Literal["rated", "generated"] = Field(
        "rated", description="`rated`: data.train rows hold rated responses (`columns.completions`, with `response` "
                             "and `score` keys). `generated`: data.train holds prompts; samples_per_prompt responses "
                             "are sampled from the starting model and scored by the ranker.")


class MethodConfig(Section):
    name: Literal[METHOD_NAMES] = Field(  # align_cli/methods.py: METHODS
        "dpo", description="Training method; all three run the same offline pairwise trainer. `dpo`: any pairwise loss "
                           "(dpo, ipo, fdpo, ...). `tpo`: triple data (gold, chosen, rejected), reference-free. `srpo`: "
                           "pairs plus self-revision sequences, and revision evaluation. Without `losses`, the loss of "
                           "the same name is used. `grpo`: online RL (align_cli/rl) with one loss term `grpo`, "
                           "`dapo`, `gspo` or `hapo` and the `rl` section. `apo` and `curry_dpo`: iterative loops "
                           "around the pairwise trainer (align_cli/iterative) with the `apo` / `curry_dpo` section.")
    losses: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="dpo")],
                                   description="Loss terms: `- {name: dpo, weight: 1.0, beta: 0.1}`; the loss is sum_i weight_i * mean(loss_i).")
    srpo: SrpoConfig = Field(default_factory=SrpoConfig, description="SRPO's prompt templates and revision evaluation.")
    rl: RLConfig = Field(default_factory=RLConfig, description="Online RL (`name: grpo`): sampling, rewards, D^3S, HAPO.")
    apo: ApoConfig = Field(default_factory=ApoConfig, description="APO (`name: apo`): iterations, sampling, ranker, momentum.")
    curry_dpo: CurryConfig = Field(default_factory=CurryConfig, description="Curry-DPO (`name: curry_dpo`): curriculum "
                                                                             "variant, ordering criterion, responses.")

    @model_validator(mode="before")
    @classmethod
    def _default_loss_of_method(cls, data: Any) -> Any:
        method = METHODS.get(data.get("name")) if isinstance(data, dict) and isinstance(data.get("name"), str) else None
        if method is not None and method.default_loss and "losses" not in data:
            return {**data, "losses": [{"name": data["name"]}]}
        return data

    @model_validator(mode="after")
    def _check_rl_losses(self) -> "MethodConfig":
        from .losses import RL_LOSSES  # the losses taking per-token log-probs (imports torch: only when checking)

        rl_terms = [term.name for term in self.losses if term.name in RL_LOSSES]
        online = [name for name, method in METHODS.items() if method.online_rl]
        if METHODS[self.name].online_rl and (len(self.losses) != 1 or not rl_terms):
            raise ValueError(f"method {self.name} takes exactly one loss term, one of {', '.join(RL_LOSSES)}; "
                             f"got {[term.name for term in self.losses]}")
        if not METHODS[self.name].online_rl and rl_terms:
            raise ValueError(f"losses {rl_terms} are online RL losses: use them with method.name: {' or '.join(online)}")
        return self


class TrainingConfig(Section):
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps spent warming up (ignored when warmup_steps > 0).")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    batch_size: int = Field(8, ge=1, description="Pairs per device per micro-batch (unless max_tokens_per_batch).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data (used when max_steps is None).")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimiser steps; overrides num_epochs.")
    seed: int = Field(42, description="Seed for initialisation, data order and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Mixed precision; `auto`: bf16 on supporting GPUs, else fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm; None disables clipping.")
    fused_logprobs: bool = Field(True, description="Compute log-probs with the fused LM-head kernel (no [tokens, vocab] logits).")
    eval_every: Optional[int] = Field(None, ge=1, description="Evaluate on held-out pairs every N steps (and at the end).")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch (None: torch's default).")
    shuffle: bool = Field(True, description="Shuffle the training rows each epoch. False: the data's own order (a "
                                            "curriculum's easy-to-hard order, e.g. Curry-DPO's single stage).")
    packing: Literal["auto"] | bool = Field(
        "auto", description="Pack each micro-batch's sequences padding-free into one row (position ids restart per "
                            "sequence; FlexAttention block mask on GPU, an explicit mask with sdpa/eager, varlen with "
                            "flash_attention_2). `auto`: on with CUDA, off on CPU (the explicit mask grows with the "
                            "square of the row). Log-probs equal the padded layout's (docs/throughput.md).")
    share_prompt: bool = Field(
        True, description="With packing: encode each prompt once and let every completion on it (chosen, rejected, "
                          "gold) attend to that copy. Needs a backend that takes a mask (flex_attention, sdpa, eager).")
    max_tokens_per_batch: Optional[int] = Field(
        None, ge=16, description="With packing: fill each micro-batch with whole examples up to this many packed "
                                 "tokens instead of `batch_size` examples (the order stays a pure function of the "
                                 "step, so resume is exact). The loss is the mean over each micro-batch's examples.")
    compile: Literal["auto", True, False] = Field(
        "auto", description="torch.compile each decoder layer (one graph shared by all layers; the first steps pay "
                            "the compilation, cached across runs). auto: on CUDA, not under DeepSpeed (off on CPU); "
                            "a layer that fails to compile runs eagerly, with a warning (align_cli/compilation.py).")
    liger_kernels: Literal["auto", True, False] = Field(
        "auto", description="RMSNorm, rotary embedding and SiLU-and-multiply through Liger-Kernel's fused Triton "
                            "kernels where the decoder runs eagerly on CUDA (same values up to bf16 rounding). "
                            "auto: on CUDA with liger-kernel installed, a llama / mistral / qwen2 / qwen3 model and "
                            "the layers not compiled (inductor fuses the same code); true: wherever asked, an error "
                            "where they cannot run (align_cli/liger_kernels.py).")
    optimizer_in_backward: bool = Field(
        False, description="Step each parameter's AdamW inside backward as soon as its gradient is complete, and free "
                           "that gradient (torchtune's optimizer_in_bwd): the step needs neither all gradients at once "
                           "nor the optimiser's temporaries. Same torch AdamW (fused kernel). Needs max_grad_norm: null "
                           "(the global norm exists only after every parameter has stepped; the norm is still logged), "
                           "one process (no DDP, FSDP, DeepSpeed), no fp16. With gradient_accumulation_steps > 1 only "
                           "the last micro-batch steps (align_cli/optimizer_in_backward.py).")
    offload_activations: bool = Field(
        False, description="With gradient_checkpointing: keep each checkpointed decoder layer's saved input in pinned "
                           "CPU memory between forward and backward, copied on a side CUDA stream and brought back a "
                           "layer ahead. Same results, less GPU memory (align_cli/activation_offload.py).")
    mlp_chunk_tokens: Optional[int] = Field(
        None, ge=64, description="Run each decoder layer's MLP over chunks of this many tokens, each chunk "
                                 "checkpointed, so backward holds one chunk's MLP intermediates instead of the whole "
                                 "row's (a tiled MLP). Same values up to float rounding; costs one more MLP forward a "
                                 "step. Under training.compile the MLP runs outside the compiled graph. null: off "
                                 "(align_cli/chunked_mlp.py).")

    @model_validator(mode="after")
    def _check_memory_levers(self) -> "TrainingConfig":
        if self.optimizer_in_backward and self.max_grad_norm is not None:
            raise ValueError(
                f"training.optimizer_in_backward steps each parameter inside backward, before the global gradient "
                f"norm exists, so it cannot clip to training.max_grad_norm ({self.max_grad_norm}): set "
                f"training.max_grad_norm: null (the norm is still computed, logged and checked for non-finite "
                f"values) or training.optimizer_in_backward: false")
        if self.optimizer_in_backward and self.precision == "fp16":
            raise ValueError("training.optimizer_in_backward cannot run with training.precision: fp16: the grad scaler "
                             "must see every gradient before any parameter steps. Use bf16 or fp32.")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("training.offload_activations moves what gradient checkpointing keeps (each layer's "
                             "input): set training.gradient_checkpointing: true (without it every activation would "
                             "cross the bus twice per step)")
        return self


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: Any = Field("all-linear", description="Modules to adapt: a list of names or `all-linear`.")
    merge_on_save: bool = Field(True, description="Save the final model with adapters merged into a plain HF directory.")


class OutputConfig(Section):
    dir: str = Field("runs/{recipe}", description="Run directory; `{recipe}` is the recipe file's stem.")
    save_final_model: bool = Field(True, description="Write the final model as a Hugging Face directory (`final_model/`).")


class LoggingConfig(Section):
    every: int = Field(1, ge=1, description="Log metrics every N steps.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under `tensorboard/`.")
    progress: bool = Field(True, description="Show a progress bar.")
    profile_step: Optional[int] = Field(
        None, ge=1, description="Profile this optimiser step (1-based, as metrics.jsonl numbers them) with "
                                "torch.profiler: each process writes a summary (wall time, kernel time, time in "
                                "communication / matmuls / attention / the rest, the top kernels) to "
                                "profile/step-<K>-rank<R>.json (align_cli/profiling.py). null: off.")


class CheckpointConfig(Section):
    every: Optional[int] = Field(50, ge=1, description="Save a checkpoint every N steps (and at the end); None: only at the end.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")


class EvaluationConfig(Section):
    task: Optional[Literal["arithmetic"]] = Field(
        "arithmetic", description="Verifiable task for held-out generation accuracy before and after training; None skips it.")
    prompts: str = Field("builtin:arithmetic_prompts", description="Prompts (with an `answer` column) for the task accuracy.")
    split: str = Field("test", description="Split of `prompts`.")
    num_prompts: int = Field(100, ge=1, description="Prompts generated for the task accuracy.")
    max_new_tokens: int = Field(16, ge=1, description="Generation budget per answer.")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")


class Recipe(Section):
    """A whole run: what to train, on what, how, and where the results go."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    peft: LoraConfig = Field(default_factory=LoraConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpointing: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _check_lengths(self) -> "Recipe":
        if self.data.max_prompt_length >= self.data.max_length:
            raise ValueError(f"data.max_prompt_length ({self.data.max_prompt_length}) must be smaller than "
                             f"data.max_length ({self.data.max_length}) to leave room for the completion")
        if self.reference.offload and self.peft.enabled and self.reference.name is None:
            raise ValueError("reference.offload has nothing to offload with LoRA: the reference is the policy with its "
                             "adapter disabled, no second copy. Set reference.offload: false, or name a separate "
                             "reference model in reference.name")
        profiled, steps = self.logging.profile_step, self.training.max_steps
        if profiled is not None and steps is not None and profiled > steps:
            raise ValueError(f"logging.profile_step ({profiled}) is past training.max_steps ({steps}): nothing would "
                             f"be profiled. Choose a step from 1 to {steps} (one after the first, which compiles)")
        return self
