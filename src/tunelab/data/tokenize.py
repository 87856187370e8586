"""Chat templates and the supervised-token mask.

Masking works on characters, not on guessed token boundaries: for every assistant turn i the template is
rendered for messages[:i] with the generation prompt (everything the model is given) and for messages[:i+1]
(everything through the end of the turn). The characters between the two are the assistant's content plus
the template's end-of-turn marker; trailing whitespace after the marker is left out. Tokens whose character
offsets overlap those spans are supervised. This supervises every assistant turn and always the end-of-turn
token, whatever the pad token is, because the mask never looks at token ids.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import DataError, Example
from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token that takes no loss (PyTorch cross_entropy's ignore_index)
NO_TASK = -1  # task index of an example without a task, and of padding

# tunelab's documented fallback for tokenizers without a chat template: ChatML-style role headers, and each
# turn closed by the tokenizer's own EOS token, so "stop" is a token the model already knows.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss is taken (not shifted)
    source: str
    truncated: bool = False
    task: str | None = None  # multi-task data: the example's task name
    task_id: int = NO_TASK  # its index in the run's sorted task list (PreparedData.tasks), set by prepare_data

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class WrapsExample:
    """A record of another shape (a prompt, a labeled text, an unpaired completion) around the one TokenizedExample
    that batching lays out: its token ids and source line are the wrapped example's. Subclasses are dataclasses with
    an ``example`` field."""

    example: TokenizedExample

    @property
    def input_ids(self) -> list[int]:
        return self.example.input_ids

    @property
    def source(self) -> str:
        return self.example.source


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: str | None, needs_chat: bool) -> list[str]:
    """Make the tokenizer usable for training and return every change made, so it is logged and reported.

    Nothing is changed silently: the pad token is only set when missing (to EOS; labels never depend on it),
    and the chat template only when the config gives one or the tokenizer has none.
    """
    changes = []
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no EOS token, so examples cannot end; use a tokenizer with eos_token set")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        changes.append(f"pad_token was missing: set to the EOS token {tokenizer.eos_token!r} (labels never use it)")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        changes.append("chat_template replaced by data.chat_template from the config")
    elif needs_chat and not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        changes.append("the tokenizer had no chat template: using tunelab's ChatML fallback with EOS as end of turn")
    for change in changes:
        log.warning("tokenizer: %s", change)
    return changes


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS (what ``prepare_tokenizer`` sets), else 0.

    Padding is masked wherever it is read (attention mask or its own position segment, IGNORE targets), so the
    value only has to be a valid token id; this is the one rule for it."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str] | tuple[str, str]],
                add_generation_prompt: bool = True) -> str:
    """The text the tokenizer's chat template makes of ``messages`` ({role, content} dicts or (role, content)
    pairs); by default ending with the assistant's turn opened, as a prompt for generation. Training, eval and
    serving all render through here, so a run is prompted exactly as it was trained."""
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template, so it cannot render a conversation: to train on one "
                          "set data.chat_template; to use a run without one, generate from plain text "
                          "(`tunelab generate RUN --prompt ...` or /v1/completions)")
    turns = [dict(m) if isinstance(m, Mapping) else {"role": m[0], "content": m[1]} for m in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, example: Example, full: str) -> list[tuple[int, int]]:
    spans = []
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant" or i in example.untrained_turns:
            continue
        before = render_chat(tokenizer, example.messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, example.messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{example.source}: the chat template does not render conversations prefix by prefix (turn {i}), so "
                "assistant tokens cannot be located. Set data.chat_template to a template without history rewriting."
            )
        spans.append((len(before), len(through.rstrip())))
    return spans


def _supervised_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    return [any(start < span_end and end > span_start for span_start, span_end in spans) for start, end in offsets]


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, train_on_prompt: bool = False
) -> TokenizedExample:
    """Token ids and labels of one example, with the loss on assistant turns / the completion (+ end token)."""
    if example.messages:
        text = render_chat(tokenizer, example.messages, add_generation_prompt=False)
        spans = [(0, len(text.rstrip()))] if train_on_prompt else _assistant_spans(tokenizer, example, text)
        # The template already contains any BOS it wants; adding special tokens again would double it.
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, flags = encoded["input_ids"], _supervised_flags(encoded["offset_mapping"], spans)
    else:
        text = example.prompt + example.completion
        spans = [(0 if train_on_prompt else len(example.prompt), len(text))]
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, flags = encoded["input_ids"], _supervised_flags(encoded["offset_mapping"], spans)
        ids, flags = _end_with_supervised_eos(tokenizer, list(ids), flags)
    labels = [token if flag else IGNORE for token, flag in zip(ids, flags)]
    if labels:  # no position predicts the first token, so it never takes a loss (and is not counted as supervised)
        labels[0] = IGNORE
    return TokenizedExample(list(ids), labels, example.source, task=example.task)


def _end_with_supervised_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int], flags: list[bool]) -> tuple[list[int], list[bool]]:
    """Plain text ends with EOS, and that EOS is always supervised (it is how the model learns to stop).

    A tokenizer whose post-processor appends EOS itself (Llama-style ``add_eos_token``) gives that token the
    empty character span (0, 0), which overlaps no supervised span: it is marked supervised here, not added twice.
    """
    if ids and ids[-1] == tokenizer.eos_token_id:
        return ids, flags[:-1] + [True]
    return ids + [tokenizer.eos_token_id], flags + [True]


def apply_length_policy(example: TokenizedExample, max_length: int, policy: str) -> TokenizedExample | None:
    """Truncate, drop (None) or reject an example longer than max_length."""
    if len(example.input_ids) <= max_length:
        return example
    if policy == "error":
        raise DataError(
            f"{example.source}: {len(example.input_ids)} tokens is longer than data.max_length={max_length}. "
            "Raise max_length, or set data.overlong to 'truncate' or 'drop'."
        )
    if policy == "drop":
        return None
    return replace(example, input_ids=example.input_ids[:max_length], labels=example.labels[:max_length], truncated=True)


def prompt_for_generation(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[str, str]:
    """(prompt text, reference answer) for a sample generation: the conversation up to its last assistant turn.
    A preference pair's reference is its chosen answer; a labeled text's is its label; a prompt record's is its
    'reference' column (empty without one)."""
    if example.format in ("preference", "unpaired_preference"):
        prompt = render_chat(tokenizer, example.messages) if example.messages else example.prompt
        return prompt, example.chosen if example.format == "preference" else example.completion
    if example.format == "prompt":  # its 'reference' column (the rewards' default one) is the answer, if it has one
        reference = dict(example.columns).get("reference")
        prompt = render_chat(tokenizer, example.messages) if example.messages else example.prompt
        return prompt, reference if isinstance(reference, str) else ""
    if example.format == "labeled":
        text = render_chat(tokenizer, example.messages, add_generation_prompt=False) if example.messages else example.prompt
        return text, str(example.label)
    if example.messages:
        last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
        prompt = render_chat(tokenizer, example.messages[:last], add_generation_prompt=True)
        return prompt, example.messages[last][1]
    if example.format == "text":  # continued pre-training: continue the first third of the text
        words = example.completion.split(" ")
        cut = max(1, len(words) // 3)
        return " ".join(words[:cut]), " ".join(words[cut:])
    return example.prompt, example.completion
