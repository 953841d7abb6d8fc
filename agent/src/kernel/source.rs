//! Event source: drains the kernel ring buffer and hands decoded batches to
//! the pipeline over a bounded channel.
//!
//! [`EventSource`] is the seam: the agent runs on [`RingSource`]; tests
//! wire the same pipeline to a [`FakeSource`] of hand-made batches. When the pipeline falls behind, the reader waits, the ring
//! buffer fills, and the kernel counts what it could not reserve; nothing
//! is dropped silently.

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

use crate::kernel::events::{DecodeError, Event};

pub type Batch = Vec<Result<Event, DecodeError>>;

/// Where the pipeline's batches come from.
pub trait EventSource {
    /// Starts delivering; the channel closes when the source is done.
    fn start(self) -> std::io::Result<mpsc::Receiver<Batch>>;
}

/// The kernel's ring buffer, after the self-test's backlog.
pub struct RingSource {
    pub ring: RingBuf<MapData>,
    pub backlog: Vec<Event>,
}

impl EventSource for RingSource {
    fn start(self) -> std::io::Result<mpsc::Receiver<Batch>> {
        // The reader task ends when the receiver is dropped.
        spawn_ringbuf_reader(self.ring, self.backlog).map(|(rx, _task)| rx)
    }
}

/// Batches given up front, then closed: for tests of the wiring.
pub struct FakeSource(pub Vec<Batch>);

impl EventSource for FakeSource {
    fn start(self) -> std::io::Result<mpsc::Receiver<Batch>> {
        let (tx, rx) = mpsc::channel(self.0.len().max(1));
        for batch in self.0 {
            tx.try_send(batch).expect("channel sized for every batch");
        }
        Ok(rx)
    }
}

/// Upper bound on records per batch, so one burst cannot starve the
/// consumer of a chance to run between batches.
const MAX_BATCH: usize = 4096;

/// Spawns the reader; the task ends when the receiver is dropped.
/// `backlog` (events read before, by the start-up self-test) is the first
/// batch.
pub fn spawn_ringbuf_reader(
    ring: RingBuf<MapData>,
    backlog: Vec<Event>,
) -> std::io::Result<(mpsc::Receiver<Batch>, JoinHandle<()>)> {
    let mut fd = // SAFETY: the map's fd is owned by `ring`, which the AsyncFd owns and
    // never replaces, so it stays open and the same for the AsyncFd's life.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    let (tx, rx) = mpsc::channel::<Batch>(256);
    let task = tokio::spawn(async move {
        if !backlog.is_empty() && tx.send(backlog.into_iter().map(Ok).collect()).await.is_err() {
            return;
        }
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("event ring buffer poll failed: {e}; no more kernel events");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                batch.push(Event::try_from(&*item));
                if batch.len() >= MAX_BATCH {
                    break;
                }
            }
            if batch.len() < MAX_BATCH {
                guard.clear_ready();
            }
            drop(guard);
            if !batch.is_empty() && tx.send(batch).await.is_err() {
                return;
            }
        }
    });
    Ok((rx, task))
}
