//! The `maas` binary's command line: help, config checking, and refusing bad configs.

use std::process::Command;

fn maas() -> Command {
    Command::new(env!("CARGO_BIN_EXE_maas"))
}

#[test]
fn help_lists_the_subcommands() {
    let output = maas().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for command in ["up", "node", "config"] {
        assert!(help.contains(command), "{help}");
    }
    let output = maas().args(["node", "start", "--help"]).output().unwrap();
    assert!(String::from_utf8(output.stdout).unwrap().contains("--config <FILE>"));
}

#[test]
fn config_check_prints_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[node]\nname = \"gpu-a\"\n").unwrap();
    let output =
        maas().args(["config", "check"]).arg(&file).env("MAAS_LISTEN__API", "127.0.0.1:9999").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("name = \"gpu-a\""), "{printed}");
    assert!(printed.contains("api = \"127.0.0.1:9999\""), "{printed}");
    assert!(printed.contains("drain_timeout_secs = 30"), "defaults are shown: {printed}");
}

#[test]
fn the_repository_cluster_toml_checks_clean() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../cluster.toml");
    let output = maas().args(["config", "check", file]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn bad_configs_exit_non_zero_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let table = [
        ("[gateway]\nbogus_key = 1\n", "`gateway.bogus_key`"),
        ("[listen]\napi = \"not-an-address\"\n", "`listen.api`"),
        ("[gateway]\nmax_upload_bytes = -10\n", "`gateway.max_upload_bytes`"),
    ];
    for (text, named) in table {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        for args in [vec!["config", "check"], vec!["node", "start", "--config"]] {
            let output = maas().args(&args).arg(&file).output().unwrap();
            assert_eq!(output.status.code(), Some(2), "{args:?} {text}");
            let stderr = String::from_utf8(output.stderr).unwrap();
            assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
            assert!(stderr.starts_with("error: invalid configuration:") && stderr.contains(named), "{stderr}");
        }
    }
    let output = maas().args(["config", "check", "/no/such/file.toml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8(output.stderr).unwrap().contains("cannot read config file /no/such/file.toml"));
}

#[test]
fn up_refuses_a_bad_listen_flag() {
    let dir = tempfile::tempdir().unwrap();
    let output = maas().args(["up", "--listen", "nowhere"]).arg("--data").arg(dir.path()).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("MAAS_LISTEN__API") && stderr.contains("not an address"), "{stderr}");
}

#[test]
fn unreadable_tls_files_stop_the_node_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tls.toml");
    std::fs::write(
        &file,
        "[listen]\napi = \"127.0.0.1:0\"\ncluster = \"127.0.0.1:0\"\n[tls]\ncert_path = \"/no/cert.pem\"\nkey_path = \"/no/key.pem\"\n",
    )
    .unwrap();
    let output = maas()
        .args(["node", "start", "--config"])
        .arg(&file)
        .env("MAAS_DATA", dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("tls.cert_path") && stderr.contains("/no/cert.pem"), "{stderr}");
}

#[test]
fn the_raft_benchmark_runs_over_the_loopback_transport() {
    let dir = tempfile::tempdir().unwrap();
    let output = maas()
        .args(["bench", "raft", "--seconds", "1", "--tick-ms", "20", "--network", "loopback", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = String::from_utf8(output.stdout).unwrap();
    assert!(report.contains("ractor_cluster over TCP loopback"), "{report}");
    for proposers in [" 1 proposers", "64 proposers"] {
        let line = report.lines().find(|l| l.contains(proposers)).unwrap_or_else(|| panic!("{report}"));
        let per_second: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(per_second > 0.0, "{line}");
    }
    assert!(report.contains("leader failover"), "{report}");
}

#[test]
fn model_catalog_lists_the_built_in_catalogue() {
    let output = maas().args(["model", "catalog"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8(output.stdout).unwrap();
    let header = table.lines().next().unwrap();
    for column in ["NAME", "FAMILY", "PARAMETERS", "CONTEXT", "TASKS", "SERVABLE", "SOURCE"] {
        assert!(header.contains(column), "{header}");
    }
    let row = |name: &str| {
        table
            .lines()
            .find(|line| line.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} is listed: {table}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        row("qwen2.5-0.5b-instruct"),
        "qwen2.5-0.5b-instruct qwen2 494M 32768 chat,completion yes Qwen/Qwen2.5-0.5B-Instruct"
    );
    assert_eq!(row("phi-2"), "phi-2 phi 2.8B 2048 completion no microsoft/phi-2");
    assert!(row("bge-small-en-v1.5").contains(" embedding yes BAAI/bge-small-en-v1.5"));
    assert!(row("qwen2.5-0.5b-instruct-q8_0").ends_with("(qwen2.5-0.5b-instruct-q8_0.gguf)"));

    let output = maas().args(["model", "catalog", "--json"]).output().unwrap();
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let models = json["models"].as_array().unwrap();
    assert!(models.len() >= 30);
    let glm = models.iter().find(|m| m["name"] == "glm-4-9b-chat-hf").unwrap();
    assert_eq!((glm["servable"].as_bool(), glm["source_repo"].as_str()), (Some(false), Some("THUDM/glm-4-9b-chat-hf")));
    assert!(glm["not_servable_reason"].as_str().unwrap().contains("GLM"));
    assert!(glm["description"].as_str().unwrap().contains("GLM-4 9B Chat"));
}

#[test]
fn openapi_prints_the_document_the_node_serves() {
    let output = maas().arg("openapi").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let document: serde_json::Value = serde_json::from_slice(&output.stdout).expect("the document is JSON");
    assert!(document["openapi"].as_str().unwrap().starts_with("3."), "{document}");
    for path in ["/v1/auth/login", "/v1/keys", "/v1/chat/completions", "/v1/gpus"] {
        assert!(document["paths"].get(path).is_some(), "{path} is documented");
    }
    assert_eq!(
        document,
        serde_json::from_str::<serde_json::Value>(&maas_gateway::routes::openapi::document()).unwrap()
    );
}
