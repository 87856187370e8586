"""Request bodies of the OpenAI-compatible endpoints, validated strictly: a wrong type is a 400, never a 500.

Fields OpenAI defines but a local server cannot honour (n > 1, logprobs, tools) are refused with a clear message
rather than silently ignored; unknown fields are ignored, as clients add their own (``user``, ``metadata``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationInfo,
                      field_validator)

from tunelab.generation import divisor_problem


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


def number(**bounds: float) -> Any:
    """A JSON number (float or int, never a bool or a string) within ``bounds``. The bounds go on each member of
    the union, so the published OpenAPI schema carries them as JSON Schema's minimum/maximum (on the union itself
    pydantic writes them as 'ge'/'le', which no client or schema tool reads)."""
    return Annotated[StrictFloat, Field(**bounds)] | Annotated[StrictInt, Field(**bounds)]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: number(ge=0, le=2) | None = None
    top_p: number(gt=0, le=1) | None = None
    # Not in OpenAI's API; vLLM's extra sampling fields of these names (the openai client sends them in extra_body)
    top_k: StrictInt | None = Field(None, ge=0, description="sample from the k most likely tokens; 0 or absent: off")
    repetition_penalty: number(gt=0, le=10) | None = Field(None, description="above 1 discourages repeated tokens")
    n: StrictInt | None = Field(None, ge=1, le=1, description="one choice per request (greedy decoding has one answer)")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None

    @field_validator("temperature", "repetition_penalty")
    @classmethod
    def _not_a_vanishing_divisor(cls, value: float | None, info: ValidationInfo) -> float | None:
        problem = divisor_problem(info.field_name, value)  # generation's rule, as for generate and chat
        if problem:
            raise ValueError(problem)
        return value

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None
    tools: None = None

    @field_validator("messages")
    @classmethod
    def _ends_for_an_answer(cls, messages: list[Message]) -> list[Message]:
        if all(m.role in ("system", "developer") for m in messages):
            raise ValueError("needs at least one user or assistant message (only system messages were given)")
        return messages

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=32)]
    echo: StrictBool | None = False
    logprobs: None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def budget(self) -> int | None:
        return self.max_tokens
