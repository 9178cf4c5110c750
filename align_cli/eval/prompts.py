"""The judge prompt of AlpacaEval 2's weighted pairwise judge.

The judge prompt is alpaca_eval's `evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt`
(tatsu-lab/alpaca_eval, Apache-2.0), split into its system and user messages: the verdict is one
token, `m` for the first output shown and `M` for the second, so log-probs of those two tokens give a
soft preference. Changing a word here changes the judge, so `PROTOCOL` names this text in cache keys.
"""

PROTOCOL = "alpaca_eval_clf_gpt4_turbo/v1"
FIRST_TOKEN, SECOND_TOKEN = "m", "M"

JUDGE_SYSTEM = (
    "You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) based on "
    "the quality of their responses to a given instruction. This process will be used to create a leaderboard "
    "reflecting the most accurate and human-preferred answers."
)

JUDGE_USER = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": """{instruction}""",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "m",
        "output": """{output_1}"""
    }},
    {{
        "model_identifier": "M",
        "output": """{output_2}"""
    }}
}}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the best output. Answer by providing the model identifier of the best model. We will use your output as the name of the best model, so make sure your output only contains one of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier
'''

def judge_messages(instruction: str, first: str, second: str) -> list[dict]:
    """Chat messages asking which of two outputs, shown in this order, is better."""
    user = JUDGE_USER.format(instruction=instruction, output_1=first, output_2=second)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
