//! The notify tier: runs a command with the incident JSON on stdin, or
//! POSTs it to an `http://` URL, each with a 10 s limit. The command is an
//! absolute path (config.rs resolves bare names through the trusted PATH)
//! and runs with that PATH, never the agent's.

use std::time::Duration;

use crate::{response::incidents::Incident, sys::programs};

/// Runs the tier's command and/or POST for `inc`; (outcome, detail). A dry
/// run does neither.
pub async fn notify(
    inc: &Incident,
    command: Option<&[String]>,
    url: Option<&str>,
    dry_run: bool,
) -> (&'static str, String) {
    let body = serde_json::to_string(inc).unwrap_or_default();
    if dry_run {
        return ("dry_run", "would notify".into());
    }
    let mut notes = Vec::new();
    let mut failed = false;
    if let Some(cmd) = command {
        match run_hook(cmd, &body).await {
            Ok(()) => notes.push(format!("ran {}", cmd[0])),
            Err(e) => {
                failed = true;
                notes.push(format!("{}: {e}", cmd[0]));
            }
        }
    }
    if let Some(u) = url {
        match post_json(u, &body).await {
            Ok(status) => {
                failed |= !(200..300).contains(&status);
                notes.push(format!("POST {u}: HTTP {status}"));
            }
            Err(e) => {
                failed = true;
                notes.push(format!("POST {u}: {e}"));
            }
        }
    }
    (if failed { "failed" } else { "ok" }, notes.join("; "))
}

/// Runs a notify command with the incident JSON on stdin (10 s limit).
async fn run_hook(cmd: &[String], body: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    // cmd[0] is absolute (resolved at config load); what it runs in turn
    // is found through the trusted PATH too.
    let mut child = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("PATH", programs::TRUSTED_PATH)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body.as_bytes()).await;
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(std::io::Error::other(format!("exited with {st}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("timed out after 10 s")),
    }
}

/// POSTs JSON to an http:// URL (10 s limit); returns the status code.
async fn post_json(url: &str, body: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").ok_or_else(|| std::io::Error::other("only http:// URLs"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let work = async {
        let mut s = tokio::net::TcpStream::connect(host).await?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await?;
        let text = String::from_utf8_lossy(&head[..n]);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("no HTTP status"))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| std::io::Error::other("timed out after 10 s"))?
}
