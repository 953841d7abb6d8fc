//! Registration socket: line-delimited JSON over a Unix socket
//! (docs/CONTRACTS.md). Each client is authorised by SO_PEERCRED and may
//! act only on processes it could signal itself.
//!
//! A client can never block or crash the agent: requests are size- and
//! time-limited, the number of clients is capped, and each connection is
//! its own task that touches the registry only under a short lock.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream, unix::UCred},
    sync::Semaphore,
};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, FramedRead};

use crate::actors::registry::{ActorSpec, Caller, ProcReader, RealProc, Registry, RegistryError, Source, read_facts};

pub const MAX_REQUEST: usize = 64 * 1024;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CLIENTS: usize = 256;
/// Connections one non-root uid may hold at once, so one user cannot take
/// every slot.
pub const MAX_CLIENTS_PER_UID: usize = 32;

/// Removes the socket file when the agent stops.
pub struct SocketGuard(PathBuf);
impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the socket, refusing to take over one a running agent serves.
pub async fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketGuard)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another sigwake agent is serving {}; stop it, or give this one another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Any local user may connect; what each may do is decided per request
    // from its SO_PEERCRED credentials.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("setting permissions on {}", path.display()))?;
    Ok((listener, SocketGuard(path.to_path_buf())))
}

fn release(per_uid: &Mutex<HashMap<u32, usize>>, uid: u32) {
    let mut counts = crate::lock(per_uid);
    if let Some(n) = counts.get_mut(&uid) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&uid);
        }
    }
}

pub async fn serve(listener: UnixListener, registry: Arc<Mutex<Registry>>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let per_uid: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // No credentials, no service: authorisation rests on them.
        let Ok(cred) = stream.peer_cred() else { continue };
        let uid = cred.uid();
        let per_uid_ok = uid == 0 || {
            let mut counts = crate::lock(&per_uid);
            let n = counts.entry(uid).or_insert(0);
            if *n < MAX_CLIENTS_PER_UID {
                *n += 1;
                true
            } else {
                false
            }
        };
        let permit = if per_uid_ok { slots.clone().try_acquire_owned().ok() } else { None };
        let Some(permit) = permit else {
            if per_uid_ok && uid != 0 {
                release(&per_uid, uid);
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), async {
                let line = error_reply(
                    "busy",
                    &format!("the agent serves at most {MAX_CLIENTS} clients at once ({MAX_CLIENTS_PER_UID} per user); retry later"),
                );
                stream.write_all(line.as_bytes()).await
            })
            .await;
            continue;
        };
        let registry = registry.clone();
        let per_uid = per_uid.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = client(stream, cred, registry).await {
                tracing::debug!("registration client: {e}");
            }
            if uid != 0 {
                release(&per_uid, uid);
            }
        });
    }
}

fn error_reply(code: &str, message: &str) -> String {
    format!("{}\n", json!({"ok": false, "code": code, "error": message}))
}

/// Requests are newline-terminated lines of at most [`MAX_REQUEST`] bytes,
/// framed on a `BytesMut` by tokio-util's delimiter codec, which enforces
/// the limit. Unlike that codec, bytes left without a newline at
/// end-of-stream are no request: a line is only complete with its newline.
struct RequestCodec(AnyDelimiterCodec);

impl RequestCodec {
    fn new() -> Self {
        RequestCodec(AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_REQUEST))
    }
}

impl Decoder for RequestCodec {
    type Item = Bytes;
    type Error = AnyDelimiterCodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Self::Error> {
        self.0.decode(buf)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Self::Error> {
        self.0.decode(buf)
    }
}

async fn client(stream: UnixStream, cred: UCred, registry: Arc<Mutex<Registry>>) -> std::io::Result<()> {
    let caller = Caller { pid: cred.pid().map(|p| p as u32).unwrap_or(0), uid: cred.uid() };
    let (read, mut write) = stream.into_split();
    let mut requests = FramedRead::new(read, RequestCodec::new());
    // A request must be complete within IDLE_TIMEOUT of the previous reply
    // (or of connecting): trickling one byte at a time does not hold a slot
    // forever.
    loop {
        let deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
        let line = match tokio::time::timeout_at(deadline, requests.next()).await {
            Err(_) => {
                let reply = error_reply("timeout", &format!("no complete request within {IDLE_TIMEOUT:?}"));
                let _ = write.write_all(reply.as_bytes()).await;
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Ok(Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded))) => {
                let stream = requests.into_inner().reunite(write).map_err(std::io::Error::other)?;
                return refuse(stream, "too_large", &format!("requests are limited to {MAX_REQUEST} bytes")).await;
            }
            Ok(Some(Err(AnyDelimiterCodecError::Io(e)))) => return Err(e),
            Ok(Some(Ok(line))) => line,
        };
        let reply = handle_line(&line, caller, &registry, &RealProc);
        tokio::time::timeout(IDLE_TIMEOUT, write.write_all(reply.as_bytes()))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client not reading"))??;
    }
}

/// Replies with an error and closes, after letting the client finish
/// sending (up to 250 ms and 1 MiB: a local client that wrote its line is
/// done long before), so that it can read the reply instead of failing its
/// write on a closed socket. Short, because it holds a client slot.
async fn refuse(mut stream: UnixStream, code: &str, message: &str) -> std::io::Result<()> {
    let _ = stream.write_all(error_reply(code, message).as_bytes()).await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 16 * 1024];
    let mut left: usize = 1 << 20;
    let _ = tokio::time::timeout(Duration::from_millis(250), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// One request line → one reply line (with its newline).
pub fn handle_line(line: &[u8], caller: Caller, registry: &Mutex<Registry>, proc: &dyn ProcReader) -> String {
    match parse(line) {
        Ok((op, spec)) => {
            // /proc first, then the registry: its lock is never held across I/O.
            let facts = match op.as_str() {
                "register" | "update" => crate::app::blocking(|| read_facts(proc, &spec, Some(caller))),
                _ => None,
            };
            let mut reg = crate::lock(registry);
            let result: Result<Value, RegistryError> = match op.as_str() {
                "ping" => Ok(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")})),
                "register" => {
                    reg.upsert(&spec, Source::Socket, Some(caller), facts).map(|a| json!({"ok": true, "actor": a}))
                }
                "update" => reg.update(&spec, caller, facts).map(|a| json!({"ok": true, "actor": a})),
                "deregister" => reg.deregister(spec.pid.unwrap_or(caller.pid), caller).map(|()| json!({"ok": true})),
                "list" => Ok(json!({"ok": true, "actors": reg.visible_to(caller)})),
                other => Err(RegistryError::Invalid(format!(
                    "unknown op `{other}`; expected register, update, deregister, list or ping"
                ))),
            };
            match result {
                Ok(v) => format!("{v}\n"),
                Err(e) => error_reply(e.code(), &e.to_string()),
            }
        }
        Err(msg) => error_reply("bad_request", &msg),
    }
}

fn parse(line: &[u8]) -> Result<(String, ActorSpec), String> {
    let mut v: Value = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v.as_object_mut().ok_or("a request is a JSON object")?;
    let op = match obj.remove("op") {
        Some(Value::String(s)) => s,
        _ => return Err("missing string field `op`".into()),
    };
    let spec: ActorSpec = serde_json::from_value(v).map_err(|e| format!("bad fields for `{op}`: {e}"))?;
    Ok((op, spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::registry::tests::{FakeProc, registry};

    fn call(r: &Mutex<Registry>, p: &FakeProc, caller: Caller, line: &str) -> Value {
        serde_json::from_str(&handle_line(line.as_bytes(), caller, r, p)).unwrap()
    }

    #[test]
    fn register_list_deregister_round_trip() {
        let (r, p, _) = registry();
        p.add(500, 7, 1000, 1);
        let r = Mutex::new(r);
        let me = Caller { pid: 500, uid: 1000 };
        let v = call(&r, &p, me, r#"{"op":"register","name":"fetcher","runtime":"trio","labels":{"team":"a"}}"#);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["actor"]["pid"], 500);
        assert_eq!(v["actor"]["runtime"], "trio");
        assert_eq!(v["actor"]["state"], "healthy");
        assert_eq!(call(&r, &p, me, r#"{"op":"list"}"#)["actors"][0]["name"], "fetcher");
        assert_eq!(call(&r, &p, me, r#"{"op":"deregister"}"#)["ok"], true);
        assert_eq!(call(&r, &p, me, r#"{"op":"deregister"}"#)["code"], "not_registered");
    }

    #[test]
    fn garbage_gets_a_bad_request_reply() {
        let (r, p, _) = registry();
        let r = Mutex::new(r);
        let me = Caller { pid: 1, uid: 0 };
        for line in [
            "",
            "{",
            "[]",
            "42",
            r#"{"op":7}"#,
            r#"{"op":"explode"}"#,
            r#"{"op":"register","pid":"x"}"#,
            r#"{"op":"register","bogus":1}"#,
        ] {
            let v = call(&r, &p, me, line);
            assert_eq!(v["ok"], false, "{line}: {v}");
            assert_eq!(v["code"], "bad_request", "{line}: {v}");
        }
        let v = handle_line(&[0xff, 0xfe, b'{'], me, &r, &p);
        assert!(v.contains("bad_request"));
    }
}
