"""The wire format: OpenAI chat completions, streaming chunks, moderations, models and errors.

Requests forbid unknown keys (OpenAI answers ``Unrecognized request argument``); the one
extension is the ``sapguard`` field (``{"mode": "..."}``), which the ``openai`` client sends
with ``extra_body={"sapguard": {...}}``. Responses carry a ``sapguard`` object that clients
which do not know it ignore.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

Role = Literal["system", "user", "assistant"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ----------------------------------------------------------------------------------
class TextPart(_Strict):
    """A text content part (``{"type": "text", "text": ...}``)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Role
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SapguardOptions(_Strict):
    """Per-request options in the ``sapguard`` body field."""

    mode: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    sapguard: SapguardOptions | None = None
    # accepted at their neutral values only (clients send them by default); anything else is a 400
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def unsupported(self) -> str | None:
        """The first option set to something this server cannot do, if any."""
        checks = {
            "presence_penalty": self.presence_penalty in (None, 0), "frequency_penalty": self.frequency_penalty in (None, 0),
            "logprobs": not self.logprobs, "top_logprobs": not self.top_logprobs, "logit_bias": not self.logit_bias,
            "response_format": self.response_format in (None, {"type": "text"}), "tools": not self.tools,
            "tool_choice": self.tool_choice in (None, "none", "auto"),
        }
        return next((name for name, ok in checks.items() if not ok), None)


class ModerationRequest(_Strict):
    """``input``: a string, a list of strings or text parts, or a list of chat messages (one conversation)."""

    input: str | list[str | TextPart | ChatMessage]
    model: str | None = None


# -- responses ---------------------------------------------------------------------------------
class SapguardInfo(BaseModel):
    """What the polytope saw while answering.

    Attributes:
        mode: The steering mode used.
        fired: Any facet fired on the prompt or on a generated token.
        prompt_fired: The polytope fired on the prompt.
        fired_facets: Names of facets that fired, most often first.
        facet_counts: How many generated positions each facet fired on (plus the prompt).
        max_margin: Largest facet margin seen (positive = unsafe); ``None`` before any token.
        edited_tokens: Positions the steering mode edited.
        content_filter: Generation was stopped (or refused) because the polytope fired.
        stopped_at: Index of the generated token at which it was stopped.
    """

    mode: str
    fired: bool = False
    prompt_fired: bool = False
    fired_facets: list[str] = Field(default_factory=list)
    facet_counts: dict[str, int] = Field(default_factory=dict)
    max_margin: float | None = None
    edited_tokens: int = 0
    content_filter: bool = False
    stopped_at: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    sapguard: SapguardInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    sapguard: SapguardInfo | None = None


class ModerationDetail(BaseModel):
    """sapguard's own fields of a moderation result."""

    score: float
    margins: dict[str, float]
    violated: list[str]


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    risk_score: float
    sapguard: ModerationDetail


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sapguard"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
