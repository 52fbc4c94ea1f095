//! Chat sessions on a real `maas` process, over the WebSocket a client uses: a session
//! keeps its conversation across turns (the history is in the prompt), across a
//! reconnect and across a `kill -9` and restart of the node on the same data directory;
//! `cancel` and a client that disconnects end a turn as cancelled with what was
//! generated; bad frames get error frames and the socket stays usable; a second turn
//! while one answers is refused; unknown sessions are 404 before the upgrade.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use maas_chaos_tests::{MaasProcess, maas_binary, one_gpu_node_config, run_cli, tiny_model, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const COOKIE: &str = "sessions-test-cookie";

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A node whose configuration and data directory outlive its process.
struct Node {
    config_path: PathBuf,
    data_dir: PathBuf,
    process: MaasProcess,
}

impl Node {
    fn start(dir: &Path) -> Node {
        let config_path = dir.join("cluster.toml");
        let data_dir = dir.join("data");
        std::fs::write(&config_path, one_gpu_node_config(COOKIE, "")).unwrap();
        let process = Self::spawn(&config_path, &data_dir);
        Node { config_path, data_dir, process }
    }

    fn spawn(config_path: &Path, data_dir: &Path) -> MaasProcess {
        let mut command = Command::new(maas_binary());
        command.args(["node", "start", "--config"]).arg(config_path).env("MAAS_DATA", data_dir);
        MaasProcess::spawn(command, data_dir.to_owned()).unwrap()
    }

    async fn kill_and_restart(&mut self) {
        self.process.signal(Signal::SIGKILL).unwrap();
        self.process.wait_exit(Duration::from_secs(20)).await.unwrap();
        self.process = Self::spawn(&self.config_path, &self.data_dir);
        self.process.wait_ready(Duration::from_secs(30)).await.unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.process.base_url)
    }

    /// The session's WebSocket handshake, with the cluster cookie as its credential.
    fn ws_request(&self, id: &str) -> tungstenite::handshake::client::Request {
        use tungstenite::client::IntoClientRequest as _;
        let mut request = self.ws_url(id).into_client_request().unwrap();
        request.headers_mut().insert("x-maas-cluster-cookie", COOKIE.parse().unwrap());
        request
    }

    fn ws_url(&self, id: &str) -> String {
        format!("ws://{}/v1/sessions/{id}/ws", self.process.api_addr())
    }

    fn cli(&self, args: &[&str]) {
        run_cli(&self.process.base_url, COOKIE, args);
    }

    /// Waits until the deployment is listed and this node's replica of it is loaded (after
    /// a restart the committed state says ready before the replica has loaded again).
    async fn wait_serving(&self) {
        wait_until("the deployment serves", Duration::from_secs(60), || async {
            let Ok(response) = maas_chaos_tests::admin_get(COOKIE, self.url("/v1/models")).await else { return false };
            let models: Value = response.json().await.unwrap_or_default();
            let listed = models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "chat"));
            let Ok(response) = maas_chaos_tests::admin_get(COOKIE, self.url("/v1/node/agent")).await else {
                return false;
            };
            let agent: Value = response.json().await.unwrap_or_default();
            let loaded = agent["replicas"].as_array().is_some_and(|replicas| {
                replicas
                    .iter()
                    .any(|r| r["deployment_id"] == "chat" && r["running"] == true && r["local"]["state"] == "ready")
            });
            listed && loaded
        })
        .await
        .unwrap();
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = maas_chaos_tests::admin_get(COOKIE, self.url(path)).await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = maas_chaos_tests::admin_client(COOKIE).post(self.url(path)).json(body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    /// Opens the session's socket and reads its `session` frame.
    async fn connect(&self, id: &str) -> (Socket, Value) {
        let (mut socket, _) = tokio_tungstenite::connect_async(self.ws_request(id)).await.unwrap();
        let opened = next_frame(&mut socket).await;
        assert_eq!(opened["type"], "session", "{opened}");
        assert_eq!(opened["id"], id);
        assert_eq!(opened["model"], "chat");
        (socket, opened)
    }
}

/// The next JSON frame from the server (pongs are skipped).
async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("the server answers within 60 s")
            .expect("the socket is open")
            .expect("a frame");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("frames are JSON"),
            Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn send(socket: &mut Socket, frame: &Value) {
    socket.send(Message::text(frame.to_string())).await.unwrap();
}

/// Reads frames until the turn's `done`; returns the deltas' text, the `done` frame and
/// the error frames seen on the way.
async fn until_done(socket: &mut Socket) -> (String, Value, Vec<Value>) {
    let mut text = String::new();
    let mut errors = Vec::new();
    loop {
        let frame = next_frame(socket).await;
        match frame["type"].as_str() {
            Some("delta") => text.push_str(frame["content"].as_str().unwrap()),
            Some("done") => return (text, frame, errors),
            Some("error") => errors.push(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// One turn: the reply's text and its `done` frame.
async fn turn(socket: &mut Socket, content: &str) -> (String, Value) {
    send(socket, &json!({"type": "user", "content": content})).await;
    let (text, done, errors) = until_done(socket).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(["stop", "length"].contains(&done["finish_reason"].as_str().unwrap()), "{done}");
    assert!(
        (1..=8).contains(&done["usage"]["completion_tokens"].as_u64().unwrap()),
        "the session's max_tokens: {done}"
    );
    let usage = &done["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
    );
    (text, done)
}

fn prompt_tokens(done: &Value) -> u64 {
    done["usage"]["prompt_tokens"].as_u64().unwrap()
}

async fn expect_error(socket: &mut Socket, code: &str) -> Value {
    let frame = next_frame(socket).await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["error"]["code"], code, "{frame}");
    assert!(frame["error"]["message"].is_string() && frame["error"]["type"].is_string(), "{frame}");
    frame
}

// One story told in order: each step builds on the conversation the previous ones left.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_conversation_across_turns_reconnects_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path());
    node.process.wait_ready(Duration::from_secs(30)).await.unwrap();
    let model = dir.path().join("tiny");
    tiny_model("llama", &model);
    node.cli(&["model", "import", model.to_str().unwrap(), "--name", "tiny", "--quiet"]);
    node.cli(&["deploy", "tiny", "--name", "chat", "--context", "2048", "--sequences", "4"]);
    node.wait_serving().await;

    // Bad sessions are refused with reasons, and unknown ones are 404 before any upgrade.
    for (body, status, mention) in [
        (json!({"model": "nope"}), 404, "model_not_found"),
        (json!({"model": "chat", "temperature": "hot"}), 400, "temperature"),
        (json!({"model": "chat", "max_tokens": 0}), 400, "max_tokens"),
        (json!({"model": "chat", "frobnicate": true}), 400, "frobnicate"),
    ] {
        let (got, answer) = node.post("/v1/sessions", &body).await;
        assert_eq!(got, status, "{answer}");
        assert!(answer.to_string().contains(mention), "{answer} should mention {mention}");
    }
    assert_eq!(node.get("/v1/sessions/sess-missing").await.0, 404);
    match tokio_tungstenite::connect_async(node.ws_request("sess-missing")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("an unknown session is refused before the upgrade: {other:?}"),
    }

    let (status, session) = node
        .post("/v1/sessions", &json!({"model": "chat", "system": "You are terse.", "temperature": 0, "max_tokens": 8}))
        .await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap().to_owned();
    assert_eq!(session["object"], "chat.session");
    let (status, plain) = node.get(&format!("/v1/sessions/{id}/ws")).await;
    assert_eq!(status, 426, "a plain GET is told to upgrade: {plain}");

    // Two turns: the second's prompt holds the first turn.
    let (mut socket, opened) = node.connect(&id).await;
    assert_eq!(opened["messages"], 0);
    let (first_text, first) = turn(&mut socket, "hello world").await;
    let (_, second) = turn(&mut socket, "tell me more").await;
    assert!(prompt_tokens(&second) > prompt_tokens(&first), "the history is in the prompt: {first} {second}");
    // Each turn is metered like a chat completion: its usage is recorded once it ends.
    let expected_tokens = prompt_tokens(&first) + prompt_tokens(&second);
    wait_until("the turns' usage is recorded", Duration::from_secs(10), || async {
        let (status, usage) = node.get("/v1/usage").await;
        status == 200
            && usage["total"]["requests"].as_u64() >= Some(2)
            && usage["total"]["prompt_tokens"].as_u64() >= Some(expected_tokens)
    })
    .await
    .unwrap();

    // Bad frames get error frames; the socket stays usable.
    socket.send(Message::text("not json")).await.unwrap();
    expect_error(&mut socket, "invalid_frame").await;
    send(&mut socket, &json!({"type": "dance"})).await;
    expect_error(&mut socket, "unknown_frame_type").await;
    send(&mut socket, &json!({"type": "user"})).await;
    expect_error(&mut socket, "invalid_frame").await;
    send(&mut socket, &json!({"type": "user", "content": "hi", "frobnicate": 1})).await;
    let unknown = expect_error(&mut socket, "invalid_frame").await;
    assert!(unknown.to_string().contains("frobnicate"), "{unknown}");
    send(&mut socket, &json!({"type": "user", "content": "hi", "max_tokens": -3})).await;
    expect_error(&mut socket, "invalid_request").await;
    socket.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    expect_error(&mut socket, "binary_not_supported").await;
    send(&mut socket, &json!({"type": "cancel"})).await;
    expect_error(&mut socket, "no_turn").await;
    socket.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));

    // A turn while one answers is refused; `cancel` ends the answering one.
    send(&mut socket, &json!({"type": "user", "content": "write a long story", "max_tokens": 1500})).await;
    send(&mut socket, &json!({"type": "user", "content": "and another"})).await;
    send(&mut socket, &json!({"type": "cancel"})).await;
    let (cancelled_text, cancelled, errors) = until_done(&mut socket).await;
    assert_eq!(cancelled["finish_reason"], "cancelled", "{cancelled}");
    assert!(cancelled["usage"]["completion_tokens"].as_u64().unwrap() < 1500);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["error"]["code"], "session_busy");
    socket.close(None).await.unwrap();

    // Every turn is stored, the cut one marked.
    let (status, stored) = node.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, 200, "{stored}");
    let messages = stored["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 6, "{stored}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "hello world");
    assert_eq!(messages[1]["content"], first_text.as_str());
    assert_eq!(messages[1]["finish_reason"], first["finish_reason"]);
    assert_eq!(messages[4]["content"], "write a long story");
    assert_eq!(messages[5]["finish_reason"], "cancelled");
    assert_eq!(messages[5]["content"], cancelled_text.as_str());
    assert_eq!(stored["title"], "hello world");
    let (_, list) = node.get("/v1/sessions").await;
    assert!(list["data"].as_array().unwrap().iter().any(|s| s["id"] == id.as_str()), "{list}");

    // A reconnect continues the same conversation.
    let (mut socket, opened) = node.connect(&id).await;
    assert_eq!(opened["messages"], 6);
    let (_, after_reconnect) = turn(&mut socket, "go on").await;
    assert!(prompt_tokens(&after_reconnect) > prompt_tokens(&second), "{second} {after_reconnect}");

    // A client that goes away during a turn cancels it; the turn is kept, marked.
    send(&mut socket, &json!({"type": "user", "content": "one more long story", "max_tokens": 1500})).await;
    let first_delta = next_frame(&mut socket).await;
    assert_eq!(first_delta["type"], "delta", "{first_delta}");
    drop(socket);
    wait_until("the abandoned turn is recorded", Duration::from_secs(30), || async {
        let (_, stored) = node.get(&format!("/v1/sessions/{id}")).await;
        stored["messages"].as_array().is_some_and(|m| m.len() == 10)
    })
    .await
    .unwrap();
    let (_, before_kill) = node.get(&format!("/v1/sessions/{id}")).await;
    let abandoned = &before_kill["messages"][9];
    assert_eq!(abandoned["finish_reason"], "cancelled", "{before_kill}");
    assert!(abandoned["completion_tokens"].as_u64().unwrap() < 1500, "{abandoned}");

    // kill -9 and a restart on the same data directory keep the whole conversation.
    node.kill_and_restart().await;
    let (status, after_restart) = node.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, 200, "{after_restart}");
    assert_eq!(after_restart["messages"], before_kill["messages"]);
    node.wait_serving().await;
    let (mut socket, opened) = node.connect(&id).await;
    assert_eq!(opened["messages"], 10);
    let (_, resumed) = turn(&mut socket, "still there?").await;
    assert!(prompt_tokens(&resumed) > prompt_tokens(&after_reconnect), "{after_reconnect} {resumed}");
    socket.close(None).await.unwrap();

    a_long_conversation_leaves_out_its_oldest_turns(&node).await;

    // Deleted, the session is gone everywhere.
    let deleted =
        maas_chaos_tests::admin_client(COOKIE).delete(node.url(&format!("/v1/sessions/{id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(node.get(&format!("/v1/sessions/{id}")).await.0, 404);
    match tokio_tungstenite::connect_async(node.ws_request(&id)).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("a deleted session is refused before the upgrade: {other:?}"),
    }
}

/// A conversation longer than the model's context (the tiny model's 512 tokens: the
/// deployment's `--context 2048` sizes its cache, not the model's window) keeps every turn in
/// the session, while each prompt leaves out the oldest turns so that it fits with room for
/// the answer; a question too long on its own is refused with a reason.
async fn a_long_conversation_leaves_out_its_oldest_turns(node: &Node) {
    let (status, session) = node
        .post("/v1/sessions", &json!({"model": "chat", "system": "Be brief.", "temperature": 0, "max_tokens": 8}))
        .await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap().to_owned();
    let (mut socket, _) = node.connect(&id).await;
    // Words the tiny tokenizer keeps whole: about 100 tokens a turn.
    let paragraph = |turn: usize| format!("turn {turn}: {}", "the a is of and to in it ".repeat(12));
    let budget = 512 - 8 - 1;
    let mut omitted = Vec::new();
    let mut prompts = Vec::new();
    for number in 0..12 {
        let (_, done) = turn(&mut socket, &paragraph(number)).await;
        assert!(prompt_tokens(&done) <= budget, "the prompt fits with room for the answer: {done}");
        omitted.push(done["history_omitted"].as_u64().unwrap());
        prompts.push(prompt_tokens(&done));
    }
    assert_eq!(omitted[0], 0, "{omitted:?}");
    assert!(*omitted.last().unwrap() > 0, "the oldest turns go once the context is full: {omitted:?} {prompts:?}");
    assert!(omitted.windows(2).all(|w| w[0] <= w[1]), "{omitted:?}");
    assert!(omitted.iter().all(|n| n.is_multiple_of(2)), "whole turns go: {omitted:?}");
    assert!(prompts.last().unwrap() * 10 >= budget * 7, "no more is left out than needed: {prompts:?} of {budget}");
    let (_, stored) = node.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 24, "the session keeps every turn");

    // A question that cannot fit on its own is refused; the socket stays usable.
    send(&mut socket, &json!({"type": "user", "content": "the a is of ".repeat(700)})).await;
    let refused = expect_error(&mut socket, "context_length_exceeded").await;
    assert!(refused["error"]["message"].as_str().unwrap().contains("512"), "{refused}");
    let (_, after) = turn(&mut socket, "short again").await;
    assert!(after["history_omitted"].as_u64().unwrap() > 0, "{after}");
    socket.close(None).await.unwrap();
}
