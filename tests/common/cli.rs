//! Running the `kausal` binary as an operator would, and free ports for its endpoints.
#![allow(dead_code)]

/// Runs `kausal <args>`; returns exit code, stdout, stderr.
pub fn kausal(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("run kausal");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kausal status --json` over `configs`.
pub fn status(configs: &[&std::path::Path]) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    for c in configs {
        args.push("--config");
        args.push(c.to_str().unwrap());
    }
    let (_, out, err) = kausal(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out} {err}"))
}

/// Polls `kausal status` until `ok` holds (up to `secs`), returning the last report.
pub async fn status_until(
    configs: &[&std::path::Path],
    secs: u64,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..secs * 4 {
        last = status(configs);
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    panic!("status never got there in {secs} s: {last:#}");
}

/// A TCP port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
