"""The official `openai` Python package against a running maas node: only base_url and
the key change. Run by chaos-tests/tests/inference.rs with the node's URL, the chat model
and (optionally) an embedding model; the API key is in OPENAI_API_KEY, as the package
reads it.
Prints `N passed, N failed` and exits non-zero on any failure."""

import json
import os
import sys
import time

import openai

base_url, model = sys.argv[1], sys.argv[2]
embedding_model = sys.argv[3] if len(sys.argv) > 3 else None
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=os.environ["OPENAI_API_KEY"], max_retries=0)
passed, failed = 0, 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
    else:
        failed += 1
        print(f"FAILED: {name} {detail}", file=sys.stderr)


try:
    openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-maas-forged0000000000000000000000000000000", max_retries=0).models.list()
    forged = None
except openai.AuthenticationError as err:
    forged = err
check("a forged key is refused with 401", forged is not None and forged.status_code == 401, forged)

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

# Files and batches: a JSONL of chat requests uploaded, run as a batch, its output read.
requests = [
    json.dumps(
        {
            "custom_id": f"sdk-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4},
        }
    )
    for i in range(3)
]
uploaded = client.files.create(file=("requests.jsonl", "\n".join(requests).encode()), purpose="batch")
check("files.create uploads a batch file", uploaded.purpose == "batch" and uploaded.bytes > 0, uploaded)
check("files.retrieve finds it", client.files.retrieve(uploaded.id).id == uploaded.id)
check("files.list lists it", any(f.id == uploaded.id for f in client.files.list()))
try:
    client.files.create(file=("bad.jsonl", b'{"custom_id": "x"}'), purpose="batch")
    check("a bad batch file is an error", False)
except openai.BadRequestError as error:
    check("a bad batch file is a 400 naming the line", "line 1" in str(error), str(error))

batch = client.batches.create(
    input_file_id=uploaded.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"suite": "sdk"},
)
check("batches.create starts a batch", batch.status in ("validating", "in_progress"), batch)
deadline = time.monotonic() + 60
while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
    time.sleep(0.05)
    batch = client.batches.retrieve(batch.id)
check("the batch completes", batch.status == "completed", batch)
check(
    "every request is counted",
    batch.request_counts is not None and (batch.request_counts.total, batch.request_counts.completed) == (3, 3),
    batch.request_counts,
)
check("the metadata comes back", batch.metadata == {"suite": "sdk"}, batch.metadata)
check("batches.list lists it", any(b.id == batch.id for b in client.batches.list(limit=5)))
if batch.output_file_id:
    content = client.files.content(batch.output_file_id)
    results = [json.loads(line) for line in content.text.splitlines() if line.strip()]
    check("the output answers each request once", [r["custom_id"] for r in results] == ["sdk-0", "sdk-1", "sdk-2"], results)
    check(
        "each answer is a chat completion",
        all(r["response"]["status_code"] == 200 and r["response"]["body"]["object"] == "chat.completion" for r in results),
        results,
    )
else:
    check("the batch has an output file", False, batch)
try:
    client.batches.cancel(batch.id)
    check("cancelling a finished batch is an error", False)
except openai.ConflictError as error:
    check("cancelling a finished batch is a 409", error.status_code == 409)

deleted = client.files.delete(uploaded.id)
check("files.delete deletes", deleted.deleted and deleted.id == uploaded.id, deleted)
try:
    client.files.retrieve(uploaded.id)
    check("a deleted file is gone", False)
except openai.NotFoundError as error:
    check("a deleted file is a 404", error.status_code == 404)

# response_format: the tiny random model's answer is not JSON, which is a 422.
try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "answer in JSON"}],
        max_tokens=4,
        temperature=0,
        response_format={"type": "json_object"},
    )
    check("an answer that is not JSON is an error", False)
except openai.UnprocessableEntityError as error:
    check("an answer that is not JSON is a 422 naming response_format", "response_format" in str(error), str(error))

# Embeddings, when an embedding model is deployed: the SDK asks for base64 by default.
if embedding_model:
    embedded = client.embeddings.create(model=embedding_model, input=["hello world", "the model"])
    vectors = [item.embedding for item in embedded.data]
    check("embeddings.create embeds each input", len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0, embedded)
    norm = sum(x * x for x in vectors[0]) ** 0.5
    check("embeddings are unit length", abs(norm - 1.0) < 1e-3, norm)
    check("embeddings report usage", embedded.usage.prompt_tokens > 0, embedded.usage)
    as_floats = client.embeddings.create(model=embedding_model, input="hello world", encoding_format="float")
    check(
        "float and base64 encodings agree",
        all(abs(a - b) < 1e-6 for a, b in zip(as_floats.data[0].embedding, vectors[0])),
    )

# Fine-tuning: a chat JSONL uploaded, a LoRA job created through the SDK and followed to
# its end (`tuning` is maas's addition, sent in extra_body).
example = {"messages": [{"role": "user", "content": "what is maas"}, {"role": "assistant", "content": "maas is the answer"}]}
training = client.files.create(file=("train.jsonl", "\n".join([json.dumps(example)] * 4).encode()), purpose="fine-tune")
job = client.fine_tuning.jobs.create(
    model="tiny",
    training_file=training.id,
    suffix="sdk",
    hyperparameters={"n_epochs": 2, "batch_size": 2},
    extra_body={"tuning": {"type": "lora", "rank": 4}},
)
check("fine_tuning.jobs.create queues a job", job.status == "queued" and job.id.startswith("ftjob-"), job)
deadline = time.time() + 120
while job.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
    time.sleep(0.5)
    job = client.fine_tuning.jobs.retrieve(job.id)
check(
    "the job succeeds with a model of its own",
    job.status == "succeeded" and (job.fine_tuned_model or "").startswith("tiny-sdk:") and job.trained_tokens > 0,
    job,
)
events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
check("list_events reports each step's loss", sum(1 for e in events if e.type == "metrics") == 4, events)
check("jobs.list lists it", any(j.id == job.id for j in client.fine_tuning.jobs.list(limit=5)))
try:
    client.fine_tuning.jobs.cancel(job.id)
    check("cancelling a finished job is an error", False)
except openai.ConflictError as error:
    check("cancelling a finished job is a 409", error.status_code == 409)
try:
    client.fine_tuning.jobs.create(model="tiny", training_file="file-missing")
    check("a missing training file is an error", False)
except openai.NotFoundError as error:
    check("a missing training file is a 404 naming the file", "file-missing" in str(error), str(error))

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
