"""The official `openai` Python package against a running maas node: only base_url and
the key change. Run by chaos-tests/tests/inference.rs with the node's URL and the model.
Prints `N passed, N failed` and exits non-zero on any failure."""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed-yet", max_retries=0)
passed, failed = 0, 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
    else:
        failed += 1
        print(f"FAILED: {name} {detail}", file=sys.stderr)


models = [m.id for m in client.models.list()]
check("models.list lists the deployment", model in models, models)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0
)
check("chat returns a message", chat.choices[0].message.role == "assistant", chat)
check("chat has usage", chat.usage.completion_tokens >= 1 and chat.usage.total_tokens > chat.usage.prompt_tokens)

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello"}],
    max_tokens=6,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
check("streamed text equals the whole answer", "".join(pieces) == chat.choices[0].message.content, pieces)
check("the stream ends with a finish reason", finish in ("stop", "length"), finish)
check("the stream carries usage", usage is not None and usage.completion_tokens == chat.usage.completion_tokens)

completion = client.completions.create(model=model, prompt="the model", max_tokens=4, seed=3)
check("completions return text", isinstance(completion.choices[0].text, str))

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    check("an unknown model is an error", False)
except openai.NotFoundError as error:
    check("an unknown model is a 404", error.status_code == 404)

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=-3)
    check("a negative max_tokens is an error", False)
except openai.BadRequestError as error:
    check("a negative max_tokens is a 400 naming it", "max_tokens" in str(error), str(error))

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
