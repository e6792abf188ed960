"""Request models of the embedded model server, mirroring vLLM 0.32's OpenAI protocol.

Requests are validated by pydantic models, as vLLM's FastAPI front validates them, so a bad request
gets the status, error type, `param` and (for the checks vLLM writes by hand) the message that vLLM
answers. The vLLM files followed:

- vllm/entrypoints/openai/chat_completion/protocol.py: ChatCompletionRequest's fields and its
  `mode="before"` model validators (response_format, stream_options, logprobs, tool usage);
- vllm/sampling_params.py SamplingParams._verify_args: the range checks on sampling parameters;
- vllm/entrypoints/serve/exception_handling/handlers/validation.py: how a pydantic error becomes a
  400 "Bad Request" body (message "N validation errors:\\n  {...}", cleaned `param`);
- vllm/entrypoints/serve/exception_handling/utils.py sanitize_message (file paths → `<path>`);
- vllm/entrypoints/serve/lora/protocol.py: LoadLoRAAdapterRequest / UnloadLoRAAdapterRequest.

What vLLM accepts but this server cannot do (logprobs, structured outputs, tool calling, echo,
penalties other than repetition_penalty, ...) is refused with a 400 that says so
(`unsupported_features`), never silently ignored. docs/VLLM_DIFFERENCES.md lists every difference.
"""
from __future__ import annotations

import math
import re
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class VLLMValidationError(ValueError):
    """vllm/exceptions.py VLLMValidationError: the message, then "(parameter=…, value=…)"."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None):
        super().__init__(message)
        self.parameter, self.value = parameter, value

    def __str__(self) -> str:
        base = super().__str__()
        extras = ([f"parameter={self.parameter}"] if self.parameter is not None else []) + \
                 ([f"value={self.value}"] if self.value is not None else [])
        return f"{base} ({', '.join(extras)})" if extras else base


class OpenAIBaseModel(BaseModel):
    """vllm/entrypoints/serve/engine/protocol.py OpenAIBaseModel: unknown fields are accepted (vLLM
    logs and ignores them)."""
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------- messages
class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message. vLLM's ChatCompletionMessageParam is a union of OpenAI's typed dicts plus
    CustomChatCompletionMessageParam (any role string); content is a string or a list of parts, and
    only an assistant message may have `content: null` (ChatCompletionAssistantMessageParam)."""
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and "content" in data and data["content"] is None and data.get("role") != "assistant":
            raise ValueError("content may be null only in an assistant message")
        return data

    def text(self) -> str | None:
        """vllm/entrypoints/chat_utils.py with the "string" content format: text parts joined by "\\n"."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise VLLMValidationError(f"content parts of type '{part.type}' are not supported by simkit's "
                                          "embedded server (text only; vLLM takes images and audio on "
                                          "multimodal models)", parameter="messages")
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(BaseModel):
    """vllm/entrypoints/generate/base/protocol.py ResponseFormat: type is one of three literals."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- chat completions
class ChatCompletionRequest(OpenAIBaseModel):
    """vllm/entrypoints/openai/chat_completion/protocol.py ChatCompletionRequest (the fields this
    server reads or refuses; any other field is accepted and ignored, as vLLM does)."""
    messages: list[ChatMessage]
    model: str | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = "none"
    # vLLM's extra sampling parameters
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    prompt_logprobs: int | None = None
    bad_words: list[str] = Field(default_factory=list)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def validate_response_format(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(rf := data.get("response_format"), dict) and \
                rf.get("type") == "json_schema" and rf.get("json_schema") is None:
            raise VLLMValidationError("When response_format type is 'json_schema', the 'json_schema' field must "
                                      "be provided.", parameter="response_format")
        return data

    @model_validator(mode="before")
    @classmethod
    def validate_stream_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("stream_options") and not data.get("stream"):
            raise VLLMValidationError("Stream options can only be defined when `stream=True`.",
                                      parameter="stream_options")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_logprobs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in ("prompt_logprobs", "top_logprobs"):
            value = data.get(name)
            if value is not None and not isinstance(value, (int, float)):
                raise VLLMValidationError(f"`{name}` must be an integer.", parameter=name, value=value)
        if (pl := data.get("prompt_logprobs")) is not None:
            if data.get("stream") and (pl > 0 or pl == -1):
                raise VLLMValidationError("`prompt_logprobs` are not available when `stream=True`.",
                                          parameter="prompt_logprobs")
            if pl < 0 and pl != -1:
                raise VLLMValidationError("`prompt_logprobs` must be a positive value or -1.",
                                          parameter="prompt_logprobs", value=pl)
        if (tl := data.get("top_logprobs")) is not None:
            if tl < 0 and tl != -1:
                raise VLLMValidationError("`top_logprobs` must be a positive value or -1.",
                                          parameter="top_logprobs", value=tl)
            if (tl == -1 or tl > 0) and not data.get("logprobs"):
                raise VLLMValidationError("when using `top_logprobs`, `logprobs` must be set to true.",
                                          parameter="top_logprobs")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_tool_usage(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("tools") == []:
            raise VLLMValidationError("`tools` must not be an empty array. Either provide at least one tool or "
                                      "omit the field entirely.", parameter="tools")
        if "tool_choice" not in data and data.get("tools"):
            data["tool_choice"] = "auto"
        choice = data.get("tool_choice")
        if choice == "none" or choice is None:
            return data
        if data.get("tools") is None:
            raise VLLMValidationError("When using `tool_choice`, `tools` must be set.", parameter="tool_choice")
        if choice not in ("auto", "required") and not isinstance(choice, dict):
            raise VLLMValidationError(f"Invalid value for `tool_choice`: {choice}! Only named tools, \"none\", "
                                      "\"auto\" or \"required\" are supported.", parameter="tool_choice")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_generation_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("continue_final_message") and data.get("add_generation_prompt"):
            raise VLLMValidationError("Cannot set both `continue_final_message` and `add_generation_prompt` "
                                      "to True.")
        return data

    # ------------------------------------------------------------------ after parsing
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(value, parameter name): max_completion_tokens wins over max_tokens (build_tok_params)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def unsupported_features(self) -> VLLMValidationError | None:
        """What vLLM does and this server does not: a 400 that names it, never a silent ignore."""
        checks = [
            ("logprobs", bool(self.logprobs)), ("prompt_logprobs", bool(self.prompt_logprobs)),
            ("echo", self.echo), ("use_beam_search", self.use_beam_search),
            ("response_format", self.response_format is not None and self.response_format.type != "text"),
            ("logit_bias", bool(self.logit_bias)), ("bad_words", bool(self.bad_words)),
            ("presence_penalty", bool(self.presence_penalty)), ("frequency_penalty", bool(self.frequency_penalty)),
            ("min_tokens", self.min_tokens > 0), ("stop_token_ids", bool(self.stop_token_ids)),
            ("include_stop_str_in_output", self.include_stop_str_in_output),
            ("skip_special_tokens", not self.skip_special_tokens),
            ("continue_final_message", self.continue_final_message),
            ("add_generation_prompt", not self.add_generation_prompt),
            ("tool_choice", self.tool_choice not in ("none", None)),
        ]
        for name, used in checks:
            if used:
                return VLLMValidationError(f"`{name}` is not supported by simkit's embedded model server (vLLM "
                                           "supports it; see docs/VLLM_DIFFERENCES.md)", parameter=name)
        return None


def verify_sampling(n: int | None, temperature: float, top_p: float, top_k: int, min_p: float,
                    repetition_penalty: float, presence_penalty: float, frequency_penalty: float,
                    max_tokens: int | None, min_tokens: int, stop: list[str]) -> None:
    """vllm/sampling_params.py SamplingParams._verify_args, in its order (the checks that apply here)."""
    if n is not None and n < 1:  # _verify_num_sequences
        raise VLLMValidationError(f"n must be at least 1, got {n}.")
    if not -2.0 <= presence_penalty <= 2.0:
        raise VLLMValidationError(f"presence_penalty must be in [-2, 2], got {presence_penalty}.")
    if not -2.0 <= frequency_penalty <= 2.0:
        raise VLLMValidationError(f"frequency_penalty must be in [-2, 2], got {frequency_penalty}.")
    if not math.isfinite(repetition_penalty):
        raise VLLMValidationError(f"repetition_penalty must be a finite number, got {repetition_penalty}.")
    if repetition_penalty <= 0.0:
        raise VLLMValidationError(f"repetition_penalty must be greater than zero, got {repetition_penalty}.")
    if not math.isfinite(temperature):
        raise VLLMValidationError(f"temperature must be a finite number, got {temperature}.",
                                  parameter="temperature", value=temperature)
    if temperature < 0.0:
        raise VLLMValidationError(f"temperature must be non-negative, got {temperature}.",
                                  parameter="temperature", value=temperature)
    if temperature > 2.0:
        raise VLLMValidationError(f"temperature must be in [0, 2], got {temperature}.",
                                  parameter="temperature", value=temperature)
    if not 0.0 < top_p <= 1.0:
        raise VLLMValidationError(f"top_p must be in (0, 1], got {top_p}.", parameter="top_p", value=top_p)
    if top_k < -1:
        raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
    if not 0.0 <= min_p <= 1.0:
        raise VLLMValidationError(f"min_p must be in [0, 1], got {min_p}.")
    if max_tokens is not None and max_tokens < 1:
        raise VLLMValidationError(f"max_tokens must be at least 1, got {max_tokens}.", parameter="max_tokens",
                                  value=max_tokens)
    if min_tokens < 0:
        raise VLLMValidationError(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if max_tokens is not None and min_tokens > max_tokens:
        raise VLLMValidationError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                                  f"got {min_tokens}.")
    if any(not s for s in stop):
        raise VLLMValidationError("stop cannot contain an empty string.")


# ---------------------------------------------------------------------------- LoRA endpoints
class LoadLoRAAdapterRequest(BaseModel):
    """vllm/entrypoints/serve/lora/protocol.py"""
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = Field(default=None)


# ---------------------------------------------------------------------------- errors
# vllm/entrypoints/serve/exception_handling/handlers/validation.py
_MAX_REPORTED_ERRORS, _MAX_ERROR_INPUT_CHARS, _MAX_ERROR_CHARS = 10, 200, 1000
_BRACKETED = re.compile(r"[\[\]{}()]")
_INTERNAL_LOC_MARKERS = frozenset({
    "function-wrap", "function-after", "function-before", "function-plain", "json-or-python", "lax-or-strict",
    "chain", "default", "nullable", "tagged-union", "union", "call", "arguments", "is-instance", "is-subclass",
    "callable", "str", "int", "float", "bool", "bytes", "bytearray", "list", "tuple", "dict", "set", "frozenset",
    "complex", "none", "nonetype"})


def _summarize_input(value: Any) -> Any:
    if isinstance(value, str):
        return value[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]" if len(value) > _MAX_ERROR_INPUT_CHARS else value
    if isinstance(value, (bytes, bytearray)):
        return f"<{type(value).__name__} of {len(value)} bytes>"
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = str(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]" if len(text) > _MAX_ERROR_INPUT_CHARS else text


def clean_loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (_BRACKETED.search(str(p)) or str(p).lower() in _INTERNAL_LOC_MARKERS)]
    return ".".join(parts) if parts else ".".join(str(p) for p in loc)


def _format_error(err: dict) -> str:
    err = dict(err)
    if "input" in err:
        err["input"] = _summarize_input(err["input"])
    if isinstance(err.get("loc"), (tuple, list)):
        err["loc"] = clean_loc(tuple(err["loc"]))
    text = str(err)
    return text[:_MAX_ERROR_CHARS] + "...[truncated]" if len(text) > _MAX_ERROR_CHARS else text


def sanitize_message(message: str) -> str:
    """vllm/entrypoints/serve/exception_handling/utils.py sanitize_message."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


def validation_error_body(errors: list[dict]) -> dict:
    """A pydantic error list as vLLM's validation_exception_handler answers it (400 "Bad Request"):
    `param` from a VLLMValidationError raised in a validator, else the first error's cleaned loc."""
    errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in errors]
    param = None
    for e in errors:
        if isinstance(ctx := e.get("ctx"), dict) and isinstance(ctx.get("error"), VLLMValidationError):
            param = ctx["error"].parameter
            break
    if param is None and errors and errors[0].get("loc"):
        param = clean_loc(tuple(errors[0]["loc"]))
    if errors:
        label = "error" if len(errors) == 1 else "errors"
        reported = errors[:_MAX_REPORTED_ERRORS]
        message = f"{len(errors)} validation {label}:\n" + "".join(f"  {_format_error(e)}\n" for e in reported)
        if len(errors) > len(reported):
            message += f"  ...and {len(errors) - len(reported)} more {label}\n"
        message = message.rstrip()
    else:
        message = "Validation error"
    return {"error": {"message": sanitize_message(message), "type": HTTPStatus.BAD_REQUEST.phrase, "param": param,
                      "code": 400}}


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """`model.model_validate(body)`; a failure raises RequestInvalid carrying vLLM's 400 body."""
    try:
        return model.model_validate(body, from_attributes=True)  # FastAPI's: a non-object body is model_attributes_type
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # a VLLMValidationError raised by a model validator is answered as itself (400 BadRequestError,
        # "message (parameter=...)"), as vLLM's api_server does, not as a pydantic error list
        for err in errors:
            if isinstance(ctx := err.get("ctx"), dict) and isinstance(ctx.get("error"), VLLMValidationError):
                raise ctx["error"] from None
        raise RequestInvalid(validation_error_body(errors))


class RequestInvalid(Exception):
    def __init__(self, body: dict):
        super().__init__(body["error"]["message"])
        self.body = body
