"""Drives `pagoda serve` with the official `openai` Python client.

Usage: python3 openai_client.py BASE_URL API_KEY. Exits non-zero (an
AssertionError or the client's exception) when anything is off.
"""

import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

models = client.models.list()
model = models.data[0].id
assert len(models.data) == 1, models

# Chat, whole.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=16,
    temperature=0,
)
assert r.object == "chat.completion", r
text = r.choices[0].message.content
assert text, r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 0, r.usage
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# Chat, streamed, with usage: the same greedy text.
pieces, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(pieces) == text, (pieces, text)
assert finish == r.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

# Chat with logprobs.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count: 1, 2,"}],
    max_completion_tokens=5,
    logprobs=True,
    top_logprobs=3,
    seed=11,
)
content = r.choices[0].logprobs.content
assert content and all(len(t.top_logprobs) == 3 for t in content), r
assert all(t.logprob <= 0 for t in content)

# Text completions, whole and streamed.
c = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0
)
assert c.object == "text_completion" and c.choices[0].text, c
streamed = "".join(
    ch.choices[0].text
    for ch in client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    if ch.choices
)
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

# n and seed.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Pick a word."}],
    max_tokens=6,
    n=2,
    seed=3,
)
assert [ch.index for ch in r.choices] == [0, 1], r

# Errors come back as the client's exceptions, with the server's message.
try:
    client.chat.completions.create(model=model, messages=[])
    raise AssertionError("an empty message list was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "messages" in str(e), e
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e

print("openai client: all checks passed")
