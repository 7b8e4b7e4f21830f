"""Checks that the official OpenAI Python SDK works unchanged against a running syncgate.

Usage: python openai_sdk_check.py BASE_URL   (for example http://127.0.0.1:8080/v1)

The gateway must serve these models (tests/sdk.rs starts one that does):
  mock         the built-in mock model
  proxied      a provider of type "openai" whose upstream is another syncgate's `mock`
  unavailable  a provider whose API-key variable is unset (answers 503 provider_unavailable)

Prints one line per check ("ok" or "FAIL" and what differed) and exits 1 if any failed.
"""

import sys
import traceback

import openai

MOCK = "mock"
PROXIED = "proxied"
UNAVAILABLE = "unavailable"
PROMPT = "hello from the OpenAI SDK"
EXPECTED_CONTENT = f"This is the mock model. You said: {PROMPT}"
MESSAGES = [{"role": "user", "content": PROMPT}]


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def expect_equal(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: expected {want!r}, got {got!r}")


def expect_usage(usage, what):
    expect(usage is not None, f"{what}: expected usage, got None")
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = getattr(usage, field)
        expect(isinstance(value, int) and value > 0, f"{what}: usage.{field} = {value!r}")
    expect_equal(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens,
        f"{what}: usage.total_tokens",
    )


def check_plain(client, model, reported_model):
    completion = client.chat.completions.create(model=model, messages=MESSAGES)
    expect_equal(completion.object, "chat.completion", "object")
    expect_equal(completion.model, reported_model, "model")
    expect(completion.id, f"id is empty: {completion.id!r}")
    expect_equal(len(completion.choices), 1, "number of choices")
    choice = completion.choices[0]
    expect_equal(choice.message.role, "assistant", "message.role")
    expect_equal(choice.message.content, EXPECTED_CONTENT, "message.content")
    expect_equal(choice.finish_reason, "stop", "finish_reason")
    expect_usage(completion.usage, "plain completion")
    return f"content {choice.message.content!r}, usage {completion.usage.total_tokens} tokens"


def streamed(client, model, include_usage):
    """The chunks of one streamed completion, read to the end with the SDK's iterator."""
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **extra)
    with stream:
        return list(stream)


def joined_content(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def check_stream(client, model):
    chunks = streamed(client, model, include_usage=False)
    expect(len(chunks) > 2, f"expected several chunks, got {len(chunks)}")
    for chunk in chunks:
        expect_equal(chunk.object, "chat.completion.chunk", "chunk object")
        expect(chunk.usage is None, f"usage without include_usage: {chunk.usage!r}")
    expect_equal(joined_content(chunks), EXPECTED_CONTENT, "joined delta content")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    expect_equal([f for f in finish if f], ["stop"], "finish_reason of the chunks")
    return f"{len(chunks)} chunks joined to the plain content"


def check_stream_usage(client, model):
    plain = client.chat.completions.create(model=model, messages=MESSAGES)
    chunks = streamed(client, model, include_usage=True)
    expect_equal(joined_content(chunks), plain.choices[0].message.content, "joined delta content")
    last = chunks[-1]
    expect_equal(last.choices, [], "choices of the usage chunk")
    expect_usage(last.usage, "usage chunk")
    expect_equal(last.usage.total_tokens, plain.usage.total_tokens, "streamed usage.total_tokens")
    return f"last chunk carries usage ({last.usage.total_tokens} tokens, as the plain call)"


def check_embeddings(client):
    texts = ["the quick brown fox", "a lazy dog"]
    first = client.embeddings.create(model=MOCK, input=texts)
    again = client.embeddings.create(model=MOCK, input=texts[0])
    expect_equal(first.object, "list", "object")
    expect_equal([d.index for d in first.data], [0, 1], "indexes")
    a, b = (d.embedding for d in first.data)
    expect(len(a) > 0, "empty vector")
    expect(all(isinstance(x, float) for x in a), f"not floats: {a[:4]!r}")
    expect_equal(len(b), len(a), "length of the second vector")
    expect_equal(again.data[0].embedding, a, "vector of the same text, asked again")
    expect(a != b, "different texts gave the same vector")
    short = client.embeddings.create(model=MOCK, input=texts[0], dimensions=8)
    expect_equal(len(short.data[0].embedding), 8, "length with dimensions=8")
    expect(first.usage.prompt_tokens > 0, f"usage.prompt_tokens = {first.usage.prompt_tokens!r}")
    return f"{len(a)} floats per vector, deterministic, dimensions honoured"


def check_models_list(client):
    ids = [m.id for m in client.models.list()]
    for model in (MOCK, PROXIED, UNAVAILABLE):
        expect(model in ids, f"{model!r} not in {ids!r}")
    return f"ids {ids!r}"


def check_models_retrieve(client):
    model = client.models.retrieve(MOCK)
    expect_equal(model.id, MOCK, "id")
    expect_equal(model.object, "model", "object")
    return f"id {model.id!r}, owned_by {model.owned_by!r}"


LIGHTHOUSE = (
    b"# Lighthouses\n\nA lighthouse keeper trims the lamp wick every evening "
    b"and winds the clockwork that turns the lens.\n"
)
BREAD = b"# Bread\n\nSourdough bread rises slowly and is baked in a hot oven.\n"


def check_knowledge(client):
    """files.create, vector_stores.create, vector_stores.files.upload_and_poll, search and
    responses.create with file_search, as the SDK's own helpers do them."""
    bread = client.files.create(file=("bread.md", BREAD), purpose="assistants")
    expect_equal(bread.object, "file", "file.object")
    expect_equal(bread.filename, "bread.md", "file.filename")
    store = client.vector_stores.create(name="sdk handbook", file_ids=[bread.id])
    expect_equal(store.object, "vector_store", "vector_store.object")
    attached = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("lighthouse.md", LIGHTHOUSE), poll_interval_ms=100
    )
    expect_equal(attached.status, "completed", "upload_and_poll status")
    lighthouse = attached.id
    results = list(client.vector_stores.search(store.id, query="who trims the lighthouse lamp?"))
    expect(results, "search found nothing")
    expect_equal(results[0].file_id, lighthouse, "search's top hit")
    expect_equal(results[0].filename, "lighthouse.md", "search's top hit filename")
    expect(0.0 <= results[0].score <= 1.0, f"score {results[0].score} outside 0..1")
    response = client.responses.create(
        model=MOCK,
        input="Who trims the lamp wick of a lighthouse?",
        tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
        include=["file_search_call.results"],
    )
    expect_equal(response.output[0].type, "file_search_call", "output[0].type")
    message = response.output[1]
    annotation = message.content[0].annotations[0]
    expect_equal(annotation.type, "file_citation", "annotation.type")
    expect_equal(annotation.file_id, lighthouse, "the cited file")
    expect("lamp wick" in response.output_text, f"answer {response.output_text!r}")
    # Streamed, through the SDK's own accumulator (it checks every event's place and identity).
    with client.responses.stream(
        model=MOCK,
        input="Who trims the lamp wick of a lighthouse?",
        tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    expect(len(deltas) > 1, f"the answer came in {len(deltas)} delta(s)")
    expect_equal("".join(deltas), final.output_text, "the streamed deltas")
    expect_equal(final.output_text, response.output_text, "the streamed answer")
    streamed_citation = final.output[1].content[0].annotations[0]
    expect_equal(streamed_citation.file_id, lighthouse, "the streamed citation's file")
    client.vector_stores.delete(store.id)
    client.files.delete(bread.id)
    return (
        f"top hit {results[0].filename} ({results[0].score:.2f}), answer {response.output_text!r}, "
        f"streamed in {len(deltas)} deltas"
    )


def expect_error(cls, status, code, call, param=None):
    """Runs `call`, which must raise `cls` with `status`, error `code` and, when given, `param`."""
    try:
        call()
    except cls as e:
        expect_equal(e.status_code, status, f"{cls.__name__}.status_code")
        expect(isinstance(e.body, dict), f"error body is not an object: {e.body!r}")
        expect_equal(e.code, code, "error code")
        expect_equal(e.body.get("code"), code, "error body code")
        if param is not None:
            expect_equal(e.param, param, "error param")
        return f"{cls.__name__} {e.status_code} {e.code!r}: {e.message}"
    except openai.APIError as e:
        raise AssertionError(f"expected {cls.__name__}, got {type(e).__name__}: {e}") from None
    raise AssertionError(f"expected {cls.__name__}, but the call succeeded")


def describe(e):
    """One failure in a few lines: the error and its causes; where it came from when unexpected."""
    lines = [f"{type(e).__name__}: {e}"]
    cause = e.__cause__
    while cause is not None:
        line = f"      caused by {type(cause).__name__}: {cause}"
        if line != lines[-1]:  # HTTP libraries re-raise the same error under their own names
            lines.append(line)
        cause = cause.__cause__
    if not isinstance(e, (AssertionError, openai.APIError)):
        # Not a mismatch or an HTTP failure: likely the SDK could not parse a reply; show where.
        frames = traceback.format_exception(e, limit=-3, chain=False)
        lines.append("".join(frames).rstrip())
    return "\n".join(lines)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    base_url = sys.argv[1]
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=20.0)
    print(f"openai {openai.__version__} against {base_url}")

    def create(**kwargs):
        return lambda: client.chat.completions.create(**kwargs)

    checks = [
        ("chat plain (mock)", lambda: check_plain(client, MOCK, reported_model=MOCK)),
        ("chat streamed (mock)", lambda: check_stream(client, MOCK)),
        ("chat streamed with include_usage (mock)", lambda: check_stream_usage(client, MOCK)),
        # The upstream names the model it served; the gateway passes its body through as received.
        ("chat plain (proxied)", lambda: check_plain(client, PROXIED, reported_model=MOCK)),
        ("chat streamed (proxied)", lambda: check_stream(client, PROXIED)),
        ("chat streamed with include_usage (proxied)", lambda: check_stream_usage(client, PROXIED)),
        ("embeddings", lambda: check_embeddings(client)),
        ("models.list", lambda: check_models_list(client)),
        ("models.retrieve", lambda: check_models_retrieve(client)),
        ("files, vector stores, search and responses with file_search", lambda: check_knowledge(client)),
        (
            "unknown model raises NotFoundError",
            lambda: expect_error(
                openai.NotFoundError, 404, "model_not_found",
                create(model="no-such-model", messages=MESSAGES),
            ),
        ),
        (
            "unknown model, streamed, raises NotFoundError",
            lambda: expect_error(
                openai.NotFoundError, 404, "model_not_found",
                create(model="no-such-model", messages=MESSAGES, stream=True),
            ),
        ),
        (
            "models.retrieve of an unknown model raises NotFoundError",
            lambda: expect_error(
                openai.NotFoundError, 404, "model_not_found",
                lambda: client.models.retrieve("no-such-model"),
            ),
        ),
        (
            "empty messages raise BadRequestError",
            lambda: expect_error(
                openai.BadRequestError, 400, "invalid_request",
                create(model=MOCK, messages=[]), param="messages",
            ),
        ),
        (
            "unavailable provider raises InternalServerError 503",
            lambda: expect_error(
                openai.InternalServerError, 503, "provider_unavailable",
                create(model=UNAVAILABLE, messages=MESSAGES),
            ),
        ),
    ]
    failed = 0
    for name, check in checks:
        try:
            detail = check()
            print(f"ok    {name}: {detail}")
        except Exception as e:  # every failure is reported, then the next check runs
            failed += 1
            print(f"FAIL  {name}: {describe(e)}")
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
