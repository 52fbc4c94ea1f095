//! The OpenAI-compatible API on a real `maas` process: a tiny model imported into the
//! repository and deployed on a simulated GPU answers `/v1/models`, chat completions (whole
//! and streamed over SSE, ending in `data: [DONE]`, with usage), text completions, and
//! refuses malformed requests with OpenAI-shaped 4xx errors.

use std::process::Command;
use std::time::Duration;

use maas_chaos_tests::{MaasProcess, one_gpu_node_config, run_cli, tiny_model, wait_until};
use serde_json::{Value, json};

const COOKIE: &str = "inference-test-cookie";

/// Runs a `maas` admin command against `node`; it must succeed.
fn cli(node: &MaasProcess, args: &[&str]) {
    run_cli(&node.base_url, COOKIE, args);
}

async fn serving_node() -> (MaasProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let node = MaasProcess::start_with_config(&one_gpu_node_config(COOKIE, "")).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let model = dir.path().join("tiny");
    tiny_model("llama", &model);
    cli(&node, &["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet"]);
    cli(&node, &["deploy", "tiny", "--name", "chat", "--context", "256", "--sequences", "4"]);
    wait_until("the deployment serves", Duration::from_secs(60), || async {
        let models: Value = maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/models", node.base_url)).await;
        models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "chat"))
    })
    .await
    .unwrap();
    (node, dir)
}

async fn post(node: &MaasProcess, path: &str, body: &Value) -> (u16, Value) {
    let response = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}{path}", node.base_url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_model_answers_the_openai_api() {
    let (node, _dir) = serving_node().await;
    let chat = json!({"model": "chat", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8, "temperature": 0});
    let (status, first) = post(&node, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["choices"][0]["message"]["role"], "assistant");
    let usage = &first["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    assert!((1..=8).contains(&usage["completion_tokens"].as_u64().unwrap()), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
    );
    let (_, again) = post(&node, "/v1/chat/completions", &chat).await;
    assert_eq!(
        again["choices"][0]["message"]["content"], first["choices"][0]["message"]["content"],
        "greedy is deterministic"
    );

    // Streamed: the same text in chunks, a finish reason, usage, then [DONE].
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}/v1/chat/completions", node.base_url))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let body = response.text().await.unwrap();
    let events: Vec<&str> =
        body.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(text, first["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(chunks.iter().any(|c| c["choices"].get(0).is_some_and(|ch| !ch["finish_reason"].is_null())));
    assert_eq!(chunks.last().unwrap()["usage"], first["usage"], "the last chunk carries the usage");

    text_completions_carry_legacy_logprobs(&node).await;

    // Malformed requests: OpenAI-shaped errors naming the problem.
    let cases = [
        (json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404, "model_not_found"),
        (
            json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
            400,
            "max_tokens",
        ),
        (json!({"model": "chat", "messages": []}), 400, "messages"),
        (json!({"model": "chat", "messages": [{"role": "wizard", "content": "hi"}]}), 400, "wizard"),
        (json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 3}), 400, "n = 1"),
        (
            json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
            400,
            "temperature",
        ),
        (
            json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "frobnicate": true}),
            400,
            "frobnicate",
        ),
        (json!({"model": "chat", "messages": [{"role": "user", "content": "word ".repeat(2000)}]}), 400, "context"),
    ];
    for (body, status, mention) in cases {
        let (got, answer) = post(&node, "/v1/chat/completions", &body).await;
        assert_eq!(got, status, "{answer}");
        let error = &answer["error"];
        assert!(error["type"].is_string() && error["message"].is_string(), "OpenAI's error shape: {answer}");
        assert!(answer.to_string().contains(mention), "{answer} should mention {mention}");
    }
    let bad_json = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}/v1/chat/completions", node.base_url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_json.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_package_works_unchanged() {
    let (node, dir) = serving_node().await;
    let bert = dir.path().join("bert");
    tiny_model("bert", &bert);
    cli(&node, &["model", "import", bert.to_str().unwrap(), "--name", "bert", "--quiet"]);
    cli(&node, &["deploy", "bert", "--name", "embed", "--gpus", "0", "--cpu-fallback"]);
    wait_until("the embedding model serves", Duration::from_secs(60), || async {
        let models: Value = maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/models", node.base_url)).await;
        models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "embed"))
    })
    .await
    .unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let base_url = node.base_url.clone();
    // A real key, as a user would create one; the package sends it as a bearer token.
    let key: Value = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{base_url}/v1/keys"))
        // `admin`: fine-tuning adds a model to the key owner's part of the repository.
        .json(&json!({"name": "openai sdk", "scopes": ["inference", "admin"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_key = key["key"].as_str().expect("the new key is shown once").to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .env("OPENAI_API_KEY", api_key)
            .arg(script)
            .arg(base_url)
            .arg("chat")
            .arg("embed")
            .output()
            .expect("python3 runs (.ci/run installs openai)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(output.status.success(), "the openai package's checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bert_model_embeds_and_a_quantised_gguf_model_chats() {
    let (node, dir) = serving_node().await;
    for (arch, name) in [("bert", "bert"), ("llama-gguf", "gguf")] {
        let out = dir.path().join(name);
        tiny_model(arch, &out);
        let path = if name == "gguf" { out.join("tiny-llama-q8_0.gguf") } else { out };
        cli(&node, &["model", "import", path.to_str().unwrap(), "--name", name, "--quiet"]);
    }
    cli(&node, &["deploy", "bert", "--name", "embed", "--gpus", "0", "--cpu-fallback"]);
    cli(&node, &["deploy", "gguf", "--name", "quantised", "--context", "256", "--sequences", "2"]);
    wait_until("both serve", Duration::from_secs(60), || async {
        let models: Value = maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/models", node.base_url)).await;
        let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
        ids.contains(&"embed") && ids.contains(&"quantised")
    })
    .await
    .unwrap();

    let (status, embedded) =
        post(&node, "/v1/embeddings", &json!({"model": "embed", "input": ["hello world", "the model"]})).await;
    assert_eq!(status, 200, "{embedded}");
    let vectors = embedded["data"].as_array().unwrap();
    assert_eq!(vectors.len(), 2);
    for vector in vectors {
        let norm: f64 = vector["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
        assert!((norm - 1.0).abs() < 1e-3, "unit length: {norm}");
    }
    assert!(embedded["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let (status, answer) = post(&node, "/v1/embeddings", &json!({"model": "chat", "input": "hi"})).await;
    assert_eq!(status, 400, "a chat model does not embed: {answer}");

    let (status, answer) = post(
        &node,
        "/v1/chat/completions",
        &json!({"model": "quantised", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
}

/// Text completions with log-probabilities, whole and streamed, in OpenAI's legacy shape.
async fn text_completions_carry_legacy_logprobs(node: &MaasProcess) {
    // Text completions, with log-probabilities.
    let (status, completion) = post(
        node,
        "/v1/completions",
        &json!({"model": "chat", "prompt": "the model", "max_tokens": 4, "logprobs": 2, "seed": 7}),
    )
    .await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["object"], "text_completion");
    let shaped = &completion["choices"][0]["logprobs"];
    let logprobs = shaped["token_logprobs"].as_array().unwrap();
    assert!(!logprobs.is_empty() && logprobs.iter().all(|l| l.as_f64().is_some_and(|l| l <= 0.0)), "{completion}");
    // OpenAI's legacy shape: a {token: logprob} map of the 2 asked-for alternatives per
    // token (one entry where both decode to the same text), and each token's character
    // offset counted from the prompt's start.
    let tokens = shaped["tokens"].as_array().unwrap();
    let top = shaped["top_logprobs"].as_array().unwrap();
    let two = |t: &Value| t.as_object().is_some_and(|m| (1..=2).contains(&m.len()));
    assert!(top.len() == tokens.len() && top.iter().all(two), "{shaped}");
    let offsets: Vec<u64> = shaped["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(offsets.first(), Some(&("the model".len() as u64)), "{shaped}");
    let lengths = tokens.iter().map(|t| t.as_str().unwrap().chars().count() as u64);
    let expected: Vec<u64> =
        lengths.scan("the model".len() as u64, |at, n| Some(std::mem::replace(at, *at + n))).collect();
    assert_eq!(offsets, expected, "{shaped}");
    // Streamed, each token's chunk carries its own: the same tokens and offsets.
    let (_, chunks, done) = stream_events(
        node,
        "/v1/completions",
        &json!({"model": "chat", "prompt": "the model", "max_tokens": 4, "logprobs": 2, "seed": 7, "stream": true}),
    )
    .await;
    assert!(done);
    let streamed: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["logprobs"]).filter(|l| !l.is_null()).collect();
    let streamed_tokens: Vec<Value> = streamed.iter().map(|l| l["tokens"][0].clone()).collect();
    let streamed_offsets: Vec<u64> = streamed.iter().map(|l| l["text_offset"][0].as_u64().unwrap()).collect();
    assert_eq!((&streamed_tokens, &streamed_offsets), (tokens, &offsets), "{chunks:?}");
}

/// A streamed answer's data events: the JSON chunks, and whether it ended in `[DONE]`.
async fn stream_events(node: &MaasProcess, path: &str, body: &Value) -> (reqwest::header::HeaderMap, Vec<Value>, bool) {
    let response = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}{path}", node.base_url))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let events: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).filter(|l| !l.is_empty()).collect();
    let done = events.last() == Some(&"[DONE]");
    let chunks = events.iter().filter(|e| **e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    (headers, chunks, done)
}

async fn post_with_headers(node: &MaasProcess, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}{path}", node.base_url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_answers_are_cached_and_formats_are_enforced() {
    let (node, _dir) = serving_node().await;

    // The response cache: a greedy request is answered by the model once, then from the
    // cache (whole and streamed); a sampled request without a seed never is.
    let greedy = json!({"model": "chat", "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 8, "temperature": 0});
    let (status, headers, first) = post_with_headers(&node, "/v1/chat/completions", &greedy).await;
    assert_eq!(status, 200, "{first}");
    assert!(headers.get("x-maas-cache").is_none(), "the first answer comes from the model");
    let (_, headers, again) = post_with_headers(&node, "/v1/chat/completions", &greedy).await;
    assert_eq!(headers.get("x-maas-cache").map(|v| v.to_str().unwrap()), Some("hit"));
    assert_eq!(again["choices"][0]["message"], first["choices"][0]["message"]);
    assert_eq!(again["usage"], first["usage"]);
    let mut streamed = greedy.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (headers, chunks, done) = stream_events(&node, "/v1/chat/completions", &streamed).await;
    assert!(done);
    assert_eq!(headers.get("x-maas-cache").map(|v| v.to_str().unwrap()), Some("hit"));
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(text, first["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"], first["usage"]);
    let sampled = json!({"model": "chat", "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 4, "temperature": 1});
    for _ in 0..2 {
        let (_, headers, _) = post_with_headers(&node, "/v1/chat/completions", &sampled).await;
        assert!(headers.get("x-maas-cache").is_none(), "sampling without a seed is not cached");
    }
    let metrics =
        maas_chaos_tests::admin_get(COOKIE, format!("{}/metrics", node.base_url)).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("maas_response_cache_total{outcome=\"hit\"} 2")), "{metrics}");

    // response_format: a bad schema is refused up front; the tiny random model's answer is
    // not JSON, which is a 422 naming the failure (and the last event of a stream).
    let mut json_object = greedy.clone();
    json_object["response_format"] = json!({"type": "json_object"});
    let (status, answer) = post(&node, "/v1/chat/completions", &json_object).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "response_format_failed");
    assert!(answer["error"]["message"].as_str().unwrap().contains("not JSON"), "{answer}");
    let mut bad_schema = greedy.clone();
    bad_schema["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}});
    let (status, answer) = post(&node, "/v1/chat/completions", &bad_schema).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "response_format");
    json_object["stream"] = json!(true);
    let (_, chunks, done) = stream_events(&node, "/v1/chat/completions", &json_object).await;
    assert!(done);
    assert_eq!(chunks.last().unwrap()["error"]["code"], "response_format_failed", "{chunks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_rules_refuse_requests_and_cut_answers() {
    let (node, _dir) = serving_node().await;
    let greedy = json!({"model": "chat", "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 8, "temperature": 0});
    let (status, first) = post(&node, "/v1/chat/completions", &greedy).await;
    assert_eq!(status, 200, "{first}");

    // An input keyword refuses the request with the rule's reason.
    let (status, rule) = post(
        &node,
        "/v1/safety/rules",
        &json!({"direction": "input", "kind": "keyword", "pattern": "Forbidden Topic", "reason": "this topic is not allowed here"}),
    )
    .await;
    assert_eq!(status, 201, "{rule}");
    let refused = json!({"model": "chat", "messages": [{"role": "user", "content": "tell me about the FORBIDDEN topic"}], "max_tokens": 4});
    let (status, answer) = post(&node, "/v1/chat/completions", &refused).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "content_filter");
    assert!(answer["error"]["message"].as_str().unwrap().contains("this topic is not allowed here"), "{answer}");
    let (status, answer) =
        post(&node, "/v1/safety/rules", &json!({"direction": "input", "kind": "regex", "pattern": "(unclosed"})).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "pattern");

    // An output keyword taken from the middle of the model's own greedy answer ends the
    // answer before it, with finish reason content_filter, whole and streamed.
    let answer_text = first["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let chars: Vec<char> = answer_text.chars().collect();
    assert!(chars.len() >= 4, "the tiny model answers several characters: {answer_text:?}");
    let start = chars.len() / 2;
    let keyword: String = chars[start..(start + 2).min(chars.len())].iter().collect();
    let (status, output_rule) =
        post(&node, "/v1/safety/rules", &json!({"direction": "output", "kind": "keyword", "pattern": keyword})).await;
    assert_eq!(status, 201, "{output_rule}");
    let (status, headers, filtered) = post_with_headers(&node, "/v1/chat/completions", &greedy).await;
    assert_eq!(status, 200, "{filtered}");
    assert!(headers.get("x-maas-cache").is_none(), "new rules are not answered from the cache");
    assert_eq!(filtered["choices"][0]["finish_reason"], "content_filter", "{filtered}");
    let cut = filtered["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        answer_text.starts_with(cut) && !cut.to_ascii_lowercase().contains(&keyword.to_ascii_lowercase()),
        "{cut:?} / {keyword:?}"
    );
    let mut streamed_filtered = greedy.clone();
    streamed_filtered["stream"] = json!(true);
    streamed_filtered["max_tokens"] = json!(8);
    streamed_filtered["seed"] = json!(1);
    let (_, chunks, done) = stream_events(&node, "/v1/chat/completions", &streamed_filtered).await;
    assert!(done);
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(text, cut, "the stream is cut at the same place");
    assert!(chunks.iter().any(|c| c["choices"].get(0).is_some_and(|ch| ch["finish_reason"] == "content_filter")));

    // The rules are listed and can be deleted; then the answer is whole again.
    let rules: Value = maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/safety/rules", node.base_url)).await;
    assert_eq!(rules["data"].as_array().unwrap().len(), 2, "{rules}");
    for id in [&rule["id"], &output_rule["id"]] {
        let deleted = maas_chaos_tests::admin_client(COOKIE)
            .delete(format!("{}/v1/safety/rules/{}", node.base_url, id.as_str().unwrap()))
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), 200);
    }
    let missing = maas_chaos_tests::admin_client(COOKIE)
        .delete(format!("{}/v1/safety/rules/rule_nope", node.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let (status, _) = post(&node, "/v1/chat/completions", &refused).await;
    assert_eq!(status, 200, "the input rule is gone");
    let (_, headers, whole) = post_with_headers(&node, "/v1/chat/completions", &greedy).await;
    assert_eq!(headers.get("x-maas-cache").map(|v| v.to_str().unwrap()), Some("hit"), "the rule-free answer is cached");
    assert_eq!(whole["choices"][0]["message"]["content"], first["choices"][0]["message"]["content"]);
}

/// Sends `body` to `path` on `node` as `token` (a session token or an API key).
async fn post_as(node: &MaasProcess, token: &str, path: &str, body: &Value) -> (u16, Option<String>, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", node.base_url))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, response.json().await.unwrap_or(Value::Null))
}

async fn get_as(node: &MaasProcess, token: &str, path: &str) -> (u16, String) {
    let response =
        reqwest::Client::new().get(format!("{}{path}", node.base_url)).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn signed_up(node: &MaasProcess, email: &str) -> (String, String) {
    maas_chaos_tests::signed_up(&node.base_url, COOKIE, email).await
}

/// Signs up an administrator and a user (verified with the code from the outbox), gives
/// the user a daily quota of 6 requests and prices the `chat` model; the user's session.
async fn user_with_quota(node: &MaasProcess) -> String {
    let admin = maas_chaos_tests::admin_client(COOKIE);
    let base = node.base_url.clone();
    signed_up(node, "root@example.com").await;
    let (session, dana_id) = signed_up(node, "dana@example.com").await;
    let quota = admin
        .put(format!("{base}/v1/admin/quotas/user/{dana_id}"))
        .json(&json!({"requests_per_day": 6, "requests_per_minute": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(quota.status(), 200);
    let price = admin
        .put(format!("{base}/v1/admin/prices/chat"))
        .json(&json!({"input_per_1k_micros": 1000, "output_per_1k_micros": 2000, "gpu_hour_micros": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(price.status(), 200);
    session
}

/// QUO-1 through the API: parallel requests against a daily quota pass exactly up to it,
/// the rest get 429 with Retry-After naming the limit; the usage records then add up to
/// exactly the answered requests, their tokens and their cost at the admin's prices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_under_concurrency_and_usage_adds_up() {
    let (node, _dir) = serving_node().await;
    let base = node.base_url.clone();
    let session = user_with_quota(&node).await;
    let (status, _, key) =
        post_as(&node, &session, "/v1/keys", &json!({"name": "quota test", "allowed_models": ["chat"]})).await;
    assert_eq!(status, 201, "{key}");
    let key = key["key"].as_str().unwrap().to_owned();
    let (status, _, refused) = post_as(
        &node,
        &key,
        "/v1/chat/completions",
        &json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("model_not_allowed")), "{refused}");

    let requests = (0..16).map(|i| {
        let node_base = base.clone();
        let key = key.clone();
        async move {
            let body = json!({"model": "chat", "messages": [{"role": "user", "content": format!("count to {i}")}], "max_tokens": 4, "temperature": 0.8, "seed": i});
            let response = reqwest::Client::new().post(format!("{node_base}/v1/chat/completions")).bearer_auth(&key).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (status, retry_after, response.json::<Value>().await.unwrap())
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let ok: Vec<&Value> = answers.iter().filter(|(s, _, _)| *s == 200).map(|(_, _, b)| b).collect();
    let refused: Vec<&(u16, Option<String>, Value)> = answers.iter().filter(|(s, _, _)| *s == 429).collect();
    assert_eq!(ok.len(), 6, "QUO-1: exactly the daily quota passes: {answers:?}");
    assert_eq!(refused.len(), 10, "{answers:?}");
    for (_, retry_after, body) in refused {
        assert!(retry_after.as_deref().is_some_and(|s| s.parse::<u64>().unwrap() >= 1), "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("requests_per_day"), "{body}");
    }
    let prompt: u64 = ok.iter().map(|b| b["usage"]["prompt_tokens"].as_u64().unwrap()).sum();
    let completion: u64 = ok.iter().map(|b| b["usage"]["completion_tokens"].as_u64().unwrap()).sum();

    // Usage is recorded as each answer ends; wait for all six.
    wait_until("the usage of the answered requests is recorded", Duration::from_secs(10), || {
        let node_base = base.clone();
        let session = session.clone();
        async move {
            let response =
                reqwest::Client::new().get(format!("{node_base}/v1/usage")).bearer_auth(&session).send().await.unwrap();
            let body: Value = response.json().await.unwrap();
            body["total"]["requests"].as_u64() == Some(6)
        }
    })
    .await
    .unwrap();
    let (status, text) = get_as(&node, &session, "/v1/usage").await;
    assert_eq!(status, 200, "{text}");
    let usage: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(usage["total"]["prompt_tokens"].as_u64(), Some(prompt), "{usage}");
    assert_eq!(usage["total"]["completion_tokens"].as_u64(), Some(completion), "{usage}");
    assert_eq!(usage["total"]["cost_micros"].as_u64(), Some(prompt + 2 * completion), "{usage}");
    assert_eq!(usage["by_model"][0]["model"], "chat", "{usage}");
    let (status, csv) = get_as(&node, &session, "/v1/usage.csv").await;
    assert_eq!(status, 200);
    assert!(csv.starts_with("day,model,key_id,requests"), "{csv}");
    assert!(csv.lines().nth(1).is_some_and(|line| line.contains(",chat,") && line.contains(",6,")), "{csv}");
    let (status, quota) = get_as(&node, &key, "/v1/quota").await;
    assert_eq!(status, 200, "{quota}");
    assert!(quota.contains("\"requests_today\":6"), "{quota}");

    // The deployment's monitoring counts the same requests and tokens, with their latency,
    // and the replica's generated tokens per second (its engine's rate over the last seconds,
    // sampled every 2 s).
    let metrics_url = format!("{base}/v1/deployments/chat/metrics?minutes=5");
    wait_until("the replica's load is sampled", Duration::from_secs(10), || async {
        let metrics: Value = maas_chaos_tests::admin_get_json(COOKIE, metrics_url.clone()).await;
        metrics["points"].as_array().is_some_and(|p| p.iter().any(|p| p["tokens_per_second"].as_f64() > Some(0.0)))
    })
    .await
    .unwrap();
    let metrics: Value = maas_chaos_tests::admin_get_json(COOKIE, metrics_url).await;
    let points = metrics["points"].as_array().unwrap();
    assert!((30..=32).contains(&points.len()), "ten-second buckets over five minutes: {metrics}");
    let sum = |field: &str| points.iter().map(|p| p[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("requests"), sum("errors")), (6, 0), "{metrics}");
    assert_eq!((sum("prompt_tokens"), sum("completion_tokens")), (prompt, completion), "{metrics}");
    assert!(points.iter().any(|p| p["latency_p99_ms"].as_u64().is_some()), "{metrics}");
    assert_eq!(metrics["nodes"].as_array().map(Vec::len), Some(1), "{metrics}");
    // The GPU chart: the replica holds its memory on the simulated GPU, which measures no
    // utilization.
    let deployment: Value = maas_chaos_tests::admin_get_json(COOKIE, format!("{base}/v1/deployments/chat")).await;
    let held = deployment["memory_per_gpu_mib"].as_f64().unwrap();
    assert!(held > 0.0, "{deployment}");
    assert!(points.iter().any(|p| p["gpu_memory_mib"].as_f64() == Some(held)), "{metrics}");
    assert!(points.iter().all(|p| p["gpu_utilization_percent"].is_null()), "{metrics}");
    assert_eq!(metrics["nodes_missing"], json!([]), "{metrics}");
    let (status, denied) = get_as(&node, &session, "/v1/deployments/chat/metrics?minutes=61").await;
    assert_eq!(status, 400, "{denied}");
}

async fn send_as(
    node: &MaasProcess,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", node.base_url)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Private deployments (TEN-1 for deployments): an enterprise user deploys a model of the
/// repository for herself; it answers her, and for everyone else it does not exist: not
/// listed, not callable (chat, embeddings, sessions), not readable, not changeable. A
/// plain user cannot deploy; no one but an administrator makes a public deployment or
/// deploys from the nodes' files, or changes the platform's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_deployment_answers_only_its_owner() {
    let (node, _dir) = serving_node().await;
    signed_up(&node, "root@example.com").await;
    let (erin, erin_id) = signed_up(&node, "erin@example.com").await;
    let (frank, _) = signed_up(&node, "frank@example.com").await;
    make_enterprise(&node, &erin_id).await;
    let post = reqwest::Method::POST;
    let private = json!({"name": "erin-chat", "model": "tiny", "gpus_per_replica": 0, "context_tokens": 256,
                         "concurrent_sequences": 2});

    // Who may deploy what.
    let (status, refused) = send_as(&node, &frank, post.clone(), "/v1/deployments", Some(private.clone())).await;
    assert_eq!(status, 403, "a plain user cannot deploy: {refused}");
    let mut public = private.clone();
    public["visibility"] = json!("public");
    let (status, refused) = send_as(&node, &erin, post.clone(), "/v1/deployments", Some(public)).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["param"], "visibility", "{refused}");
    let mut from_path = private.clone();
    from_path["model_path"] = json!("/etc");
    let (status, refused) = send_as(&node, &erin, post.clone(), "/v1/deployments", Some(from_path)).await;
    assert_eq!(status, 403, "{refused}");
    let (status, created) = send_as(&node, &erin, post.clone(), "/v1/deployments", Some(private.clone())).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["visibility"], "private");
    assert_eq!(created["owner_kind"], "user");
    assert_eq!(created["owner_id"], erin_id.as_str());
    let (status, taken) = send_as(&node, &frank, post.clone(), "/v1/deployments", Some(private.clone())).await;
    assert_eq!(status, 403, "{taken}");

    // It answers erin.
    wait_until("erin's deployment serves", Duration::from_secs(60), || async {
        let (_, models) = send_as(&node, &erin, reqwest::Method::GET, "/v1/models", None).await;
        models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "erin-chat"))
    })
    .await
    .unwrap();
    let question = json!({"model": "erin-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2});
    let (status, answer) = send_as(&node, &erin, post.clone(), "/v1/chat/completions", Some(question.clone())).await;
    assert_eq!(status, 200, "{answer}");

    // For frank it does not exist, and the platform's deployment is not his to change.
    let (_, models) = send_as(&node, &frank, reqwest::Method::GET, "/v1/models", None).await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["chat"], "{models}");
    let (_, listed) = send_as(&node, &frank, reqwest::Method::GET, "/v1/deployments", None).await;
    assert!(!listed.to_string().contains("erin-chat"), "{listed}");
    for (method, path, body) in [
        (post.clone(), "/v1/chat/completions", Some(question.clone())),
        (post.clone(), "/v1/completions", Some(json!({"model": "erin-chat", "prompt": "hi", "max_tokens": 1}))),
        (post.clone(), "/v1/embeddings", Some(json!({"model": "erin-chat", "input": "hi"}))),
        (post.clone(), "/v1/sessions", Some(json!({"model": "erin-chat"}))),
        (reqwest::Method::GET, "/v1/deployments/erin-chat", None),
        (reqwest::Method::GET, "/v1/deployments/erin-chat/metrics", None),
        (reqwest::Method::GET, "/v1/deployments/erin-chat/logs", None),
        (reqwest::Method::PATCH, "/v1/deployments/erin-chat", Some(json!({"replicas": 0}))),
        (reqwest::Method::PUT, "/v1/deployments/erin-chat", Some(private.clone())),
        (reqwest::Method::DELETE, "/v1/deployments/erin-chat", None),
    ] {
        let (status, answer) = send_as(&node, &frank, method.clone(), path, body).await;
        assert_eq!(status, 404, "{method} {path} as frank: {answer}");
        assert!(!answer.to_string().contains(&erin_id), "{answer}");
    }
    let (status, answer) =
        send_as(&node, &frank, reqwest::Method::PATCH, "/v1/deployments/chat", Some(json!({"replicas": 0}))).await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = send_as(&node, &erin, reqwest::Method::DELETE, "/v1/deployments/chat", None).await;
    assert_eq!(status, 403, "only an administrator changes a platform deployment: {answer}");

    // Erin manages hers; the administrator sees it with its owner.
    let (status, scaled) =
        send_as(&node, &erin, reqwest::Method::PATCH, "/v1/deployments/erin-chat", Some(json!({"replicas": 2}))).await;
    assert_eq!(status, 200, "{scaled}");
    assert_eq!(scaled["replicas_desired"], 2);
    let (_, listed) = send_as(&node, &erin, reqwest::Method::GET, "/v1/deployments", None).await;
    let names: Vec<&str> = listed["deployments"].as_array().unwrap().iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(names, ["chat", "erin-chat"], "{listed}");
    let all: Value =
        maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/deployments/erin-chat", node.base_url)).await;
    assert_eq!(all["owner_id"], erin_id.as_str(), "{all}");
    // Her deployment's log is hers to read: where its replica started and that it is ready.
    let (status, logs) = send_as(&node, &erin, reqwest::Method::GET, "/v1/deployments/erin-chat/logs", None).await;
    assert_eq!(status, 200, "{logs}");
    let told: Vec<&str> = logs["lines"].as_array().unwrap().iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(told.first().is_some_and(|l| l.starts_with("starting on node 1")), "{logs}");
    assert!(told.iter().any(|l| l.starts_with("ready in ")), "{logs}");
    let (status, refused) =
        send_as(&node, &erin, reqwest::Method::GET, "/v1/deployments/erin-chat/logs?limit=0", None).await;
    assert_eq!((status, refused["error"]["param"].as_str()), (400, Some("limit")), "{refused}");
    let (status, refused) =
        send_as(&node, &erin, reqwest::Method::GET, "/v1/deployments/erin-chat/logs?level=loud", None).await;
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(status == 400 && message.contains("unknown variant `loud`"), "the query's problem is named: {refused}");
    let (status, errors) =
        send_as(&node, &erin, reqwest::Method::GET, "/v1/deployments/erin-chat/logs?level=error", None).await;
    assert_eq!((status, errors["lines"].as_array().map(Vec::len)), (200, Some(0)), "{errors}");
    let (status, deleted) = send_as(&node, &erin, reqwest::Method::DELETE, "/v1/deployments/erin-chat", None).await;
    assert_eq!(status, 200, "{deleted}");
    gpu_memory_quota_holds(&node, &erin, &erin_id).await;
}

/// The `deployment_gpu_mib` quota: an owner's private deployments reserve at most that much
/// GPU memory in all, whether they are created, changed or scaled.
async fn gpu_memory_quota_holds(node: &MaasProcess, erin: &str, erin_id: &str) {
    let quota = maas_chaos_tests::admin_client(COOKIE)
        .put(format!("{}/v1/admin/quotas/user/{erin_id}", node.base_url))
        .json(&json!({"deployment_gpu_mib": 1500}))
        .send()
        .await
        .unwrap();
    assert_eq!(quota.status(), 200);
    let on_gpu = |name: &str, mib: u64| {
        json!({"name": name, "model": "tiny", "gpus_per_replica": 1, "memory_per_gpu_mib": mib, "context_tokens": 256,
               "concurrent_sequences": 2})
    };
    let post = reqwest::Method::POST;
    let (status, first) = send_as(node, erin, post.clone(), "/v1/deployments", Some(on_gpu("erin-a", 1000))).await;
    assert_eq!(status, 201, "{first}");
    let (status, refused) =
        send_as(node, erin, reqwest::Method::PATCH, "/v1/deployments/erin-a", Some(json!({"replicas": 2}))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("gpu_quota_exceeded")), "{refused}");
    let (status, refused) = send_as(node, erin, post.clone(), "/v1/deployments", Some(on_gpu("erin-b", 1000))).await;
    assert_eq!(status, 403, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("reserve 1000 MiB") && message.contains("the quota is 1500 MiB"), "{message}");
    let (status, changed) =
        send_as(node, erin, reqwest::Method::PUT, "/v1/deployments/erin-a", Some(on_gpu("erin-a", 2000))).await;
    assert_eq!(status, 403, "a change is held to it too: {changed}");
    let (status, fits) = send_as(node, erin, post.clone(), "/v1/deployments", Some(on_gpu("erin-b", 500))).await;
    assert_eq!(status, 201, "what fits passes: {fits}");
    // A platform administrator is not held to a tenant's quota.
    let scaled = maas_chaos_tests::admin_client(COOKIE)
        .patch(format!("{}/v1/deployments/erin-a", node.base_url))
        .json(&json!({"replicas": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(scaled.status(), 200);
}

/// Makes a signed-up user an enterprise account (one that may deploy privately).
async fn make_enterprise(node: &MaasProcess, user_id: &str) {
    let promoted = maas_chaos_tests::admin_client(COOKIE)
        .patch(format!("{}/v1/admin/users/{user_id}", node.base_url))
        .json(&json!({"role": "enterprise"}))
        .send()
        .await
        .unwrap();
    assert_eq!(promoted.status(), 200);
}

/// The repository's versions as `owner_kind:name:version:architecture`.
fn repository(list: &Value) -> Vec<String> {
    list["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("{}:{}:{}:{}", v["owner_kind"], v["name"], v["version"], v["architecture"]).replace('"', ""))
        .collect()
}

/// Issue 6: models owned by a tenant. An enterprise user uploads a model into their own part
/// of the repository, under a name the platform uses too; it is theirs alone: another
/// tenant neither lists nor deploys it (their `tiny` is the platform's), a plain user cannot
/// add one; its owner deploys it (privately) and chats with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_imports_a_model_of_its_own_and_deploys_it() {
    let (node, dir) = serving_node().await;
    signed_up(&node, "root@example.com").await;
    let (erin, erin_id) = signed_up(&node, "erin@example.com").await;
    let (frank, frank_id) = signed_up(&node, "frank@example.com").await;
    make_enterprise(&node, &erin_id).await;
    let post = reqwest::Method::POST;

    // A plain user cannot upload; erin (enterprise) uploads a tiny Qwen2's files.
    let (status, refused) = send_as(&node, &frank, post.clone(), "/v1/blobs", None).await;
    assert_eq!(status, 403, "{refused}");
    let model = dir.path().join("erins-qwen");
    tiny_model("qwen2", &model);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let response = reqwest::Client::new()
            .post(format!("{}/v1/blobs", node.base_url))
            .bearer_auth(&erin)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let blob: Value = response.json().await.unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        files.push(json!({"path": name, "sha256": blob["sha256"], "size_bytes": bytes.len()}));
    }
    let register = json!({"name": "tiny", "files": files});
    let (status, refused) = send_as(&node, &frank, post.clone(), "/v1/registry/models", Some(register.clone())).await;
    assert_eq!(status, 403, "{refused}");
    let (status, record) = send_as(&node, &erin, post.clone(), "/v1/registry/models", Some(register)).await;
    assert_eq!(status, 201, "{record}");
    assert_eq!((record["owner_kind"].as_str(), record["owner_id"].as_str()), (Some("user"), Some(erin_id.as_str())));

    // Who sees it: erin and the administrators; not frank.
    let (_, listed) = send_as(&node, &erin, reqwest::Method::GET, "/v1/registry/models", None).await;
    assert_eq!(repository(&listed), ["platform:tiny:v1:LlamaForCausalLM", "user:tiny:v1:Qwen2ForCausalLM"]);
    let (_, listed) = send_as(&node, &frank, reqwest::Method::GET, "/v1/registry/models", None).await;
    assert_eq!(repository(&listed), ["platform:tiny:v1:LlamaForCausalLM"]);
    assert!(!listed.to_string().contains(&erin_id), "{listed}");
    let all: Value = maas_chaos_tests::admin_get_json(COOKIE, format!("{}/v1/registry/models", node.base_url)).await;
    assert_eq!(repository(&all).len(), 2, "{all}");

    // The CLI imports for her too, with a key of hers that has the admin scope.
    let (status, key) =
        send_as(&node, &erin, post.clone(), "/v1/keys", Some(json!({"name": "cli", "scopes": ["admin"]}))).await;
    assert_eq!(status, 201, "{key}");
    let imported = Command::new(maas_chaos_tests::maas_binary())
        .args(["model", "import"])
        .arg(&model)
        .args(["--name", "erins-cli", "--quiet", "--server", &node.base_url])
        .env("MAAS_API_KEY", key["key"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
    let (_, listed) = send_as(&node, &erin, reqwest::Method::GET, "/v1/registry/models", None).await;
    assert!(repository(&listed).contains(&"user:erins-cli:v1:Qwen2ForCausalLM".to_owned()), "{listed}");

    // Deployed by its owner, `tiny` is hers; deployed by another tenant, the platform's.
    make_enterprise(&node, &frank_id).await;
    let deploy = |name: &str| json!({"name": name, "model": "tiny", "gpus_per_replica": 0, "context_tokens": 256, "concurrent_sequences": 2});
    let (status, erins) = send_as(&node, &erin, post.clone(), "/v1/deployments", Some(deploy("erin-qwen"))).await;
    assert_eq!((status, erins["model_owner"].as_str()), (201, Some("own")), "{erins}");
    let (status, franks) = send_as(&node, &frank, post.clone(), "/v1/deployments", Some(deploy("frank-tiny"))).await;
    assert_eq!((status, franks["model_owner"].as_str()), (201, Some("platform")), "{franks}");
    for (token, deployment) in [(&erin, "erin-qwen"), (&frank, "frank-tiny")] {
        wait_until("the deployment serves", Duration::from_secs(60), || async {
            let (_, models) = send_as(&node, token, reqwest::Method::GET, "/v1/models", None).await;
            models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == deployment))
        })
        .await
        .unwrap();
    }
    let question = json!({"model": "erin-qwen", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2});
    let (status, answer) = send_as(&node, &erin, post.clone(), "/v1/chat/completions", Some(question)).await;
    assert_eq!(status, 200, "{answer}");
    // The replicas' logs say which model each loaded.
    let (_, logs) = send_as(&node, &erin, reqwest::Method::GET, "/v1/deployments/erin-qwen/logs", None).await;
    assert!(logs.to_string().contains("Qwen2ForCausalLM"), "{logs}");
    let (_, logs) = send_as(&node, &frank, reqwest::Method::GET, "/v1/deployments/frank-tiny/logs", None).await;
    assert!(logs.to_string().contains("LlamaForCausalLM"), "{logs}");
}
