//! Knowledge bases on a real `maas` process: documents uploaded through the API are
//! parsed, chunked with the embedding model's tokenizer, embedded on a deployed
//! all-MiniLM-L6-v2 (the real model, from `MAAS_TEST_MINILM_DIR`, which `scripts/test`
//! sets) and indexed; retrieval finds them by vector, BM25 and hybrid search with their
//! sources; a re-upload retires the old version; deletion removes a document; bad files
//! are refused or fail with their reason. **ING-1**: a node killed with SIGKILL in the
//! middle of embedding a document resumes after a restart, and the document ends with
//! every chunk indexed exactly once.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use maas_chaos_tests::{MaasProcess, one_gpu_node_config, run_cli, tiny_model, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const COOKIE: &str = "knowledge-test-cookie";

fn cli(node: &MaasProcess, args: &[&str]) {
    run_cli(&node.base_url, COOKIE, args);
}

async fn get(node: &MaasProcess, path: &str) -> (u16, Value) {
    let response = maas_chaos_tests::admin_get(COOKIE, format!("{}{path}", node.base_url)).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn send(node: &MaasProcess, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
    let response = maas_chaos_tests::admin_client(COOKIE)
        .request(method, format!("{}{path}", node.base_url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Uploads `bytes` as `filename` into knowledge base `kb` with extra form fields.
async fn upload(node: &MaasProcess, kb: &str, filename: &str, bytes: &[u8], fields: &[(&str, &str)]) -> (u16, Value) {
    let url = format!("{}/v1/knowledge_bases/{kb}/documents", node.base_url);
    let response =
        maas_chaos_tests::post_multipart(COOKIE, &url, fields, (filename, "application/octet-stream", bytes)).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until document `id` of `kb` reaches a final state; returns it.
async fn settled(node: &MaasProcess, kb: &str, id: &str) -> Value {
    let path = format!("/v1/knowledge_bases/{kb}/documents/{id}");
    wait_until("the document settles", Duration::from_secs(120), || async {
        let (_, document) = get(node, &path).await;
        matches!(document["state"].as_str(), Some("indexed" | "failed"))
    })
    .await
    .unwrap();
    get(node, &path).await.1
}

async fn deploy_embedder(node: &MaasProcess, dir: &Path, name: &str) {
    // `minilm` is the real model (retrieval quality is asserted on it); anything else a
    // tiny random BERT (only counts are asserted).
    let model = if name == "minilm" {
        std::path::PathBuf::from(
            std::env::var_os("MAAS_TEST_MINILM_DIR")
                .expect("MAAS_TEST_MINILM_DIR must point at all-MiniLM-L6-v2 (scripts/test sets it)"),
        )
    } else {
        let out = dir.join("bert");
        tiny_model("bert", &out);
        out
    };
    cli(node, &["model", "import", model.to_str().unwrap(), "--name", name, "--quiet"]);
    cli(node, &["deploy", name, "--name", name, "--gpus", "0", "--cpu-fallback"]);
    wait_until("the embedding model serves", Duration::from_secs(120), || async {
        let (_, models) = get(node, "/v1/models").await;
        models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == name))
    })
    .await
    .unwrap();
}

const HANDBOOK: &str = "# The Lighthouse Keeper's Handbook

## Lamps and lenses

The lamp burns paraffin vapour under a mantle. A Fresnel lens of glass prisms bends the light \
into a narrow beam that sailors can see twenty nautical miles away. Polish the brass and clean \
the prisms with spirit every morning, before the sun warms the lantern room.

## Weather watch

Barometer readings are written in the log every three hours. A falling barometer and a \
backing wind mean a gale is coming: raise the storm cone on the mast and telegraph the \
harbour master.

## Fog signals

When fog hides the light, the diaphone horn sounds two blasts every sixty seconds. The \
compressor engine must be started twenty minutes before the horn is needed.
";

const GARDEN: &str = "Growing tomatoes in a small garden.

Sow the seeds indoors six weeks before the last frost, then plant the seedlings out in full \
sun. Water the roots deeply twice a week and pinch out the side shoots so the plant puts \
its strength into the fruit. Pick the tomatoes when they are red and firm.
";

const TEA: &str = "# 茶的历史

中国是茶的故乡。相传神农氏尝百草，发现了茶叶可以解毒。唐代陆羽写了《茶经》，系统地总结了种茶、制茶和饮茶的方法。

## 绿茶

龙井茶产于杭州西湖一带，是著名的绿茶。绿茶不经过发酵，保留了茶叶的天然物质。
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_ingested_retrieved_versioned_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.toml"), one_gpu_node_config(COOKIE, "")).unwrap();
    let node = MaasProcess::start_in(dir.path()).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    deploy_embedder(&node, dir.path(), "minilm").await;

    let kb_id = create_knowledge_base(&node).await;
    let documents = upload_documents(&node, &kb_id).await;
    retrieval_finds_sources(&node, &kb_id, &documents).await;
    the_graph_relates_entities(&node, &kb_id).await;
    a_new_version_retires_the_old(&node, &kb_id, &documents).await;
    chat_cites_its_sources(&node, dir.path(), &kb_id).await;
    the_graph_asks_its_extraction_model(&node, &kb_id).await;
    platform_work_is_metered(&node).await;
    deletion_removes_documents_and_indexes(&node, &kb_id, &documents).await;
}

/// The documents the story uploads: the handbook, the garden notes and the knots page.
struct Uploaded {
    handbook: Value,
    garden: Value,
    knots: Value,
}

async fn create_knowledge_base(node: &MaasProcess) -> String {
    // Bad requests change nothing.
    for (body, mention) in [
        (json!({"name": "kb", "embedding_model": "minilm", "colour": "red"}), "colour"),
        (json!({"name": "kb"}), "embedding_model"),
        (json!({"name": "kb", "embedding_model": "minilm", "vector_backend": "milvus"}), "milvus"),
        (json!({"name": "kb", "embedding_model": "minilm", "vector_backend": "faiss"}), "vector_backend"),
        (json!({"name": "kb", "embedding_model": "minilm", "chunking": {"max_tokens": 4}}), "max_tokens"),
        (json!({"name": "", "embedding_model": "minilm"}), "name"),
    ] {
        let (status, answer) = send(node, reqwest::Method::POST, "/v1/knowledge_bases", &body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(answer.to_string().contains(mention), "{answer} should mention {mention}");
    }
    let (status, kb) = send(
        node,
        reqwest::Method::POST,
        "/v1/knowledge_bases",
        &json!({"name": "handbooks", "description": "how-tos", "embedding_model": "minilm"}),
    )
    .await;
    assert_eq!(status, 200, "{kb}");
    let kb_id = kb["id"].as_str().unwrap().to_owned();
    let (status, _) = send(
        node,
        reqwest::Method::POST,
        "/v1/knowledge_bases",
        &json!({"name": "handbooks", "embedding_model": "minilm"}),
    )
    .await;
    assert_eq!(status, 409, "names are unique per owner");
    // A new knowledge base's shards (2 by default) are placed on the node, opened and
    // serving, empty.
    wait_until("the shards serve", Duration::from_secs(20), || async {
        let (_, read) = get(node, &format!("/v1/knowledge_bases/{kb_id}")).await;
        read["stats"]["shards"].as_array().is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["state"] == "serving"))
    })
    .await
    .unwrap();
    let (status, read) = get(node, &format!("/v1/knowledge_bases/{kb_id}")).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["stats"]["fulltext_entries"], 0, "{read}");
    assert_eq!(read["stats"]["shards"][0]["id"], format!("{kb_id}.0"), "{read}");
    let (status, found) = send(
        node,
        reqwest::Method::POST,
        &format!("/v1/knowledge_bases/{kb_id}/retrieve"),
        &json!({"query": "anything", "mode": "fulltext"}),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["data"], json!([]), "{found}");
    assert!(node.data_dir.join("knowledge/shards").join(format!("{kb_id}.1")).join("fulltext").is_dir());

    kb_id
}

async fn upload_documents(node: &MaasProcess, kb_id: &str) -> Uploaded {
    // Upload: Markdown with tags, plain text, Chinese Markdown, HTML.
    let (status, handbook) =
        upload(node, kb_id, "lighthouse.md", HANDBOOK.as_bytes(), &[("tags", "sea,manual"), ("category", "work")])
            .await;
    assert_eq!(status, 200, "{handbook}");
    assert_eq!(handbook["version"], 1);
    assert_eq!(handbook["kind"], "markdown");
    assert_eq!(handbook["tags"], json!(["manual", "sea"]));
    let (status, garden) = upload(node, kb_id, "garden.txt", GARDEN.as_bytes(), &[("tags", "[\"home\"]")]).await;
    assert_eq!(status, 200, "{garden}");
    let (status, tea) = upload(node, kb_id, "tea.md", TEA.as_bytes(), &[]).await;
    assert_eq!(status, 200, "{tea}");
    let html = b"<html><head><title>Knots</title></head><body><h1>Knots</h1><p>A bowline makes a fixed loop at the end of a rope.</p><script>var x;</script></body></html>";
    let (status, knots) = upload(node, kb_id, "knots.html", html, &[]).await;
    assert_eq!(status, 200, "{knots}");
    let people = "# Engines\n\nAda Lovelace worked with Charles Babbage in London on the Analytical Engine. \
                  Charles Babbage had designed the Difference Engine before it.\n";
    let (status, engines) = upload(node, kb_id, "engines.md", people.as_bytes(), &[]).await;
    assert_eq!(status, 200, "{engines}");

    // Refused at upload: unknown format, empty file, unknown field, another knowledge base.
    let (status, answer) = upload(node, kb_id, "tool.exe", b"MZ\x90\x00\x03\x00\x00\x00\x04\x00binary", &[]).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = upload(node, kb_id, "empty.txt", b"", &[]).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = upload(node, kb_id, "a.txt", b"text", &[("colour", "red")]).await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = upload(node, "kb-nope", "a.txt", b"text", &[]).await;
    assert_eq!(status, 404);
    // A corrupt PDF is accepted and fails with its reason.
    let (status, broken) = upload(node, kb_id, "broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog", &[]).await;
    assert_eq!(status, 200, "{broken}");

    for document in [&handbook, &garden, &tea, &knots, &engines] {
        let done = settled(node, kb_id, document["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "indexed", "{done}");
        assert!(done["chunks_total"].as_i64().unwrap() >= 1, "{done}");
        assert_eq!(done["chunks_embedded"], done["chunks_total"], "{done}");
        assert_eq!(done["progress"], 1.0);
    }
    let failed = settled(node, kb_id, broken["id"].as_str().unwrap()).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("PDF") || e.contains("pdf")), "{failed}");

    Uploaded { handbook, garden, knots }
}

async fn retrieval_finds_sources(node: &MaasProcess, kb_id: &str, documents: &Uploaded) {
    let (handbook, knots) = (&documents.handbook, &documents.knots);
    // The retrieval test: every mode finds the fog section for a fog question, with its source.
    let retrieve = format!("/v1/knowledge_bases/{kb_id}/retrieve");
    for mode in ["vector", "fulltext", "hybrid"] {
        let (status, found) = send(
            node,
            reqwest::Method::POST,
            &retrieve,
            &json!({"query": "what sound does the fog horn make", "mode": mode, "top_k": 3}),
        )
        .await;
        assert_eq!(status, 200, "{found}");
        let top = &found["data"][0];
        assert_eq!(top["filename"], "lighthouse.md", "{mode}: {found}");
        assert_eq!(top["heading_path"].as_array().unwrap().last().unwrap(), "Fog signals", "{mode}: {found}");
        assert!(top["text"].as_str().unwrap().contains("diaphone"), "{found}");
        assert_eq!(top["rank"], 1);
        assert_eq!(top["version"], 1);
        assert_eq!(top["page_start"], 1);
        assert!(top["parent_text"].as_str().is_some_and(|p| p.contains("diaphone")), "{found}");
        assert!(top["chunk_id"].is_string());
    }
    // Vector search understands paraphrase: no word of the question is in the answer.
    let (_, found) = send(
        node,
        reqwest::Method::POST,
        &retrieve,
        &json!({"query": "cultivating vegetables", "mode": "vector", "top_k": 1}),
    )
    .await;
    assert_eq!(found["data"][0]["filename"], "garden.txt", "{found}");
    assert!(found["data"][0]["vector_score"].as_f64().unwrap() > 0.1, "{found}");
    // BM25 segments Chinese; hybrid keeps the full-text ranking for a Chinese query.
    for mode in ["fulltext", "hybrid"] {
        let (_, found) =
            send(node, reqwest::Method::POST, &retrieve, &json!({"query": "龙井茶产于哪里", "mode": mode})).await;
        assert_eq!(found["data"][0]["filename"], "tea.md", "{mode}: {found}");
        assert!(found["data"][0]["text"].as_str().unwrap().contains("龙井"), "{found}");
    }
    // Filters: by tag, by document.
    let (_, found) =
        send(node, reqwest::Method::POST, &retrieve, &json!({"query": "fog horn", "tags": ["home"], "top_k": 5})).await;
    assert!(found["data"].as_array().unwrap().iter().all(|hit| hit["filename"] == "garden.txt"), "{found}");
    let (_, found) = send(
        node,
        reqwest::Method::POST,
        &retrieve,
        &json!({"query": "fog horn", "document_ids": [knots["id"]], "top_k": 5}),
    )
    .await;
    assert!(found["data"].as_array().unwrap().iter().all(|hit| hit["filename"] == "knots.html"), "{found}");
    // Bad retrievals.
    for body in [json!({"query": ""}), json!({"query": "x", "top_k": 0}), json!({"query": "x", "mode": "magic"})] {
        let (status, answer) = send(node, reqwest::Method::POST, &retrieve, &body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
    }

    // The chunk viewer and the statistics agree with the documents.
    let (status, chunks) =
        get(node, &format!("/v1/knowledge_bases/{kb_id}/documents/{}/chunks", handbook["id"].as_str().unwrap())).await;
    assert_eq!(status, 200, "{chunks}");
    let listed = chunks["data"].as_array().unwrap();
    assert_eq!(Some(listed.len() as u64), chunks["total"].as_u64());
    assert!(listed.iter().enumerate().all(|(i, c)| c["ordinal"] == i && c["embedded"] == true), "{chunks}");
    // The parents, a page of one at a time: `total` counts the level asked for.
    let (status, parents) = get(
        node,
        &format!(
            "/v1/knowledge_bases/{kb_id}/documents/{}/chunks?level=parent&limit=1",
            handbook["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(status, 200, "{parents}");
    assert_eq!(parents["data"].as_array().map(Vec::len), Some(1), "{parents}");
    assert_eq!(parents["data"][0]["level"], "parent", "{parents}");
    let total = parents["total"].as_u64().unwrap();
    assert!(total >= 1 && total <= listed.len() as u64, "parents {total}, children {}", listed.len());
    let (status, summary) = get(node, &format!("/v1/knowledge_bases/{kb_id}")).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["stats"]["documents_by_state"], json!({"indexed": 5, "failed": 1}), "{summary}");
    assert_eq!(summary["stats"]["vectors"], summary["stats"]["chunks"], "{summary}");
    assert_eq!(summary["stats"]["fulltext_entries"], summary["stats"]["chunks"], "{summary}");
}

async fn the_graph_relates_entities(node: &MaasProcess, kb_id: &str) {
    let retrieve = format!("/v1/knowledge_bases/{kb_id}/retrieve");
    // The knowledge graph: entities and the relations one sentence makes between them.
    let (status, graph) = get(node, &format!("/v1/knowledge_bases/{kb_id}/graph?q=babbage")).await;
    assert_eq!(status, 200, "{graph}");
    assert_eq!(graph["entities"][0]["key"], "charles babbage", "{graph}");
    assert_eq!(graph["entities"][0]["mentions"], 1, "{graph}");
    let (status, babbage) = get(node, &format!("/v1/knowledge_bases/{kb_id}/graph?entity=Charles%20Babbage")).await;
    assert_eq!(status, 200, "{babbage}");
    let related: Vec<String> = babbage["relations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            if r["source"] == "charles babbage" {
                r["target"].as_str().unwrap().to_owned()
            } else {
                r["source"].as_str().unwrap().to_owned()
            }
        })
        .collect();
    for name in ["ada lovelace", "london", "analytical engine", "difference engine"] {
        assert!(related.iter().any(|r| r == name), "{name} in {babbage}");
    }
    assert!(babbage["chunks"][0]["text"].as_str().unwrap().contains("Lovelace"), "{babbage}");
    assert_eq!(get(node, &format!("/v1/knowledge_bases/{kb_id}/graph?entity=nobody")).await.0, 404);
    // Graph-widened retrieval: the entity's chunk joins the ranking even without shared words.
    let (_, found) = send(
        node,
        reqwest::Method::POST,
        &retrieve,
        &json!({"query": "Difference Engine", "mode": "vector", "graph": true, "top_k": 10}),
    )
    .await;
    assert!(found["data"].as_array().unwrap().iter().any(|h| h["filename"] == "engines.md"), "{found}");
}

async fn a_new_version_retires_the_old(node: &MaasProcess, kb_id: &str, documents: &Uploaded) {
    let retrieve = format!("/v1/knowledge_bases/{kb_id}/retrieve");
    let handbook = &documents.handbook;
    // A new version of the handbook: once indexed, the old one retires and leaves retrieval.
    let revised = HANDBOOK.replace("two blasts every sixty seconds", "three blasts every ninety seconds");
    let (status, second) = upload(node, kb_id, "lighthouse.md", revised.as_bytes(), &[]).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["version"], 2);
    assert_eq!(settled(node, kb_id, second["id"].as_str().unwrap()).await["state"], "indexed");
    let (_, first) =
        get(node, &format!("/v1/knowledge_bases/{kb_id}/documents/{}", handbook["id"].as_str().unwrap())).await;
    assert_eq!(first["state"], "retired", "{first}");
    let (_, found) =
        send(node, reqwest::Method::POST, &retrieve, &json!({"query": "fog horn blasts", "top_k": 10})).await;
    let hits = found["data"].as_array().unwrap();
    assert!(hits.iter().filter(|h| h["filename"] == "lighthouse.md").all(|h| h["version"] == 2), "{found}");
    assert!(hits.iter().any(|h| h["text"].as_str().unwrap().contains("three blasts")), "{found}");
    let (_, summary) = get(node, &format!("/v1/knowledge_bases/{kb_id}")).await;
    assert_eq!(
        summary["stats"]["vectors"], summary["stats"]["chunks"],
        "the retired version's vectors went: {summary}"
    );
}

/// With `graph.extraction_model` set, ingestion asks that chat model for each chunk's
/// graph; the tiny random model answers noise, so every chunk falls back to the
/// deterministic extractor, and the graph is still there.
async fn the_graph_asks_its_extraction_model(node: &MaasProcess, kb_id: &str) {
    let path = format!("/v1/knowledge_bases/{kb_id}");
    let (status, refused) =
        send(node, reqwest::Method::PATCH, &path, &json!({"graph": {"extraction_model": "chat", "depth": 2}})).await;
    assert_eq!(status, 400, "{refused}");
    assert!(refused.to_string().contains("depth"), "{refused}");
    let (status, updated) =
        send(node, reqwest::Method::PATCH, &path, &json!({"graph": {"extraction_model": "chat"}})).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["settings"]["graph"]["extraction_model"], "chat", "{updated}");
    assert!(updated["settings"]["chunking"].is_object(), "other settings are kept: {updated}");
    let _ = node.stderr_so_far();
    let text = "Ada Lovelace wrote the first program for the Analytical Engine in London.";
    let (status, document) = upload(node, kb_id, "ada.txt", text.as_bytes(), &[]).await;
    assert_eq!(status, 200, "{document}");
    let done = settled(node, kb_id, document["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "indexed", "{done}");
    let log = node.stderr_so_far().join("\n");
    assert!(log.contains("graph extraction model asked") && log.contains("asked=1"), "{log}");
    let (status, ada) = get(node, &format!("{path}/graph?entity=Ada%20Lovelace")).await;
    assert_eq!(status, 200, "{ada}");
}

/// The model work done for the knowledge base (its documents' and questions' embeddings;
/// the chat model's condensing and graph extraction) is the owner's usage: no request of
/// this story called `/v1/embeddings`, yet the embedding model's tokens are there.
async fn platform_work_is_metered(node: &MaasProcess) {
    let sums = |usage: &Value, model: &str| {
        usage["by_model"].as_array().and_then(|rows| rows.iter().find(|row| row["model"] == model)).cloned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let usage = loop {
        let (_, usage) = get(node, "/v1/usage").await;
        let embedded = sums(&usage, "minilm").is_some_and(|row| {
            row["requests"].as_i64().unwrap_or(0) > 5 && row["prompt_tokens"].as_i64().unwrap_or(0) > 100
        });
        if embedded || std::time::Instant::now() > deadline {
            break usage;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let embedding = sums(&usage, "minilm");
    assert!(
        embedding.as_ref().is_some_and(|row| row["requests"].as_i64().unwrap_or(0) > 5),
        "the embedding model's usage (documents and questions embedded): {usage}"
    );
    let chat = sums(&usage, "chat").expect("the chat model's usage");
    assert!(chat["completion_tokens"].as_i64().unwrap() > 0, "{chat}");
}

async fn chat_cites_its_sources(node: &MaasProcess, dir: &Path, kb_id: &str) {
    // RAG: a chat completion that names the knowledge base answers with citations (the
    // tiny chat model's words are noise; the sources are real), whole and streamed.
    let model = dir.join("tiny");
    tiny_model("llama", &model);
    cli(node, &["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet"]);
    cli(node, &["deploy", "tiny", "--name", "chat", "--context", "512", "--sequences", "2"]);
    wait_until("the chat model serves", Duration::from_secs(120), || async {
        let (_, models) = get(node, "/v1/models").await;
        models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "chat"))
    })
    .await
    .unwrap();
    let question = "How often does the fog horn sound?";
    let rag = json!({"model": "chat", "messages": [{"role": "user", "content": question}], "max_tokens": 8,
                     "knowledge_base_ids": [kb_id], "retrieval": {"top_k": 1}});
    let (status, answer) = send(node, reqwest::Method::POST, "/v1/chat/completions", &rag).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["retrieval_query"], question);
    let citation = &answer["citations"][0];
    assert_eq!(citation["index"], 1, "{answer}");
    assert_eq!(citation["filename"], "lighthouse.md", "{answer}");
    assert_eq!(citation["version"], 2);
    assert_eq!(citation["knowledge_base_id"], kb_id);
    assert!(citation["text"].as_str().unwrap().contains("ninety seconds"), "{answer}");
    assert!(citation["chunk_id"].is_string() && citation["score"].is_number() && citation["page_start"] == 1);
    let mut streamed = rag.clone();
    streamed["stream"] = json!(true);
    let response = maas_chaos_tests::admin_client(COOKIE)
        .post(format!("{}/v1/chat/completions", node.base_url))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let events: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).filter(|l| !l.is_empty()).collect();
    let first: Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(first["citations"][0]["filename"], "lighthouse.md", "the first event carries the sources: {first}");
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    rag_fits_its_sources_into_the_context(node, kb_id, question).await;
    // A follow-up question is condensed with the conversation before retrieval.
    let follow_up = json!({"model": "chat", "max_tokens": 8, "retrieval": {"top_k": 2, "mode": "fulltext"}, "messages": [
        {"role": "user", "content": "Tell me about the lighthouse lamp."},
        {"role": "assistant", "content": "It burns paraffin vapour."},
        {"role": "user", "content": "And the fog horn?"}]});
    let (status, answer) =
        send(node, reqwest::Method::POST, &format!("/v1/knowledge_bases/{kb_id}/chat"), &follow_up).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["retrieval_query"].as_str().is_some_and(|q| !q.is_empty()), "{answer}");
    assert!(answer["citations"].is_array(), "{answer}");
    // Refusals: another tenant's or an unknown knowledge base, no question last, completions.
    let mut unknown = rag.clone();
    unknown["knowledge_base_ids"] = json!(["kb-unknown"]);
    let (status, answer) = send(node, reqwest::Method::POST, "/v1/chat/completions", &unknown).await;
    assert_eq!(status, 404, "{answer}");
    let mut assistant_last = rag.clone();
    assistant_last["messages"] = json!([{"role": "assistant", "content": "hi"}]);
    let (status, answer) = send(node, reqwest::Method::POST, "/v1/chat/completions", &assistant_last).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = send(
        node,
        reqwest::Method::POST,
        "/v1/completions",
        &json!({"model": "chat", "prompt": "x", "knowledge_base_ids": [kb_id]}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
}

/// More sources than the tiny model's 512-token context holds: the best ones go in (the
/// last of them cut), the rest are counted as omitted, and the prompt leaves room for the
/// answer; a question with no room for any source is refused with a reason.
async fn rag_fits_its_sources_into_the_context(node: &MaasProcess, kb_id: &str, question: &str) {
    let (_, retrieved) = send(
        node,
        reqwest::Method::POST,
        &format!("/v1/knowledge_bases/{kb_id}/retrieve"),
        &json!({"query": question, "top_k": 8}),
    )
    .await;
    let retrieved = retrieved["data"].as_array().unwrap().len();
    assert!(retrieved >= 3, "{retrieved}");
    let many = json!({"model": "chat", "messages": [{"role": "user", "content": question}], "max_tokens": 8,
                      "knowledge_base_ids": [kb_id], "retrieval": {"top_k": 8}});
    let (status, answer) = send(node, reqwest::Method::POST, "/v1/chat/completions", &many).await;
    assert_eq!(status, 200, "{answer}");
    let cited = answer["citations"].as_array().unwrap().len();
    let omitted = answer["sources_omitted"].as_u64().unwrap();
    assert!(cited >= 1 && omitted >= 1, "{answer}");
    assert_eq!(cited + usize::try_from(omitted).unwrap(), retrieved, "{answer}");
    assert_eq!(answer["citations"][0]["filename"], "lighthouse.md", "the best source stays: {answer}");
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() < 512 - 8, "{answer}");
    let mut long = many.clone();
    long["messages"][0]["content"] = json!("the a is of ".repeat(150));
    let (status, answer) = send(node, reqwest::Method::POST, "/v1/chat/completions", &long).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "context_length_exceeded", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("max_tokens"), "{answer}");
}

async fn deletion_removes_documents_and_indexes(node: &MaasProcess, kb_id: &str, documents: &Uploaded) {
    let retrieve = format!("/v1/knowledge_bases/{kb_id}/retrieve");
    let garden = &documents.garden;
    // Deleting a document takes it out of retrieval, then out of the list.
    let garden_path = format!("/v1/knowledge_bases/{kb_id}/documents/{}", garden["id"].as_str().unwrap());
    let (status, deleting) = send(node, reqwest::Method::DELETE, &garden_path, &Value::Null).await;
    assert_eq!(status, 200, "{deleting}");
    wait_until("the document is gone", Duration::from_secs(30), || async { get(node, &garden_path).await.0 == 404 })
        .await
        .unwrap();
    let (_, found) =
        send(node, reqwest::Method::POST, &retrieve, &json!({"query": "tomatoes", "mode": "fulltext"})).await;
    assert!(found["data"].as_array().unwrap().iter().all(|hit| hit["filename"] != "garden.txt"), "{found}");

    // Deleting the knowledge base removes it and its indexes.
    let (status, _) = send(node, reqwest::Method::DELETE, &format!("/v1/knowledge_bases/{kb_id}"), &Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(get(node, &format!("/v1/knowledge_bases/{kb_id}")).await.0, 404);
    let shards = node.data_dir.join("knowledge/shards");
    wait_until("the shards' files are removed", Duration::from_secs(20), || async {
        !shards.join(format!("{kb_id}.0")).exists() && !shards.join(format!("{kb_id}.1")).exists()
    })
    .await
    .unwrap();
}

/// A node that embeds two chunks at a time (so a test can act between batches), with
/// more `[knowledge]` settings, and the `bert` embedder deployed.
async fn start_small_batch_node(dir: &Path, knowledge: &str) -> MaasProcess {
    let config = format!("{}\n[knowledge]\nembed_batch = 2\n{knowledge}", one_gpu_node_config(COOKIE, ""));
    std::fs::write(dir.join("cluster.toml"), config).unwrap();
    let node = MaasProcess::start_in(dir).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    deploy_embedder(&node, dir, "bert").await;
    node
}

/// A knowledge base `name` of small chunks with one uploaded document of `paragraphs`
/// paragraphs: (its id, the document, the document's path).
async fn long_document(node: &MaasProcess, name: &str, paragraphs: usize) -> (String, Value, String) {
    let (status, kb) = send(
        node,
        reqwest::Method::POST,
        "/v1/knowledge_bases",
        &json!({"name": name, "embedding_model": "bert", "chunking": {"max_tokens": 32, "overlap_tokens": 4, "parent_max_tokens": 128}}),
    )
    .await;
    assert_eq!(status, 200, "{kb}");
    let kb_id = kb["id"].as_str().unwrap().to_owned();
    let text = (0..paragraphs).fold(String::new(), |mut text, i| {
        let _ = write!(text, "Paragraph {i} tells of harbour number {i} and the ships that anchor there at dawn.\n\n");
        text
    });
    let (status, document) = upload(node, &kb_id, "harbours.txt", text.as_bytes(), &[]).await;
    assert_eq!(status, 200, "{document}");
    let path = format!("/v1/knowledge_bases/{kb_id}/documents/{}", document["id"].as_str().unwrap());
    (kb_id, document, path)
}

/// A document deleted while it is being embedded leaves nothing behind: its batches in
/// flight are dropped from the indexes too, whichever side finishes last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_deleted_while_it_is_embedded_leaves_nothing_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_small_batch_node(dir.path(), "").await;
    let (kb_id, _, path) = long_document(&node, "gone", 300).await;
    wait_until("embedding is under way", Duration::from_secs(120), || async {
        let (_, now) = get(&node, &path).await;
        assert_ne!(now["state"], "indexed", "the document finished before it could be deleted: {now}");
        now["chunks_embedded"].as_i64().unwrap_or(0) >= 20
    })
    .await
    .unwrap();

    let (status, deleting) = send(&node, reqwest::Method::DELETE, &path, &Value::Null).await;
    assert_eq!(status, 200, "{deleting}");
    wait_until("the document is gone", Duration::from_secs(30), || async { get(&node, &path).await.0 == 404 })
        .await
        .unwrap();
    let summary_path = format!("/v1/knowledge_bases/{kb_id}");
    wait_until("the indexes are empty", Duration::from_secs(30), || async {
        let (_, summary) = get(&node, &summary_path).await;
        summary["stats"]["vectors"] == 0 && summary["stats"]["fulltext_entries"] == 0
    })
    .await
    .unwrap();
    // And they stay empty: no batch in flight lands after the deletion.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, summary) = get(&node, &summary_path).await;
    assert_eq!(
        (&summary["stats"]["vectors"], &summary["stats"]["fulltext_entries"]),
        (&json!(0), &json!(0)),
        "{summary}"
    );
    assert_eq!(summary["stats"]["chunks"], 0, "{summary}");
}

/// ING-1: a node killed with SIGKILL while it embeds a document resumes after a restart
/// and ends with every chunk indexed once: no duplicate, no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingestion_resumes_after_a_killed_node_without_duplicates_or_gaps() {
    let dir = tempfile::tempdir().unwrap();
    // Small steps, so the kill lands in the middle; a short lease, so the restarted node
    // takes the document back soon.
    let mut node = start_small_batch_node(dir.path(), "lease_secs = 5\n").await;
    let (kb_id, document, path) = long_document(&node, "long", 400).await;
    wait_until("embedding is under way", Duration::from_secs(120), || async {
        let (_, now) = get(&node, &path).await;
        assert_ne!(now["state"], "indexed", "the document finished before the node could be killed: {now}");
        assert_ne!(now["state"], "failed", "{now}");
        now["chunks_embedded"].as_i64().unwrap_or(0) >= 100
    })
    .await
    .unwrap();
    node.signal(Signal::SIGKILL).unwrap();
    node.wait_exit(Duration::from_secs(10)).await.unwrap();

    let node = MaasProcess::start_in(dir.path()).unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let (_, resumed) = get(&node, &path).await;
    let before = resumed["chunks_embedded"].as_i64().unwrap();
    let total = resumed["chunks_total"].as_i64().unwrap();
    eprintln!("{before} of {total} chunks were embedded when the node was killed");
    assert!(before > 0 && total > before, "{resumed}");
    let done = settled(&node, &kb_id, document["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "indexed", "{done}");
    assert_eq!(done["chunks_embedded"], done["chunks_total"], "{done}");
    assert_eq!(done["chunks_total"], total, "the chunks were not cut again: {done}");

    // Every chunk once: the ordinals run 0..total without a gap, and each index holds
    // exactly that many entries.
    let mut ordinals: Vec<i64> = Vec::new();
    loop {
        let (_, page) = get(&node, &format!("{path}/chunks?limit=500&offset={}", ordinals.len())).await;
        let listed = page["data"].as_array().unwrap();
        if listed.is_empty() {
            break;
        }
        ordinals.extend(listed.iter().map(|c| c["ordinal"].as_i64().unwrap()));
    }
    assert_eq!(ordinals, (0..total).collect::<Vec<_>>());
    let (_, summary) = get(&node, &format!("/v1/knowledge_bases/{kb_id}")).await;
    assert_eq!(summary["stats"]["vectors"], total, "{summary}");
    assert_eq!(summary["stats"]["fulltext_entries"], total, "{summary}");
    assert_eq!(summary["stats"]["chunks"], total, "{summary}");
    // And the text survives: every paragraph is findable.
    let (_, found) = send(
        &node,
        reqwest::Method::POST,
        &format!("/v1/knowledge_bases/{kb_id}/retrieve"),
        &json!({"query": "harbour 399", "mode": "fulltext", "top_k": 1}),
    )
    .await;
    assert!(found["data"][0]["text"].as_str().unwrap().contains("harbour number 399"), "{found}");
}
