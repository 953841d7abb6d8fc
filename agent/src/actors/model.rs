//! The actor model: what the registry stores about a supervised process
//! and what clients and selectors may ask for.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The event loop behind an actor's wakeup fd: recognised by discovery
/// (`actors/discovery.rs` `guess_runtime`, from evidence measured on each
/// real runtime), given at registration or by a selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    Trio,
    Asyncio,
    /// uvloop: asyncio's API on libuv; its wakeup socketpair is read like
    /// asyncio's, one callback per byte.
    Uvloop,
    /// tornado ≥ 5 on asyncio: asyncio's self-pipe and semantics.
    Tornado,
    /// A Twisted reactor: its waker pipe only wakes the reactor; the
    /// Python-level handler runs once the main thread runs.
    Twisted,
    /// tokio's signal driver: one byte `sendto` on a socketpair; a full
    /// socket coalesces (every pending signal is flagged apart from it).
    Tokio,
    /// libuv (Node.js): its handler writes a 16-byte message per signal to
    /// the loop's signal pipe; the loop runs one callback per message.
    Libuv,
    /// A self-pipe loop nothing else identifies (a hand-rolled `select`
    /// loop on a pipe, an unknown program).
    SelfPipe,
    /// The handler adds to an eventfd (GLib and the like): a counter that
    /// does not overflow, so its wakeup cannot be lost.
    Eventfd,
    Other,
    Unknown,
}

/// What a failed wakeup write (its fd full) means for a runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropMeaning {
    /// The signal still reaches the program once its main thread runs
    /// (CPython's `tripped` flag is set before the byte is written): trio,
    /// Twisted, a plain Python self-pipe loop.
    Delayed,
    /// The byte (or message) was the callback: it never runs (asyncio,
    /// uvloop, tornado, libuv).
    Lost,
    /// Nothing is lost: the runtime flags each signal apart from the byte,
    /// which only wakes the loop (tokio).
    Coalesced,
    /// The wakeup fd cannot fill (an eventfd counter).
    CannotOverflow,
    /// Not known.
    Unknown,
}

impl Runtime {
    pub const ALL: [Runtime; 11] = [
        Self::Trio,
        Self::Asyncio,
        Self::Uvloop,
        Self::Tornado,
        Self::Twisted,
        Self::Tokio,
        Self::Libuv,
        Self::SelfPipe,
        Self::Eventfd,
        Self::Other,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trio => "trio",
            Self::Asyncio => "asyncio",
            Self::Uvloop => "uvloop",
            Self::Tornado => "tornado",
            Self::Twisted => "twisted",
            Self::Tokio => "tokio",
            Self::Libuv => "libuv",
            Self::SelfPipe => "self_pipe",
            Self::Eventfd => "eventfd",
            Self::Other => "other",
            Self::Unknown => "unknown",
        }
    }

    pub fn drop_meaning(self) -> DropMeaning {
        match self {
            Self::Trio | Self::Twisted => DropMeaning::Delayed,
            Self::Asyncio | Self::Uvloop | Self::Tornado | Self::Libuv => DropMeaning::Lost,
            Self::Tokio => DropMeaning::Coalesced,
            Self::Eventfd => DropMeaning::CannotOverflow,
            Self::SelfPipe | Self::Other | Self::Unknown => DropMeaning::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorState {
    Healthy,
    /// A wakeup write failed; waiting to see whether the loop runs again.
    DroppedWakeup,
    /// Confirmed: the loop did not run within the confirm window.
    Starving,
    Escalating,
    Exited,
    /// Escalation finished the actor; kept for the record until it expires.
    Dead,
}

impl ActorState {
    pub const ALL: [ActorState; 6] =
        [Self::Healthy, Self::DroppedWakeup, Self::Starving, Self::Escalating, Self::Exited, Self::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::DroppedWakeup => "dropped_wakeup",
            Self::Starving => "starving",
            Self::Escalating => "escalating",
            Self::Exited => "exited",
            Self::Dead => "dead",
        }
    }

    pub fn is_live(self) -> bool {
        !matches!(self, Self::Exited | Self::Dead)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Socket,
    Selector,
    Tractor,
    Discovered,
}

impl Source {
    /// A stronger source may rename or re-policy an actor a weaker one made.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Self::Discovered => 0,
            Self::Tractor => 1,
            Self::Selector => 2,
            Self::Socket => 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DropRecord {
    pub time: String,
    pub mono_ns: u64,
    pub signal: String,
    pub fd: i32,
    pub errno: i32,
}

pub(crate) const RECENT_DROPS: usize = 16;

#[derive(Clone, Debug, Serialize)]
pub struct Actor {
    pub name: String,
    pub pid: u32,
    /// Clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    pub uid: u32,
    pub runtime: Runtime,
    /// Name of the parent actor, if it is one.
    pub parent: Option<String>,
    pub parent_pid: Option<u32>,
    /// Escalation policy; `None`: observe only.
    pub policy: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Learned from the handler's writes, or given at registration.
    pub wakeup_fd: Option<i32>,
    pub source: Source,
    /// uid of the socket client that registered it.
    #[serde(skip)]
    pub registered_by: Option<u32>,
    pub state: ActorState,
    pub first_seen: String,
    pub last_seen: String,
    #[serde(skip)]
    pub last_seen_mono: u64,
    pub drops: u64,
    pub recent_drops: VecDeque<DropRecord>,
}

/// What a client (or a selector) asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSpec {
    pub pid: Option<u32>,
    pub name: Option<String>,
    pub runtime: Option<Runtime>,
    pub parent: Option<u32>,
    pub policy: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub wakeup_fd: Option<i32>,
}

impl ActorSpec {
    /// The process the spec is about: its pid, else the caller's own.
    pub fn target_pid(&self, caller: Option<Caller>) -> Option<u32> {
        self.pid.or(caller.map(|c| c.pid))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// The pid does not exist (or exited while being registered).
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    /// The caller could not signal that process itself.
    #[error("uid {caller_uid} may not act on pid {pid}: only its owner or root may register it")]
    NotPermitted { pid: u32, caller_uid: u32 },
    /// Another client registered that process.
    #[error("pid {pid} is already registered as `{name}` by another client")]
    AlreadyRegistered { pid: u32, name: String },
    /// Update or deregister of a process nobody registered.
    #[error("pid {0} is not registered")]
    NotRegistered(u32),
    /// A field is out of bounds.
    #[error("{0}")]
    Invalid(String),
    /// The registry is full.
    #[error("the registry holds its maximum of {0} actors")]
    Full(usize),
}

impl RegistryError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoSuchProcess(_) => "no_such_process",
            Self::NotPermitted { .. } => "not_permitted",
            Self::AlreadyRegistered { .. } => "already_registered",
            Self::NotRegistered(_) => "not_registered",
            Self::Invalid(_) => "bad_request",
            Self::Full(_) => "busy",
        }
    }
}
