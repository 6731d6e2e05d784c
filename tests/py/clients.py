"""The official Python clients (openai, anthropic, ollama) reading a streamed
answer, for tests/clients.rs: the far client end of the request's path
(client -> Reprise -> upstream).

Usage:
  python clients.py MODE BASE_URL
      MODE picks the client call:
        openai-chat          chat.completions.create(stream=True), iterated
        openai-chat-helper   chat.completions.stream() helper, then get_final_completion()
        openai-responses     responses.create(stream=True), iterated
        openai-responses-helper  responses.stream() helper, then get_final_response()
        anthropic-create     messages.create(stream=True), iterated
        anthropic-stream     messages.stream() helper: text_stream, then get_final_message()
        ollama-chat          ollama.Client.chat(stream=True), iterated
      BASE_URL is what the SDK is given (Reprise's URL, or the upstream's).
  python clients.py resume-openai-chat|resume-openai-responses|resume-anthropic|resume-ollama URL
      reads GET URL (Reprise's /_reprise/streams/{id}) with the SDK's own
      stream class (openai, anthropic) or line by line (ollama).

Reports, one JSON object per stdout line, as they happen:
  {"kind":"start","stream_id":s|null}   the response headers arrived
  {"kind":"text","text":s}              one piece of answer text
  {"kind":"done","text":s,"finish":s}   the SDK finished normally (the whole text, its stop reason)
  {"kind":"raised","type":s,"message":s,"code":s|null,"text":s}
                                        the SDK raised: exception class, str(), its
                                        `code` attribute, and the text read before it
A script bug exits 1 with the reason on stderr.
"""

import json
import sys

import httpx

REPRISE_STREAM_ID = "reprise-stream-id"
MESSAGES = [{"role": "user", "content": "Tell me about resumable streams."}]


def emit(report):
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


class Reader:
    """Collects the text and reports each piece."""

    def __init__(self):
        self.text = ""

    def piece(self, text):
        if text:
            self.text += text
            emit({"kind": "text", "text": text})

    def done(self, finish):
        emit({"kind": "done", "text": self.text, "finish": finish})

    def raised(self, err):
        emit(
            {
                "kind": "raised",
                "type": type(err).__name__,
                "message": str(err),
                "code": getattr(err, "code", None),
                "text": self.text,
            }
        )


def openai_client(base_url):
    import openai

    return openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)


def anthropic_client(base_url):
    import anthropic

    return anthropic.Anthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0)


def openai_chat(base_url, r):
    raw = openai_client(base_url).chat.completions.with_raw_response.create(
        model="gpt-test", messages=MESSAGES, stream=True
    )
    emit({"kind": "start", "stream_id": raw.headers.get(REPRISE_STREAM_ID)})
    finish = None
    for chunk in raw.parse():
        for choice in chunk.choices:
            r.piece(choice.delta.content)
            finish = choice.finish_reason or finish
    r.done(finish)


def openai_chat_helper(base_url, r):
    client = openai_client(base_url)
    with client.chat.completions.stream(model="gpt-test", messages=MESSAGES) as stream:
        # The helper keeps the HTTP response private.
        headers = stream._response.headers
        emit({"kind": "start", "stream_id": headers.get(REPRISE_STREAM_ID)})
        for event in stream:
            if event.type == "content.delta":
                r.piece(event.delta)
        final = stream.get_final_completion()
    r.done(final.choices[0].finish_reason)


def openai_responses(base_url, r):
    raw = openai_client(base_url).responses.with_raw_response.create(
        model="gpt-test", input="Tell me about resumable streams.", stream=True
    )
    emit({"kind": "start", "stream_id": raw.headers.get(REPRISE_STREAM_ID)})
    finish = None
    for event in raw.parse():
        if event.type == "response.output_text.delta":
            r.piece(event.delta)
        elif event.type == "response.completed":
            finish = event.response.status
    r.done(finish)


def openai_responses_helper(base_url, r):
    client = openai_client(base_url)
    with client.responses.stream(model="gpt-test", input="Tell me about resumable streams.") as stream:
        # The helper keeps the HTTP response private.
        headers = stream._response.headers
        emit({"kind": "start", "stream_id": headers.get(REPRISE_STREAM_ID)})
        for event in stream:
            if event.type == "response.output_text.delta":
                r.piece(event.delta)
        final = stream.get_final_response()
    r.done(final.status)


def anthropic_create(base_url, r):
    raw = anthropic_client(base_url).messages.with_raw_response.create(
        model="claude-test", max_tokens=64, messages=MESSAGES, stream=True
    )
    emit({"kind": "start", "stream_id": raw.headers.get(REPRISE_STREAM_ID)})
    finish = None
    for event in raw.parse():
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            r.piece(event.delta.text)
        elif event.type == "message_delta":
            finish = event.delta.stop_reason
    r.done(finish)


def anthropic_stream(base_url, r):
    client = anthropic_client(base_url)
    with client.messages.stream(model="claude-test", max_tokens=64, messages=MESSAGES) as stream:
        emit({"kind": "start", "stream_id": stream.response.headers.get(REPRISE_STREAM_ID)})
        for text in stream.text_stream:
            r.piece(text)
        final = stream.get_final_message()
    r.done(final.stop_reason)


def ollama_chat(base_url, r):
    import ollama

    started = {}

    def on_response(response):
        started["id"] = response.headers.get(REPRISE_STREAM_ID)
        emit({"kind": "start", "stream_id": started["id"]})

    client = ollama.Client(host=base_url, event_hooks={"response": [on_response]})
    finish = None
    for part in client.chat(model="llama-test", messages=MESSAGES, stream=True):
        r.piece(part.message.content)
        if part.done:
            finish = part.done_reason
    r.done(finish)


def resume_openai(url, r, cast_to, text_of):
    import openai

    client = openai_client("http://unused.invalid/v1")
    # An absolute URL is used as is; the SDK's own Stream decodes the SSE.
    stream = client.get(url, cast_to=cast_to, stream=True, stream_cls=openai.Stream[cast_to])
    emit({"kind": "start", "stream_id": stream.response.headers.get(REPRISE_STREAM_ID)})
    finish = None
    for item in stream:
        text, fin = text_of(item)
        r.piece(text)
        finish = fin or finish
    r.done(finish)


def resume_openai_chat(url, r):
    from openai.types.chat import ChatCompletionChunk

    def text_of(chunk):
        choice = chunk.choices[0] if chunk.choices else None
        return (choice.delta.content, choice.finish_reason) if choice else (None, None)

    resume_openai(url, r, ChatCompletionChunk, text_of)


def resume_openai_responses(url, r):
    from openai.types.responses import ResponseStreamEvent

    def text_of(event):
        if event.type == "response.output_text.delta":
            return event.delta, None
        if event.type == "response.completed":
            return None, event.response.status
        return None, None

    resume_openai(url, r, ResponseStreamEvent, text_of)


def resume_anthropic(url, r):
    import anthropic
    from anthropic.types import RawMessageStreamEvent

    client = anthropic_client("http://unused.invalid")
    stream = client.get(
        url,
        cast_to=RawMessageStreamEvent,
        stream=True,
        stream_cls=anthropic.Stream[RawMessageStreamEvent],
    )
    emit({"kind": "start", "stream_id": stream.response.headers.get(REPRISE_STREAM_ID)})
    finish = None
    for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            r.piece(event.delta.text)
        elif event.type == "message_delta":
            finish = event.delta.stop_reason
    r.done(finish)


def resume_ollama(url, r):
    import ollama

    finish = None
    with httpx.stream("GET", url, timeout=60) as response:
        emit({"kind": "start", "stream_id": response.headers.get(REPRISE_STREAM_ID)})
        # Split on LF only: iter_lines() also splits inside JSON strings at
        # U+2028 and friends.
        buf = b""
        for chunk in response.iter_bytes():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                part = json.loads(line)
                if err := part.get("error"):
                    raise ollama.ResponseError(err)
                r.piece(part["message"]["content"])
                if part.get("done"):
                    finish = part.get("done_reason")
    r.done(finish)


MODES = {
    "openai-chat": openai_chat,
    "openai-chat-helper": openai_chat_helper,
    "openai-responses": openai_responses,
    "openai-responses-helper": openai_responses_helper,
    "anthropic-create": anthropic_create,
    "anthropic-stream": anthropic_stream,
    "ollama-chat": ollama_chat,
    "resume-openai-chat": resume_openai_chat,
    "resume-openai-responses": resume_openai_responses,
    "resume-anthropic": resume_anthropic,
    "resume-ollama": resume_ollama,
}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in MODES:
        sys.exit(f"usage: python clients.py {'|'.join(MODES)} URL")
    mode, url = sys.argv[1], sys.argv[2]
    r = Reader()
    try:
        MODES[mode](url, r)
    except Exception as err:  # noqa: BLE001 - what the SDK raised is the report
        r.raised(err)


if __name__ == "__main__":
    main()
