"""The chat path's events (exo/api/decoding.py) -> Responses output items and the typed stream.

One builder serves both answers: a streamed one sends every event it returns, a whole one keeps
only the final response. Text opens a `message` item (with one `output_text` part) that stays open
until a function call or the end; each call is one `function_call` item, sent whole.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, assert_never

import msgspec

from exo.api.decoding import ChoiceEnded, ChoiceEvent, ReasoningDelta, TextDelta, ToolCallMade
from exo.api.openai_types import ChatMessage, FunctionCall, MessageToolCall, TokenLogprob, Usage
from exo.api.responses import Translated, assistant_turn
from exo.api.responses_types import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningText,
    ResponseError,
    ResponseLifecycle,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)

Final = Literal["completed", "incomplete", "cancelled", "failed"]


class ResponseBuilder:
    def __init__(
        self, response_id: str, body: ResponsesRequest, translated: Translated, created_at: int
    ) -> None:
        self.response_id = response_id
        self._body = body
        self._translated = translated
        self._created_at = created_at
        self._sequence = 0
        self._output: list[OutputItem] = []
        self._open_id: str | None = None  # the message item text is going into
        self._open_text: list[str] = []
        self._calls: list[MessageToolCall] = []
        self._texts: list[str] = []
        self._logprobs: list[TokenLogprob] = []  # not yet sent in a delta
        self._open_logprobs: list[TokenLogprob] = []
        self._reasoning_id: str | None = None  # the reasoning item thinking is going into
        self._reasoning_text: list[str] = []
        self.final: ResponseObject | None = None

    def start(self) -> list[StreamEvent]:
        snapshot = self.snapshot("in_progress")
        return self._numbered(
            [
                ResponseLifecycle("response.created", snapshot),
                ResponseLifecycle("response.in_progress", snapshot),
            ]
        )

    def feed(self, event: ChoiceEvent) -> list[StreamEvent]:
        match event:
            case TextDelta(text=text, logprobs=logprobs):
                self._logprobs += logprobs  # may come before their text (held back by the decoder)
                if not text:
                    return []
                return self._numbered([*self._close_reasoning("completed"), *self._text(text)])
            case ToolCallMade():
                closed = [*self._close_reasoning("completed"), *self._close_message("completed")]
                return self._numbered([*closed, *self._call(event)])
            case ChoiceEnded():
                return []  # the end is `finish`: it needs the run's usage
            case ReasoningDelta(text=text):
                return self._numbered(self._reasoning(text) if text else [])
            case _:
                assert_never(event)

    def finish(self, ended: ChoiceEnded | None, usage: Usage, *, cancelled: bool) -> list[StreamEvent]:
        """The last events: the open message closed, then response.completed / incomplete."""
        cut = ended is not None and ended.reason == "length"
        closing: ItemStatus = "incomplete" if cut or cancelled else "completed"
        events = [*self._close_reasoning(closing), *self._close_message(closing)]
        if cancelled:
            status: Final = "cancelled"
        else:
            status = "incomplete" if cut else "completed"
        self.final = self.snapshot(
            status,
            usage=_usage(usage),
            incomplete=IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
        )
        # No cancelled event exists in OpenAI's stream: a cancelled response ends as incomplete does.
        name = "response.completed" if status == "completed" else "response.incomplete"
        return self._numbered([*events, ResponseLifecycle(name, self.final)])

    def fail(self, message: str, usage: Usage | None) -> list[StreamEvent]:
        """A stage failed mid-answer: response.failed, with what was produced so far."""
        events = [*self._close_reasoning("incomplete"), *self._close_message("incomplete")]
        self.final = self.snapshot(
            "failed",
            usage=None if usage is None else _usage(usage),
            error=ResponseError("server_error", message),
        )
        return self._numbered([*events, ResponseLifecycle("response.failed", self.final)])

    def snapshot(
        self,
        status: ResponseStatus,
        *,
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
        incomplete: IncompleteDetails | None = None,
    ) -> ResponseObject:
        body = self._body
        return ResponseObject(
            id=self.response_id,
            created_at=self._created_at,
            status=status,
            model=body.model,
            output=list(self._output),
            instructions=body.instructions,
            previous_response_id=body.previous_response_id,
            max_output_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            tools=self._translated.tools,
            tool_choice=self._translated.tool_choice,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            text=self._translated.text,
            top_logprobs=body.top_logprobs,
            metadata=dict(body.metadata or {}),
            store=body.store,
            usage=usage,
            error=error,
            incomplete_details=incomplete,
            completed_at=int(time.time()) if status == "completed" else None,
            user=body.user,
            truncation=body.truncation or "disabled",
        )

    def conversation(self) -> list[ChatMessage]:
        """What a response chained to this one continues: the input and this answer."""
        answer = assistant_turn("".join(self._texts), self._calls)
        return [*self._translated.conversation, *([answer] if answer is not None else [])]

    # --- internals --------------------------------------------------------------------------

    def _text(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        index = len(self._output)
        if self._open_id is None:
            self._open_id = f"msg_{uuid.uuid4().hex}"
            self._open_text = []
            self._open_logprobs = []
            item = OutputMessage(self._open_id, "in_progress", [])
            events += [
                OutputItemEvent("response.output_item.added", index, item),
                ContentPartEvent("response.content_part.added", self._open_id, index, 0, OutputText("")),
            ]
        self._open_text.append(text)
        self._texts.append(text)
        logprobs, self._logprobs = self._logprobs, []
        self._open_logprobs += logprobs
        events.append(TextDeltaEvent("response.output_text.delta", self._open_id, index, 0, text, logprobs))
        return events

    def _reasoning(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = [*self._close_message("completed")]
        index = len(self._output)
        if self._reasoning_id is None:
            self._reasoning_id = f"rs_{uuid.uuid4().hex}"
            self._reasoning_text = []
            item = OutputReasoning(self._reasoning_id, "in_progress", [])
            events.append(OutputItemEvent("response.output_item.added", index, item))
        self._reasoning_text.append(text)
        events.append(
            ReasoningDeltaEvent("response.reasoning_text.delta", self._reasoning_id, index, 0, text)
        )
        return events

    def _close_reasoning(self, status: ItemStatus) -> list[StreamEvent]:
        if self._reasoning_id is None:
            return []
        item_id, index, text = self._reasoning_id, len(self._output), "".join(self._reasoning_text)
        self._reasoning_id = None
        item = OutputReasoning(item_id, status, [ReasoningText(text)])
        self._output.append(item)
        return [
            ReasoningDoneEvent("response.reasoning_text.done", item_id, index, 0, text),
            OutputItemEvent("response.output_item.done", index, item),
        ]

    def _close_message(self, status: ItemStatus) -> list[StreamEvent]:
        if self._open_id is None:
            return []
        item_id, index, text = self._open_id, len(self._output), "".join(self._open_text)
        self._open_id = None
        logprobs = self._open_logprobs + self._logprobs
        self._logprobs = []
        part = OutputText(text, [], logprobs)
        item = OutputMessage(item_id, status, [part])
        self._output.append(item)
        return [
            TextDoneEvent("response.output_text.done", item_id, index, 0, text, logprobs),
            ContentPartEvent("response.content_part.done", item_id, index, 0, part),
            OutputItemEvent("response.output_item.done", index, item),
        ]

    def _call(self, call: ToolCallMade) -> list[StreamEvent]:
        index = len(self._output)
        item_id = f"fc_{uuid.uuid4().hex}"
        self._calls.append(MessageToolCall(call.id, FunctionCall(call.name, call.arguments)))
        done = OutputFunctionCall(item_id, call.id, call.name, call.arguments, "completed")
        self._output.append(done)
        return [
            OutputItemEvent(
                "response.output_item.added",
                index,
                msgspec.structs.replace(done, arguments="", status="in_progress"),
            ),
            ArgumentsDeltaEvent("response.function_call_arguments.delta", item_id, index, call.arguments),
            ArgumentsDoneEvent(
                "response.function_call_arguments.done", item_id, index, call.name, call.arguments
            ),
            OutputItemEvent("response.output_item.done", index, done),
        ]

    def _numbered(self, events: list[StreamEvent]) -> list[StreamEvent]:
        numbered: list[StreamEvent] = []
        for event in events:
            numbered.append(msgspec.structs.replace(event, sequence_number=self._sequence))
            self._sequence += 1
        return numbered


def _usage(usage: Usage) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details is not None else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(0),
        total_tokens=usage.total_tokens,
    )
