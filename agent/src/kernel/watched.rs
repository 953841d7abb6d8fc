//! The kernel's watched-process map (WATCHED_PIDS), written by one thread.
//!
//! The registry decides who is watched, under its lock; a map update is a
//! bpf(2) syscall, which must not run under that lock. So the registry only
//! queues the change (no I/O) and this thread applies the changes in the
//! order they were made.

use std::sync::mpsc;

use aya::maps::{HashMap, MapData};

enum Change {
    Watch(u32),
    Unwatch(u32),
}

/// A handle that queues changes for the map's thread; cheap to clone.
#[derive(Clone)]
pub struct WatchedPids {
    tx: mpsc::Sender<Change>,
}

impl WatchedPids {
    /// Starts the thread that owns the map. It ends when every handle is
    /// dropped.
    pub fn spawn(mut map: HashMap<MapData, u32, u32>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("sigwake-watched".into()).spawn(move || {
            for change in rx {
                match change {
                    Change::Watch(pid) => {
                        if let Err(e) = map.insert(pid, 0, 0) {
                            tracing::warn!("cannot add pid {pid} to the kernel's watched set: {e}");
                        }
                    }
                    Change::Unwatch(pid) => {
                        let _ = map.remove(&pid);
                    }
                }
            }
        })?;
        Ok(WatchedPids { tx })
    }

    pub fn watch(&self, pid: u32) {
        let _ = self.tx.send(Change::Watch(pid));
    }

    pub fn unwatch(&self, pid: u32) {
        let _ = self.tx.send(Change::Unwatch(pid));
    }
}
