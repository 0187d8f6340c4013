"""Request bodies. The OpenAI ones accept (and ignore) fields this server has no use for, as
OpenAI-compatible servers do, so tools that send them work; fields whose meaning it cannot honour
(several choices, log-probabilities, tools) are refused rather than silently dropped."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import DEFAULT_METHOD
from .errors import ApiError


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None

    def refuse_unsupported(self, *fields: str) -> None:
        """A 400 for options this server cannot honour, so a client is not misled by their absence."""
        if self.n != 1:
            raise ApiError(400, f"n={self.n}: this server gives one choice per request (n=1)", param="n")
        extra = self.model_extra or {}
        for name in fields:
            if extra.get(name) not in (None, False, 0, [], {}):
                raise ApiError(400, f"{name!r} is not supported by this server; leave it out", param=name)

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"a {self.role} message holds a content part of type {part.get('type')!r}; "
                                    "this server reads text parts only", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str]

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class PackRequest(BaseModel):
    """``POST /v1/packs``: a new pack from edit requests (the layouts ``grace-hooks edit`` reads)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    method: str = DEFAULT_METHOD
    requests: list[Any] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    supersede: bool = False  # the loaded requests it conflicts with stop acting while it is loaded
