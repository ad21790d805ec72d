//! The API server an admin can expose: private state files, `{"error": …}` for every refusal,
//! submissions that cannot smuggle anything to a VM's shell, and a stop that no slow client
//! can hold up.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use system_tests::*;

fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, std::fs::Metadata)>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            walk(&entry.path(), out);
        }
        out.push((entry.path(), meta));
    }
}

#[test]
fn every_state_file_is_private() {
    let h = ServeHarness::start(ONE_SMALL_TYPE, "");
    let id = h
        .client()
        .submit(&dispatch_cloud::queue::NewContainer {
            command: vec!["sh".into(), "-c".into(), "echo out; echo err >&2".into()],
            env: [("SECRET".to_string(), "hunter2".to_string())].into(),
            priority: 1,
            ..Default::default()
        })
        .expect("submit")
        .id;
    h.wait_for_state(
        &id,
        dispatch_cloud::queue::ContainerState::Complete,
        Duration::from_secs(60),
    );
    let state = h.state_dir();
    assert_eq!(
        std::fs::metadata(&state)
            .expect("state dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let mut entries = Vec::new();
    walk(&state, &mut entries);
    let files: Vec<_> = entries.iter().filter(|(_, m)| m.is_file()).collect();
    for name in [
        "queue.sqlite",
        "queue.sqlite-wal",
        "ssh_key",
        "api-address",
        "stdout",
        "stderr",
    ] {
        assert!(
            files
                .iter()
                .any(|(p, _)| p.file_name().is_some_and(|n| n == name)),
            "{name} missing from {entries:?}"
        );
    }
    for (path, meta) in &entries {
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
        } else if meta.is_file() {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
}

#[test]
fn state_left_readable_by_an_older_version_is_made_private_at_start() {
    let mut h = ServeHarness::start("", "");
    h.kill();
    let state = h.state_dir();
    let queue = state.join("queue.sqlite");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&queue, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    h.spawn();
    for (path, want) in [(&state, 0o700), (&queue, 0o600)] {
        let mode = std::fs::metadata(path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", path.display());
    }
}

/// `(status, body)` of a raw request to the API.
fn call(
    h: &ServeHarness,
    method: &str,
    path: &str,
    token: bool,
    body: Option<(&str, &str)>,
) -> (u16, serde_json::Value) {
    let mut request = ureq::request(method, &format!("{}{path}", h.url));
    if token {
        request = request.set("Authorization", &format!("Bearer {}", h.token));
    }
    let result = match body {
        Some((content_type, text)) => request.set("Content-Type", content_type).send_string(text),
        None => request.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().expect("body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path} → {status}: not JSON ({e}): {text:?}"));
    (status, json)
}

#[test]
fn every_refusal_is_json_naming_what_is_wrong() {
    let h = ServeHarness::start("", "");
    let json = "application/json";
    // (method, path, with the token, (content type, body), status, what the error says)
    type Case<'a> = (
        &'a str,
        &'a str,
        bool,
        Option<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("GET", "/containers", false, None, 401, "bearer token"),
        (
            "POST",
            "/containers",
            true,
            Some((json, "{not json")),
            400,
            "JSON",
        ),
        (
            "POST",
            "/containers",
            true,
            Some(("text/plain", "{}")),
            415,
            "Content-Type",
        ),
        (
            "GET",
            "/no/such/endpoint",
            true,
            None,
            404,
            "no such endpoint",
        ),
        ("DELETE", "/containers", true, None, 405, "method"),
        ("GET", "/containers?limit=many", true, None, 400, "limit"),
        (
            "POST",
            "/containers/x/priority",
            true,
            Some((json, "{\"priority\": \"high\"}")),
            422,
            "priority",
        ),
        (
            "POST",
            "/containers",
            true,
            Some((json, r#"{"command": ["true"], "env": {"A=B": "1"}}"#)),
            400,
            "env.A=B",
        ),
        (
            "POST",
            "/containers",
            true,
            Some((json, r#"{"command": ["true"], "env": {"": "1"}}"#)),
            400,
            "env: a key is empty",
        ),
        (
            "POST",
            "/containers",
            true,
            Some((json, "{\"command\": [\"a\\u0000b\"]}")),
            400,
            "command[0]: contains a NUL byte",
        ),
        (
            "POST",
            "/containers",
            true,
            Some((json, r#"{"command": ["true"], "image": "--privileged"}"#)),
            400,
            "image: must not start with '-'",
        ),
        (
            "POST",
            "/containers",
            true,
            Some((json, r#"{"command": ["true"], "working_dir": "-C"}"#)),
            400,
            "working_dir",
        ),
        (
            "GET",
            "/containers/no-such-id",
            true,
            None,
            404,
            "no-such-id",
        ),
    ];
    for (method, path, token, body, status, needle) in cases {
        let (got, answer) = call(&h, method, path, token, body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{method} {path}: {needle:?} not in {error:?}"
        );
    }
    assert!(
        h.client().list().expect("list").is_empty(),
        "nothing refused got in"
    );
}

#[test]
fn a_slow_client_does_not_hold_a_stopping_server_past_the_deadline() {
    let mut h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: ONE_SMALL_TYPE.into(),
        timeouts_extra: "api_header_read_seconds = 120\napi_shutdown_seconds = 1".into(),
        ..HarnessOptions::default()
    });
    // A 40 MB log: far more than socket buffers hold, so its download cannot finish while
    // its client does not read.
    let id = h
        .client()
        .submit(&dispatch_cloud::queue::NewContainer {
            command: vec![
                "head".into(),
                "-c".into(),
                "40000000".into(),
                "/dev/zero".into(),
            ],
            priority: 1,
            ..Default::default()
        })
        .expect("submit")
        .id;
    h.wait_for_state(
        &id,
        dispatch_cloud::queue::ContainerState::Complete,
        Duration::from_secs(120),
    );
    let address = h.url.trim_start_matches("http://").to_string();
    let mut download = std::net::TcpStream::connect(&address).expect("connect");
    write!(
        download,
        "GET /containers/{id}/logs/stdout HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        h.token
    )
    .expect("write");
    // The answer has begun: the request is in flight when the stop comes.
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut download, &mut head).expect("status line");
    assert_eq!(&head, b"HTTP/1.1 200");
    // And half a request, never finished.
    let mut slow = std::net::TcpStream::connect(&address).expect("connect");
    slow.write_all(b"GET /_health/ping HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let took = h.terminate(Duration::from_secs(60));
    // Neither the header-read timeout (120 s) nor the download ended it: the deadline (1 s)
    // after the stop did.
    assert!(took < Duration::from_secs(30), "stopped after {took:?}");
    assert!(
        h.log().contains("cutting them off"),
        "the deadline was not what ended it:\n{}",
        h.log()
    );
    drop((download, slow));
}

#[test]
fn clients_find_the_server_by_state_dir_and_token_file_and_ssh_key_prints_the_key() {
    let h = ServeHarness::start("", "");
    let state = h.state_dir();
    let dir = tempfile::tempdir().expect("tmp");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", h.token)).expect("token file");
    // A config that knows neither the state dir nor the token: both come from the flags.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").expect("config");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "--config".to_string(),
            empty.display().to_string(),
            "--state-dir".to_string(),
            state.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&refs)
    };
    let mut ps = vec!["ps".to_string()];
    ps.extend(args(&["--token-file", token_file.to_str().expect("utf8")]));
    let out = run(ps);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token").expect("write");
    let mut ps = vec!["ps".to_string()];
    ps.extend(args(&["--token-file", wrong.to_str().expect("utf8")]));
    let out = run(ps);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("bearer token"),
        "{}",
        text(&out.stderr)
    );

    let mut missing = vec!["ps".to_string()];
    missing.extend(args(&["--token-file", "/nonexistent/token"]));
    let out = run(missing);
    assert!(
        text(&out.stderr).contains("--token-file /nonexistent/token"),
        "{}",
        text(&out.stderr)
    );

    let mut key = vec!["ssh-key".to_string()];
    key.extend(args(&[]));
    let out = run(key);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let private = russh::keys::PrivateKey::read_openssh_file(state.join("ssh_key")).expect("key");
    let public = private.public_key().to_openssh().expect("openssh");
    assert_eq!(printed.trim(), format!("{public} dispatch-cloud"));
}

/// `/_health/ping` needs no token, and fails once the runner deployed to VMs can no longer be
/// read where it was loaded from (as after an upgrade removed it).
#[test]
fn health_fails_when_the_runner_binary_cannot_be_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let copy = dir.path().join("dispatch-cloud");
    std::fs::copy(built("dispatch-cloud"), &copy).expect("copy the host");
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: ONE_SMALL_TYPE.into(),
        deploy: true,
        executable: Some(copy.clone()),
        ..HarnessOptions::default()
    });
    let ping = || match ureq::get(&format!("{}/_health/ping", h.url)).call() {
        Ok(r) => (r.status(), r.into_string().expect("body")),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().expect("body")),
        Err(e) => panic!("ping: {e}"),
    };
    let (status, body) = ping();
    assert_eq!((status, body.as_str()), (200, "{\"health\":\"OK\"}"));
    std::fs::remove_file(&copy).expect("remove the runner");
    let (status, body) = ping();
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["health"], "ERROR");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("runner binary"), "{error}");
    assert!(
        !error.contains(&copy.display().to_string()),
        "no path to an unauthenticated caller: {error}"
    );
    assert!(
        h.log().contains(&copy.display().to_string()),
        "the log names the file"
    );
}
