//! The model repository's catalogue and archive imports over HTTP, against a real store
//! and blob store: the catalogue lists every entry and the versions imported under its
//! names; a catalogue name checks the files against the entry (a mismatch is a 400 that
//! names the value); archives (.tar.gz, .zip) of a tiny model are unpacked into blobs and
//! registered; hostile, corrupt and oversized archives are refused and register nothing.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use maas_gateway::{AppState, GatewayOptions, HttpServer, ServeOptions};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const COOKIE: &str = "registry-test-cookie";
/// The upload limit, and so the most an archive may unpack to.
const MAX_UPLOAD_BYTES: u64 = 4 << 20;

struct Setup {
    base: String,
    dir: tempfile::TempDir,
    /// Held so the server runs for the whole test.
    _serving: maas_gateway::ShutdownTrigger,
}

async fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(AppState::new(
        "test-node",
        GatewayOptions { max_upload_bytes: MAX_UPLOAD_BYTES, ..GatewayOptions::default() },
    ));
    let db =
        maas_store::Db::connect(&maas_store::DbOptions::new(maas_store::db::sqlite_url_in(dir.path()))).await.unwrap();
    db.migrate().await.unwrap();
    let blobs = maas_store::BlobStore::open(dir.path().join("blobs")).await.unwrap();
    let _ = state.stores.set(maas_gateway::state::Stores { db, blobs, data_dir: dir.path().to_owned() });
    let _ = state.cluster_cookie.set(COOKIE.to_owned());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HttpServer::new(
        listener,
        maas_gateway::routes::routes(&state),
        &ServeOptions {
            max_body_bytes: 1 << 20,
            max_upload_bytes: MAX_UPLOAD_BYTES,
            drain_timeout: Duration::from_secs(1),
            tls: None,
            cors: maas_gateway::middleware::CorsPolicy::default(),
        },
    );
    let base = format!("http://{}", server.local_addr().unwrap());
    let (trigger, shutdown) = maas_gateway::shutdown_channel();
    tokio::spawn(server.run(shutdown));
    Setup { base, dir, _serving: trigger }
}

async fn get(setup: &Setup, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}{path}", setup.base))
        .header("x-maas-cluster-cookie", COOKIE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn register(setup: &Setup, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/registry/models", setup.base))
        .header("x-maas-cluster-cookie", COOKIE)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn upload(setup: &Setup, bytes: Vec<u8>) -> Value {
    let size = bytes.len();
    let reply: Value = reqwest::Client::new()
        .post(format!("{}/v1/blobs", setup.base))
        .header("x-maas-cluster-cookie", COOKIE)
        .body(bytes)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["size_bytes"], size, "{reply}");
    reply
}

/// Uploads a folder's files; returns the `files` of a registration.
async fn upload_folder(setup: &Setup, dir: &Path) -> Value {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let size = bytes.len();
        let reply = upload(setup, bytes).await;
        files.push(
            json!({"path": path.file_name().unwrap().to_str().unwrap(), "sha256": reply["sha256"], "size_bytes": size}),
        );
    }
    Value::Array(files)
}

async fn versions(setup: &Setup) -> usize {
    get(setup, "/v1/registry/models").await["versions"].as_array().unwrap().len()
}

fn assert_refused(status: u16, answer: &Value, expected_status: u16, code: &str, says: &str) {
    assert_eq!(status, expected_status, "{answer}");
    assert_eq!(answer["error"]["code"], code, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

/// Rewrites a tiny model's config.json with a catalogue entry's identifying values.
fn patch_config(dir: &Path, name: &str) {
    let d = maas_engine::catalog::find(name).unwrap().dimensions;
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["hidden_size"] = d.hidden_size.into();
    config["num_hidden_layers"] = d.num_hidden_layers.into();
    config["num_attention_heads"] = d.num_attention_heads.into();
    config["num_key_value_heads"] = d.num_key_value_heads.unwrap().into();
    config["vocab_size"] = d.vocab_size.unwrap().into();
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_is_listed_and_a_catalogue_name_checks_the_files() {
    let setup = start().await;
    let catalog = get(&setup, "/v1/registry/catalog").await;
    let models = catalog["models"].as_array().unwrap();
    assert_eq!(models.len(), maas_engine::catalog::entries().len());
    let qwen = models.iter().find(|m| m["name"] == "qwen2.5-0.5b-instruct").unwrap();
    assert_eq!(qwen["source_repo"], "Qwen/Qwen2.5-0.5B-Instruct");
    assert_eq!(qwen["dimensions"]["hidden_size"], 896);
    assert_eq!((qwen["servable"].as_bool(), qwen["imported_versions"].clone()), (Some(true), json!([])));
    let phi = models.iter().find(|m| m["name"] == "phi-3-mini-4k-instruct").unwrap();
    assert_eq!(phi["servable"], false);
    assert!(phi["not_servable_reason"].as_str().unwrap().contains("Phi"), "{phi}");

    // The tiny random Qwen2 under a real model's name: refused, naming the value.
    let tiny = setup.dir.path().join("tiny-qwen2");
    maas_engine::tiny::write_qwen2(&tiny, maas_engine::tiny::TinyShape::default(), 2).unwrap();
    let files = upload_folder(&setup, &tiny).await;
    let (status, answer) = register(&setup, json!({"name": "qwen2.5-0.5b-instruct", "files": files})).await;
    assert_refused(
        status,
        &answer,
        400,
        "catalog_mismatch",
        "config.json hidden_size is 64, qwen2.5-0.5b-instruct has 896",
    );
    let (status, answer) = register(&setup, json!({"name": "llama-3.2-1b-instruct", "files": files})).await;
    assert_refused(
        status,
        &answer,
        400,
        "catalog_mismatch",
        "config.json architectures[0] is Qwen2ForCausalLM, llama-3.2-1b-instruct has LlamaForCausalLM",
    );
    assert_eq!(versions(&setup).await, 0, "refused registrations add nothing");

    // The same files with the real model's identifying values match; the description and
    // tasks come from the entry.
    patch_config(&tiny, "qwen2.5-0.5b-instruct");
    let files = upload_folder(&setup, &tiny).await;
    let (status, record) = register(&setup, json!({"name": "qwen2.5-0.5b-instruct", "files": files})).await;
    assert_eq!(status, 201, "{record}");
    assert_eq!(record["architecture"], "Qwen2ForCausalLM");
    assert_eq!(record["tasks"], json!(["chat", "completion"]));
    let description = record["description"].as_str().unwrap();
    assert!(description.contains("Qwen2.5 0.5B Instruct") && description.contains("Qwen/Qwen2.5-0.5B-Instruct"));
    // The base model's entry says completion only; a request's own tasks and description win.
    let (status, record) = register(
        &setup,
        json!({"name": "qwen2.5-0.5b", "files": files, "description": "mine", "tasks": ["completion", "chat"]}),
    )
    .await;
    assert_eq!(status, 201, "{record}");
    assert_eq!(
        (record["description"].clone(), record["tasks"].clone()),
        (json!("mine"), json!(["completion", "chat"]))
    );
    let (status, answer) = register(&setup, json!({"name": "x", "files": files, "tasks": ["dancing"]})).await;
    assert_refused(status, &answer, 400, "invalid_input", "task `dancing`");

    let catalog = get(&setup, "/v1/registry/catalog").await;
    let imported = |name: &str| {
        catalog["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap()["imported_versions"].clone()
    };
    assert_eq!(imported("qwen2.5-0.5b-instruct"), json!(["v1"]));
    assert_eq!(imported("qwen2.5-0.5b"), json!(["v1"]));
    assert_eq!(imported("qwen2.5-1.5b-instruct"), json!([]));
}

fn tar_gz_of(model: &Path, top: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    builder.append_dir_all(top, model).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

fn zip_of(model: &Path, top: &str) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for entry in std::fs::read_dir(model).unwrap() {
        let path = entry.unwrap().path();
        writer.start_file(format!("{top}/{}", path.file_name().unwrap().to_str().unwrap()), options).unwrap();
        writer.write_all(&std::fs::read(&path).unwrap()).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// A tar with one entry written raw (the tar crate's own builder refuses `..`).
fn hostile_tar(name: &[u8], kind: tar::EntryType) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(kind);
    header.set_size(2);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, b"{}".as_slice()).unwrap();
    builder.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_are_unpacked_into_blobs_and_registered() {
    let setup = start().await;
    let model = setup.dir.path().join("tiny-llama");
    let mut written = maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 4).unwrap();
    written.sort();

    for (name, archive) in [("from-tgz", tar_gz_of(&model, "tiny-llama")), ("from-zip", zip_of(&model, "tiny-llama"))] {
        let blob = upload(&setup, archive).await;
        let (status, record) = register(&setup, json!({"name": name, "archive_sha256": blob["sha256"]})).await;
        assert_eq!(status, 201, "{record}");
        assert_eq!(record["architecture"], "LlamaForCausalLM");
        assert_eq!(record["format"], "safetensors");
        assert_eq!(record["context_length"], 512);
        assert!(record["parameters"].as_u64().is_some_and(|p| p > 50_000), "{record}");
        let mut paths: Vec<String> =
            record["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap().to_owned()).collect();
        paths.sort();
        assert_eq!(paths, written, "the top folder is stripped");
        // Each file became a blob with the file's own bytes.
        let weights = record["files"].as_array().unwrap().iter().find(|f| f["path"] == "model.safetensors").unwrap();
        let served = reqwest::Client::new()
            .get(format!("{}/v1/blobs/{}", setup.base, weights["sha256"].as_str().unwrap()))
            .header("x-maas-cluster-cookie", COOKIE)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(served.as_ref(), std::fs::read(model.join("model.safetensors")).unwrap().as_slice());
    }
    let listed = get(&setup, "/v1/registry/models").await;
    let listed = listed["versions"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|v| v["architecture"] == "LlamaForCausalLM" && v["tasks"] == json!(["chat", "completion"]))
    );

    // An archive of a catalogue model is checked against the entry too.
    let blob = upload(&setup, tar_gz_of(&model, "m")).await;
    let (status, answer) =
        register(&setup, json!({"name": "llama-3.2-1b-instruct", "archive_sha256": blob["sha256"]})).await;
    assert_refused(status, &answer, 400, "catalog_mismatch", "hidden_size is 64, llama-3.2-1b-instruct has 2048");
    assert_eq!(versions(&setup).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corrupt_and_oversized_archives_are_refused() {
    let setup = start().await;
    let model = setup.dir.path().join("tiny");
    maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 4).unwrap();
    let good = tar_gz_of(&model, "m");

    let mut cases: Vec<(Vec<u8>, u16, &str, &str)> = vec![
        (hostile_tar(b"../../etc/evil", tar::EntryType::Regular), 400, "archive_entry_refused", "\"../../etc/evil\""),
        (hostile_tar(b"/etc/evil", tar::EntryType::Regular), 400, "archive_entry_refused", "absolute path"),
        (hostile_tar(b"m/link", tar::EntryType::Symlink), 400, "archive_entry_refused", "it is a link"),
        (hostile_tar(b"m/tty", tar::EntryType::Char), 400, "archive_entry_refused", "it is a device file"),
        (good[..good.len() / 2].to_vec(), 400, "archive_corrupt", "corrupt"),
        (b"just some notes".to_vec(), 400, "not_an_archive", "expected a .tar"),
    ];
    // 16 MiB of zeros compress to a few KiB; unpacked they pass the 4 MiB upload limit.
    let zeros = setup.dir.path().join("zeros");
    std::fs::create_dir_all(&zeros).unwrap();
    File::create(zeros.join("model.safetensors")).unwrap().write_all(&vec![0u8; 16 << 20]).unwrap();
    cases.push((tar_gz_of(&zeros, "m"), 413, "archive_too_large", "more than 4194304 bytes"));
    cases.push((zip_of(&zeros, "m"), 413, "archive_too_large", "more than 4194304 bytes"));
    for (archive, status, code, says) in cases {
        let blob = upload(&setup, archive).await;
        let (found, answer) = register(&setup, json!({"name": "hostile", "archive_sha256": blob["sha256"]})).await;
        assert_refused(found, &answer, status, code, says);
    }
    assert!(!setup.dir.path().join("etc/evil").exists());

    // An archive never uploaded, both sources at once, or neither.
    let (status, answer) = register(&setup, json!({"name": "ghost", "archive_sha256": "1".repeat(64)})).await;
    assert_refused(status, &answer, 400, "blob_missing", "was not uploaded");
    let blob = upload(&setup, good).await;
    let file = json!([{"path": "config.json", "sha256": blob["sha256"], "size_bytes": 1}]);
    let (status, answer) =
        register(&setup, json!({"name": "both", "archive_sha256": blob["sha256"], "files": file})).await;
    assert_refused(status, &answer, 400, "invalid_input", "not both");
    let (status, answer) = register(&setup, json!({"name": "neither"})).await;
    assert_refused(status, &answer, 400, "invalid_input", "archive_sha256");
    // A bad name fails before anything is unpacked.
    let (status, answer) = register(&setup, json!({"name": "../bad", "archive_sha256": blob["sha256"]})).await;
    assert_refused(status, &answer, 400, "invalid_input", "model name");
    assert_eq!(versions(&setup).await, 0, "refused archives register nothing");
}

/// What the data directory's `models/` folder holds (model folders laid out on this node).
fn laid_out(setup: &Setup) -> Vec<String> {
    std::fs::read_dir(setup.dir.path().join("models"))
        .map(|entries| entries.map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn file(path: &str, blob: &Value) -> Value {
    json!({"path": path, "sha256": blob["sha256"], "size_bytes": blob["size_bytes"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_registrations_leave_no_files_behind_and_a_file_cannot_be_a_folder() {
    let setup = start().await;
    let tiny = setup.dir.path().join("tiny-qwen2");
    maas_engine::tiny::write_qwen2(&tiny, maas_engine::tiny::TinyShape::default(), 3).unwrap();
    let files = upload_folder(&setup, &tiny).await;

    // Refused by the catalogue, and as not a model: the files were laid out to be checked,
    // and are gone again.
    let (status, answer) = register(&setup, json!({"name": "qwen2.5-0.5b-instruct", "files": files})).await;
    assert_refused(status, &answer, 400, "catalog_mismatch", "hidden_size is 64");
    let without_tokenizer: Vec<Value> =
        files.as_array().unwrap().iter().filter(|f| f["path"] != "tokenizer.json").cloned().collect();
    let (status, answer) = register(&setup, json!({"name": "broken", "files": without_tokenizer})).await;
    assert_refused(status, &answer, 400, "not_a_model", "tokenizer.json is missing");
    assert_eq!(laid_out(&setup), Vec::<String>::new(), "nothing is left under models/");

    // `a` and `a/b` at once: no folder holds both.
    let blob = upload(&setup, b"{}".to_vec()).await;
    let mut clashing = files.as_array().unwrap().clone();
    clashing.push(file("1_Pooling", &blob));
    clashing.push(file("1_Pooling/config.json", &blob));
    let (status, answer) = register(&setup, json!({"name": "clash", "files": clashing})).await;
    assert_refused(
        status,
        &answer,
        400,
        "invalid_input",
        "file `1_Pooling` is also the folder of file `1_Pooling/config.json`",
    );
    // Files that are none of a model's.
    let (status, answer) = register(&setup, json!({"name": "notes", "files": [file("notes.txt", &blob)]})).await;
    assert_refused(status, &answer, 400, "not_a_model", "none of the files is part of a model");
    assert_eq!(versions(&setup).await, 0, "refused registrations add nothing");
    assert_eq!(laid_out(&setup), Vec::<String>::new());

    // A registration that succeeds leaves no checking folder either.
    let (status, record) = register(&setup, json!({"name": "tiny", "files": files})).await;
    assert_eq!(status, 201, "{record}");
    assert_eq!(laid_out(&setup), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_files_a_model_needs_are_registered() {
    let setup = start().await;
    let model = setup.dir.path().join("download");
    let mut needed = maas_engine::tiny::write_llama(&model, maas_engine::tiny::TinyShape::default(), 4).unwrap();
    let mut files = upload_folder(&setup, &model).await.as_array().unwrap().clone();
    // A full download's other copies of the weights, and the pooling an embedder reads.
    let decoy = upload(&setup, vec![9u8; 4096]).await;
    for path in ["consolidated.safetensors", "original/consolidated.00.pth", "pytorch_model.bin", "onnx/model.onnx"] {
        files.push(file(path, &decoy));
    }
    let pooling = upload(&setup, br#"{"pooling_mode_cls_token": true}"#.to_vec()).await;
    files.push(file("1_Pooling/config.json", &pooling));
    needed.push("1_Pooling/config.json".to_owned());
    needed.sort();

    let (status, record) = register(&setup, json!({"name": "download", "files": files})).await;
    assert_eq!(status, 201, "{record}");
    let mut registered: Vec<String> =
        record["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap().to_owned()).collect();
    registered.sort();
    assert_eq!(registered, needed);
    let skipped: Vec<(&str, &str)> = record["skipped_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["path"].as_str().unwrap(), s["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    assert!(skipped.contains(&(
        "original/consolidated.00.pth",
        "the publisher's original checkpoint, a second copy of the weights"
    )));
    let total: u64 = record["files"].as_array().unwrap().iter().map(|f| f["size_bytes"].as_u64().unwrap()).sum();
    assert_eq!(record["total_bytes"], total, "the version counts only what it holds");

    // The same from an archive of the download.
    for (path, bytes) in
        [("consolidated.safetensors", vec![9u8; 4096]), ("original/consolidated.00.pth", vec![8u8; 64])]
    {
        std::fs::create_dir_all(model.join(path).parent().unwrap()).unwrap();
        std::fs::write(model.join(path), bytes).unwrap();
    }
    let blob = upload(&setup, tar_gz_of(&model, "download")).await;
    let (status, record) = register(&setup, json!({"name": "from-archive", "archive_sha256": blob["sha256"]})).await;
    assert_eq!(status, 201, "{record}");
    let registered: Vec<&str> =
        record["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert!(!registered.iter().any(|path| path.contains("consolidated")), "{registered:?}");
    assert_eq!(record["skipped_files"].as_array().unwrap().len(), 2, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glm_imports_as_a_chat_model_and_gguf_metadata_comes_from_its_tensors() {
    let setup = start().await;
    // THUDM/glm-4-9b-chat-hf's config.json on tiny weights: importable under its catalogue
    // name though this engine cannot serve it.
    let glm = setup.dir.path().join("glm");
    maas_engine::tiny::write_llama(&glm, maas_engine::tiny::TinyShape::default(), 5).unwrap();
    let config = json!({
        "architectures": ["GlmForCausalLM"], "model_type": "glm", "hidden_size": 4096, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 2, "vocab_size": 151_552,
        "max_position_embeddings": 131_072, "torch_dtype": "bfloat16", "partial_rotary_factor": 0.5
    });
    std::fs::write(glm.join("config.json"), config.to_string()).unwrap();
    let files = upload_folder(&setup, &glm).await;
    let (status, record) = register(&setup, json!({"name": "glm-4-9b-chat-hf", "files": files})).await;
    assert_eq!(status, 201, "{record}");
    assert_eq!(
        (record["architecture"].as_str(), record["tasks"].clone()),
        (Some("GlmForCausalLM"), json!(["chat", "completion"]))
    );

    // The remote-code layout's ChatGLMModel is a chat model, not an embedding model.
    let chatglm = json!({"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 40});
    std::fs::write(glm.join("config.json"), chatglm.to_string()).unwrap();
    let files = upload_folder(&setup, &glm).await;
    let (status, record) = register(&setup, json!({"name": "chatglm", "files": files})).await;
    assert_eq!(status, 201, "{record}");
    assert_eq!(record["tasks"], json!(["chat", "completion"]), "{record}");

    // A GGUF without general.parameter_count or general.file_type: counted from its tensors.
    let gguf = setup.dir.path().join("tiny.gguf");
    maas_engine::tiny::write_gguf_llama(
        &gguf,
        maas_engine::tiny::TinyShape::default(),
        5,
        maas_engine::tiny::GgufWeights::Q8_0,
    )
    .unwrap();
    // The same tensors as the tiny safetensors model of that shape.
    let parameters = maas_engine::model_files::inspect_headers(&glm).unwrap().parameters;
    let blob = upload(&setup, std::fs::read(&gguf).unwrap()).await;
    let (status, record) = register(&setup, json!({"name": "tiny-gguf", "files": [file("tiny.gguf", &blob)]})).await;
    assert_eq!(status, 201, "{record}");
    assert_eq!(record["format"], "gguf");
    assert!(parameters > 50_000);
    assert_eq!(record["parameters"], parameters);
    assert_eq!((record["dtype"].as_str(), record["quantization"].as_str()), (Some("q8_0"), Some("Q8_0")));
}
