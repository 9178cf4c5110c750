"""Rows and prompts -> the text a tokenizer sees: chat templates, the system prompt, SRPO's two prompt templates,
and prompt + completion tokenised together (TRL 1.16's boundary). Training data (data/preference.py,
data/srpo.py), generation (`align generate`, `align eval`, rollouts) and self-revision all render here, so a
prompt reads the same in training and at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_REVISION_TEMPLATE
from ..errors import UserError


@dataclass(frozen=True)
class Templates:
    generate: str = "{prompt}"
    revision: str = DEFAULT_REVISION_TEMPLATE

    @classmethod
    def from_config(cls, srpo_config) -> Templates:
        return cls(srpo_config.generate_template, srpo_config.revision_template)


def _fill(template: str, prompt: str, example: str = "") -> str:
    # str.replace, not str.format: prompts and answers may contain braces.
    return template.replace("{example}", example).replace("{prompt}", prompt)


def _apply(prompt, text_of):
    """Apply `text_of(content)` to a string prompt, or to the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return text_of(prompt)
    messages = [dict(message) for message in prompt]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError("an SRPO chat prompt needs a user message to put the template in")
    messages[last_user]["content"] = text_of(messages[last_user]["content"])
    return messages


def answer_text(completion) -> str:
    """The text of a completion: a string, or the content of its assistant messages."""
    if isinstance(completion, str):
        return completion
    return "\n".join(str(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant")


def generation_prompt(prompt, templates: Templates):
    """The generative policy's prompt `x` (string or chat messages)."""
    return _apply(prompt, lambda content: _fill(templates.generate, content))


def revision_prompt(prompt, example: str, templates: Templates):
    """The self-improvement policy's prompt `(x, y)`: the prompt with `example` shown to improve on."""
    return _apply(prompt, lambda content: _fill(templates.revision, content, example))


def _with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_prompt_and_completion(tokenizer, prompt, completion, system_prompt: str | None = None) -> tuple[str, str]:
    """The prompt text and the completion text that follows it, chat template applied when conversational."""
    if isinstance(prompt, str) and isinstance(completion, str):
        eos = tokenizer.eos_token or ""
        return prompt, completion if completion.endswith(eos) else completion + eos
    if isinstance(prompt, str) or isinstance(completion, str):
        raise ValueError("prompt and completion must both be strings or both be chat message lists")
    prompt = _with_system_prompt(list(prompt), system_prompt)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + list(completion), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    return prompt_text, full_text[len(prompt_text):]


def prompt_token_ids(tokenizer, text: str, conversational: bool) -> list[int]:
    # A rendered chat template already holds its special tokens; raw text gets the tokenizer's own.
    return tokenizer(text, add_special_tokens=not conversational)["input_ids"]


def common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def tokenise_with_prompt(tokenizer, prompt_text: str, completion_texts: dict[str, str],
                         conversational: bool) -> tuple[list[int], dict[str, list[int]], bool]:
    """`(prompt_ids, {name: completion_ids}, boundary_moved)`: every completion is tokenised together with the
    prompt, so that `prompt_ids + completion_ids` equals the tokenisation of the concatenated text, and starts
    where the shared prompt tokens end (the shortest common prefix with the prompt alone, as TRL 1.16 does).
    `boundary_moved`: the prompt alone tokenises differently at its end (tokens merge across the boundary)."""
    prompt_alone = prompt_token_ids(tokenizer, prompt_text, conversational)
    together = {name: prompt_token_ids(tokenizer, prompt_text + text, conversational)
                for name, text in completion_texts.items()}
    start = min(common_prefix_length(prompt_alone, ids) for ids in together.values())
    return prompt_alone[:start], {name: ids[start:] for name, ids in together.items()}, start < len(prompt_alone)


def render_prompts(tokenizer, prompts: list, system_prompt: str | None = None) -> list[str]:
    """Prompt texts ready for generation: chat template with the generation prompt for message lists;
    strings as they are (see `instruction_prompt`)."""
    rendered = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rendered.append(prompt)
            continue
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError(f"The tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')!r} has no chat "
                            f"template, so chat prompts cannot be rendered: pass --raw (align generate, align eval) "
                            f"to send string prompts as plain text, or use a model with a chat template.")
        messages = list(prompt)
        if system_prompt and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered
