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

use crate::{
    actors::registry::{ActorSpec, Caller, ProcReader, RealProc, Registry, RegistryError, Source, read_facts},
    sys::nsview::{self, PidView},
};

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
        Self::with_max(MAX_REQUEST)
    }

    /// A smaller limit lets the fuzz target reach it in short inputs.
    fn with_max(max: usize) -> Self {
        RequestCodec(AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), max))
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
    // SO_PEERCRED: the kernel gives the client's pid in the agent's pid
    // namespace and its uid in the agent's user namespace (root in a user
    // namespace is some other uid here).
    let caller = Caller { pid: cred.pid().map(|p| p as u32).unwrap_or(0), uid: cred.uid() };
    let rights = crate::app::blocking(|| ClientRights::of(caller));
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
        let reply = handle_line_as(&line, caller, &rights, &registry, &RealProc);
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

/// What a client may do beyond its uid, and how it names processes.
pub struct ClientRights {
    /// Its pid namespace: it names, and is told, pids as it sees them, and
    /// processes outside its namespace do not exist for it.
    pub view: PidView,
    /// uid 0 counts as root (kill(2)'s CAP_KILL override) only with
    /// CAP_KILL in the agent's user namespace.
    pub cap_kill: bool,
}

impl ClientRights {
    /// A client in the agent's own namespace with root's rights: what
    /// [`handle_line`] assumes.
    pub const SAME_NAMESPACE: ClientRights = ClientRights { view: PidView::AGENT, cap_kill: true };

    /// Reads the client's namespace and capabilities from /proc. A client
    /// whose /proc entry is unreadable (gone) gets the narrowest view.
    fn of(caller: Caller) -> ClientRights {
        const BLIND: ClientRights = ClientRights { view: PidView::NOTHING, cap_kill: false };
        // One read of its status for both.
        let Some(status) = crate::sys::procinfo::status(caller.pid) else { return BLIND };
        match PidView::of(caller.pid, &status) {
            Some(view) => ClientRights { view, cap_kill: nsview::has_cap_kill_here(caller.pid, &status) },
            None => BLIND,
        }
    }
}

/// One request line → one reply line (with its newline), for a client in
/// the agent's pid namespace.
pub fn handle_line(line: &[u8], caller: Caller, registry: &Mutex<Registry>, proc: &dyn ProcReader) -> String {
    handle_line_as(line, caller, &ClientRights::SAME_NAMESPACE, registry, proc)
}

/// One request line → one reply line, for a client with these rights: pids
/// in the request are the client's and are mapped to the agent's first,
/// pids in the reply are mapped back, and what the client cannot see is
/// left out.
pub fn handle_line_as(
    line: &[u8],
    caller: Caller,
    rights: &ClientRights,
    registry: &Mutex<Registry>,
    proc: &dyn ProcReader,
) -> String {
    match parse(line) {
        Ok((op, mut spec)) => {
            if rights.view.is_nothing() && op != "ping" {
                // Never guess: a pid read in the wrong namespace names
                // another process.
                return error_reply(
                    "client_unreadable",
                    &format!(
                        "sigwake cannot read the client's /proc entry (pid {} as sigwake sees it) to learn its pid \
                         namespace: the client is gone, or sigwake lacks CAP_SYS_PTRACE to read another user's \
                         /proc/PID/ns/pid; grant it (the deploy files do)",
                        caller.pid
                    ),
                );
            }
            if matches!(op.as_str(), "register" | "update" | "deregister") {
                let view = rights.view;
                if let Err(theirs) = crate::app::blocking(|| map_spec_pids(&view, &mut spec)) {
                    let e = RegistryError::NoSuchProcess(theirs);
                    return error_reply(e.code(), &e.to_string());
                }
                let about_itself = spec.pid.is_none_or(|p| p == caller.pid);
                if caller.uid == 0 && !rights.cap_kill && !about_itself {
                    return error_reply(
                        "not_permitted",
                        "uid 0 without CAP_KILL in sigwake's user namespace (a container that dropped it) has no \
                         root rights over other processes here, so it may register only itself; register from the \
                         uid the process runs as, or grant the client CAP_KILL",
                    );
                }
            }
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
            drop(reg);
            match result {
                Ok(v) => {
                    let view = rights.view;
                    let v = if view.is_agents() { v } else { crate::app::blocking(|| map_reply_pids(&view, v)) };
                    format!("{v}\n")
                }
                // The error may name an agent pid; the client named its own.
                Err(e) => error_reply(e.code(), &e.to_string()),
            }
        }
        Err(msg) => error_reply("bad_request", &msg),
    }
}

/// The request's pids (the client's) as the agent's; Err(pid) names one
/// the client cannot see.
fn map_spec_pids(view: &PidView, spec: &mut ActorSpec) -> Result<(), u32> {
    for pid in [&mut spec.pid, &mut spec.parent].into_iter().flatten() {
        *pid = view.to_agent(*pid).ok_or(*pid)?;
    }
    Ok(())
}

/// A reply's actors with the client's pids; actors it cannot see left out.
fn map_reply_pids(view: &PidView, mut v: Value) -> Value {
    let map_actor = |a: &mut Value| -> bool {
        let Some(pid) = a["pid"].as_u64().and_then(|p| view.from_agent(p as u32)) else { return false };
        a["pid"] = json!(pid);
        if let Some(parent) = a["parent_pid"].as_u64() {
            a["parent_pid"] = json!(view.from_agent(parent as u32));
        }
        true
    };
    if let Some(actor) = v.get_mut("actor")
        && !map_actor(actor)
    {
        v["actor"] = Value::Null;
    }
    if let Some(Value::Array(actors)) = v.get_mut("actors") {
        actors.retain_mut(map_actor);
    }
    v
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

    /// A client whose namespace the agent could not read is refused, never
    /// served as if it were in the agent's (a pid read in the wrong
    /// namespace names another process).
    #[test]
    fn a_client_whose_namespace_is_unreadable_is_refused() {
        let (r, p, _) = registry();
        let r = Mutex::new(r);
        let me = Caller { pid: 500, uid: 1000 };
        let blind = ClientRights { view: PidView::NOTHING, cap_kill: false };
        for line in [r#"{"op":"register","name":"x"}"#, r#"{"op":"list"}"#, r#"{"op":"deregister"}"#] {
            let v: Value = serde_json::from_str(&handle_line_as(line.as_bytes(), me, &blind, &r, &p)).unwrap();
            assert_eq!(
                (v["ok"].as_bool(), v["code"].as_str()),
                (Some(false), Some("client_unreadable")),
                "{line}: {v}"
            );
        }
        let v: Value = serde_json::from_str(&handle_line_as(br#"{"op":"ping"}"#, me, &blind, &r, &p)).unwrap();
        assert_eq!(v["ok"], true);
        assert!(crate::lock(&r).get(500).is_none(), "nothing registered");
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

/// Fuzz targets of the registration protocol (property tests, stable
/// toolchain): any line gets exactly one JSON reply line and never a
/// panic; the framing cuts a byte stream into the same requests however
/// it arrives, and enforces the size limit. `cargo xtask test` runs these
/// with many more cases (PROPTEST_CASES).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::actors::registry::tests::{FakeProc, registry};

    /// A JSON value of the kinds a field could be given.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (0u64..2000).prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,20}".prop_map(Value::from),
            prop_oneof![Just("trio"), Just("asyncio"), Just("other"), Just("default"), Just("")].prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A request object: a real op (mostly), real field names (mostly)
    /// with values of any type.
    fn request() -> impl Strategy<Value = Vec<u8>> {
        let op = prop_oneof![
            4 => prop_oneof![Just("register"), Just("update"), Just("deregister"), Just("list"), Just("ping")]
                .prop_map(Value::from),
            1 => value(),
        ];
        let field = prop_oneof![
            Just("pid"),
            Just("name"),
            Just("runtime"),
            Just("parent"),
            Just("policy"),
            Just("labels"),
            Just("wakeup_fd"),
            Just("bogus"),
        ];
        (op, proptest::collection::vec((field, value()), 0..5)).prop_map(|(op, fields)| {
            let mut o = serde_json::Map::new();
            o.insert("op".into(), op);
            for (k, v) in fields {
                o.insert(k.into(), v);
            }
            Value::Object(o).to_string().into_bytes()
        })
    }

    fn registry_with_processes() -> (Mutex<Registry>, FakeProc) {
        let (r, p, _) = registry();
        p.add(500, 7, 1000, 1);
        p.add(501, 8, 1000, 500);
        p.add(600, 9, 0, 1);
        (Mutex::new(r), p)
    }

    fn check_reply(reply: &str) -> Result<Value, TestCaseError> {
        prop_assert!(reply.ends_with('\n') && reply.matches('\n').count() == 1, "one line: {reply:?}");
        let v: Value = serde_json::from_str(reply).map_err(|e| TestCaseError::fail(format!("{e}: {reply}")))?;
        prop_assert!(v["ok"].is_boolean(), "{v}");
        if v["ok"] == false {
            prop_assert!(v["code"].is_string() && v["error"].is_string(), "{v}");
        }
        Ok(v)
    }

    proptest! {
        #[test]
        fn fuzz_handle_line_any_bytes_get_one_reply_line(line in proptest::collection::vec(any::<u8>(), 0..256)) {
            let (r, p) = registry_with_processes();
            let v = check_reply(&handle_line(&line, Caller { pid: 500, uid: 1000 }, &r, &p))?;
            prop_assert!(v["ok"] == false || serde_json::from_slice::<Value>(&line).is_ok(), "{v}");
        }

        /// A sequence of requests from a user and from root: each gets a
        /// reply, and the user never ends up owning a process it could not
        /// signal (root's pid 600).
        #[test]
        fn fuzz_handle_line_request_sequences(reqs in proptest::collection::vec((request(), any::<bool>()), 1..12)) {
            let (r, p) = registry_with_processes();
            let user = Caller { pid: 500, uid: 1000 };
            let root = Caller { pid: 600, uid: 0 };
            for (line, as_root) in &reqs {
                let caller = if *as_root { root } else { user };
                let v = check_reply(&handle_line(line, caller, &r, &p))?;
                if !*as_root && v["ok"] == true && v["actor"].is_object() {
                    prop_assert_ne!(&v["actor"]["pid"], &Value::from(600), "a user registered root's process: {}", v);
                }
            }
            let list = check_reply(&handle_line(br#"{"op":"list"}"#, root, &r, &p))?;
            prop_assert!(list["actors"].is_array(), "{list}");
        }

        /// However a byte stream is cut into reads, the codec yields the
        /// same requests: each a complete line without its newline, within
        /// the limit; a longer line is an error, and bytes after the last
        /// newline are no request.
        #[test]
        fn fuzz_framing_is_independent_of_how_the_stream_arrives(
            stream in proptest::collection::vec(prop_oneof![8 => any::<u8>(), 2 => Just(b'\n')], 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..8),
            max in 1usize..24,
        ) {
            let frames = |chunks: &[&[u8]]| -> (Vec<Vec<u8>>, bool) {
                let mut codec = RequestCodec::with_max(max);
                let mut buf = BytesMut::new();
                let mut out = Vec::new();
                for (i, chunk) in chunks.iter().enumerate() {
                    buf.extend_from_slice(chunk);
                    let last = i + 1 == chunks.len();
                    loop {
                        let next = if last { codec.decode_eof(&mut buf) } else { codec.decode(&mut buf) };
                        match next {
                            Ok(Some(f)) => out.push(f.to_vec()),
                            Ok(None) => break,
                            Err(_) => return (out, true),
                        }
                    }
                }
                (out, false)
            };
            let mut at: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            at.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for c in at.into_iter().chain([stream.len()]) {
                chunks.push(&stream[prev..c]);
                prev = c;
            }
            let (whole, whole_err) = frames(&[&stream]);
            let (cut, cut_err) = frames(&chunks);
            // The reference: complete lines, up to the first one too long.
            let mut want = Vec::new();
            let mut too_long = false;
            let complete = stream.iter().rposition(|&b| b == b'\n').map_or(&stream[..0], |i| &stream[..i]);
            if stream.contains(&b'\n') {
                for line in complete.split(|&b| b == b'\n') {
                    if line.len() > max {
                        too_long = true;
                        break;
                    }
                    want.push(line.to_vec());
                }
            }
            let tail = stream.iter().rposition(|&b| b == b'\n').map_or(&stream[..], |i| &stream[i + 1..]);
            too_long |= !too_long && tail.len() > max;
            prop_assert_eq!(&whole, &want);
            prop_assert_eq!(whole_err, too_long);
            prop_assert_eq!(&cut, &want, "cut at other places");
            prop_assert_eq!(cut_err, too_long);
        }
    }
}
