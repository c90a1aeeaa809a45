//! The session registry of the receiving side: one live session per machine
//! (a reconnect of the same stream supersedes the old session; another stream
//! for a live machine is refused, never merged), the handle the receiver acts
//! on a live session with (inject resync-start), the watchers of each
//! machine's checksum resync, which outlive sessions, and the links a
//! consistency-group coordinator holds to members' sessions (one at a time
//! per machine; the agent's replies are routed to it).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::protocol::{DiskInfo, Frame, ResyncReport, StreamId};

/// Progress of a checksum resync, for whoever started it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum ResyncEvent {
    Progress(ResyncProgress),
    /// The session ended before the resync did; the agent resumes it when it
    /// reconnects, and the events go on.
    Interrupted {
        reason: String,
    },
    Done(ResyncReport),
}

/// What the receiver compared so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ResyncProgress {
    pub regions_compared: u64,
    pub regions_differ: u64,
    pub blocks_compared: u64,
    pub blocks_differ: u64,
}

/// Whoever waits for each machine's checksum resync, with its progress so far.
pub(super) type Watchers =
    std::sync::Mutex<HashMap<String, (mpsc::UnboundedSender<ResyncEvent>, ResyncProgress)>>;

fn watch_event(
    watchers: &Watchers,
    machine: &str,
    f: impl FnOnce(&mut ResyncProgress) -> Option<ResyncEvent>,
) {
    let mut w = watchers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((tx, p)) = w.get_mut(machine) {
        if let Some(ev) = f(p) {
            let done = matches!(ev, ResyncEvent::Done(_));
            if tx.send(ev).is_err() || done {
                w.remove(machine);
            }
        }
    }
}

/// Per machine, where its agent's group replies go (the open [`GroupLink`]).
pub(super) type GroupWaiters = std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>;

/// The handle of a live session the receiver itself can act on.
pub(super) struct SessionCtl {
    pub(super) machine: String,
    pub(super) inject: mpsc::Sender<Frame>,
    pub(super) disks: Vec<DiskInfo>,
    pub(super) watchers: Arc<Watchers>,
    /// The session's negotiated protocol version.
    pub(super) version: u16,
    pub(super) groups: Arc<GroupWaiters>,
}

impl SessionCtl {
    pub(super) fn event(&self, f: impl FnOnce(&mut ResyncProgress) -> Option<ResyncEvent>) {
        watch_event(&self.watchers, &self.machine, f)
    }

    /// Hands a group reply of the agent to the machine's open link (dropped
    /// when none is open: the attempt it answers was given up).
    pub(super) fn group_reply(&self, f: Frame) {
        let g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = g.get(&self.machine) {
            let _ = tx.send(f);
        }
    }
}

/// A group coordinator's line to one member's live session: frames go in
/// (group-prepare, -commit, -release), the agent's replies come out. One per
/// machine at a time; closing it (drop) stops the routing.
pub struct GroupLink {
    machine: String,
    inject: mpsc::Sender<Frame>,
    replies: mpsc::UnboundedReceiver<Frame>,
    reply_tx: mpsc::UnboundedSender<Frame>,
    waiters: Arc<GroupWaiters>,
}

impl GroupLink {
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// Queues `f` for the agent; an error when its session is gone or its
    /// queue is full.
    pub fn send(&self, f: Frame) -> Result<(), String> {
        self.inject
            .try_send(f)
            .map_err(|e| format!("cannot reach the session of {:?}: {e}", self.machine))
    }

    /// The agent's next group reply; `None` never comes while the link is
    /// open (a session that ends just stops replying: bound the wait).
    pub async fn recv(&mut self) -> Option<Frame> {
        self.replies.recv().await
    }
}

impl Drop for GroupLink {
    fn drop(&mut self) {
        let mut g = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if g.get(&self.machine)
            .is_some_and(|tx| tx.same_channel(&self.reply_tx))
        {
            g.remove(&self.machine);
        }
    }
}

struct Slot {
    generation: u64,
    cancel: CancellationToken,
    lock: Arc<Mutex<()>>,
    ctl: Arc<SessionCtl>,
    /// The stream id the live session's hello presented, and its peer.
    stream_id: StreamId,
    peer: String,
}

/// One live session per machine.
#[derive(Default)]
pub struct Sessions {
    slots: std::sync::Mutex<HashMap<String, Slot>>,
    /// When each removed machine was removed (`cut`): a connection
    /// authenticated before that is refused even if its hello comes later.
    removed: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    next_generation: std::sync::atomic::AtomicU64,
    pub(super) watchers: Arc<Watchers>,
    pub(super) groups: Arc<GroupWaiters>,
}

impl Sessions {
    /// The machines with a live session now, with each one's peer.
    pub fn live(&self) -> Vec<(String, String)> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .map(|(m, s)| (m.clone(), s.peer.clone()))
            .collect()
    }

    /// Which session of `machine` is live now (a number that changes with
    /// every new session), if one is.
    pub fn session_of(&self, machine: &str) -> Option<u64> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(machine).map(|s| s.generation)
    }

    /// Ends the machine's live session, if it has one (its machine was
    /// removed: its certificate is revoked, so it cannot come back).
    pub fn cut(&self, machine: &str) -> bool {
        // Recorded first: a connection that claims a slot after this sees it
        // (`removed_since`, checked after the claim), one that claimed
        // before is cancelled below.
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(machine.to_string(), std::time::Instant::now());
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get(machine) {
            Some(s) => {
                s.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether `machine` was removed (`cut`) after `authenticated` (when
    /// its connection's handshake ended).
    pub fn removed_since(&self, machine: &str, authenticated: std::time::Instant) -> bool {
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine)
            .is_some_and(|t| *t >= authenticated)
    }

    /// Opens a group link to the machine's live session: refused by name when
    /// it has none, when its agent speaks a protocol without groups, or when
    /// another group point is using it.
    pub fn group_link(&self, machine: &str) -> Result<GroupLink, String> {
        self.link(
            machine,
            crate::protocol::PROTOCOL_GROUPS,
            "consistency groups",
        )
    }

    /// Opens a link for a planned failover's final point (the same routing as
    /// a group point's, so one of them at a time per machine).
    pub fn final_point_link(&self, machine: &str) -> Result<GroupLink, String> {
        self.link(
            machine,
            crate::protocol::PROTOCOL_FINAL,
            "a planned failover's final point",
        )
    }

    fn link(&self, machine: &str, need: u16, what: &str) -> Result<GroupLink, String> {
        let ctl = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(machine) {
                Some(s) => s.ctl.clone(),
                None => {
                    return Err(format!(
                    "machine {machine:?} has no live session (is its agent running and connected?)"
                ))
                }
            }
        };
        if ctl.version < need {
            return Err(format!(
                "the agent of {machine:?} speaks protocol {}; {what} needs {need} (upgrade that agent)",
                ctl.version,
            ));
        }
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if g.get(machine).is_some_and(|tx| !tx.is_closed()) {
            return Err(format!(
                "machine {machine:?} is taking part in another group point or final point"
            ));
        }
        let (reply_tx, replies) = mpsc::unbounded_channel();
        g.insert(machine.to_string(), reply_tx.clone());
        Ok(GroupLink {
            machine: machine.to_string(),
            inject: ctl.inject.clone(),
            replies,
            reply_tx,
            waiters: self.groups.clone(),
        })
    }

    /// Starts a checksum resync of `disk` (every disk when `None`) in the
    /// machine's live session; returns its events, ending with `Done` (or the
    /// channel closes when the session ends first).
    pub fn start_resync(
        &self,
        machine: &str,
        disk: Option<&str>,
    ) -> Result<mpsc::UnboundedReceiver<ResyncEvent>, String> {
        let ctl = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(machine) {
                Some(s) => s.ctl.clone(),
                None => {
                    return Err(format!(
                    "machine {machine:?} has no live session (is its agent running and connected?)"
                ))
                }
            }
        };
        let disks: Vec<u16> = match disk {
            None => (0..ctl.disks.len() as u16).collect(),
            Some(id) => match ctl.disks.iter().position(|d| d.id == id) {
                Some(i) => vec![i as u16],
                None => {
                    return Err(format!(
                        "machine {machine:?} has no disk {id:?}; its disks: {}",
                        ctl.disks
                            .iter()
                            .map(|d| d.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            },
        };
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if w.get(machine).is_some_and(|(tx, _)| !tx.is_closed()) {
            return Err(format!("a resync of {machine:?} is already running"));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        ctl.inject
            .try_send(Frame::ResyncStart { disks })
            .map_err(|e| format!("cannot reach the session of {machine:?}: {e}"))?;
        w.insert(machine.to_string(), (tx, ResyncProgress::default()));
        Ok(rx)
    }

    /// Tells the machine's resync watcher, if any, that its session ended.
    pub(super) fn interrupted(&self, machine: &str, reason: String) {
        watch_event(&self.watchers, machine, |_| {
            Some(ResyncEvent::Interrupted { reason })
        });
    }

    /// Makes this connection the machine's session and returns its token and
    /// lock. A live session with the same stream id is cancelled (the agent
    /// reconnected; its old connection may not have noticed yet). A live
    /// session with another stream id is kept and this one refused: two
    /// agents present one machine (a cloned VM, or a copied state directory
    /// gone separate ways), and their writes must never be merged. An agent
    /// that really lost its state gets in once its old session ends (the
    /// server's idle timeout bounds that).
    pub(super) fn claim(
        &self,
        machine: &str,
        ctl: Arc<SessionCtl>,
        stream_id: StreamId,
        peer: &str,
    ) -> Result<(u64, CancellationToken, Arc<Mutex<()>>), String> {
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let lock = match slots.get(machine) {
            Some(old) if old.stream_id != stream_id => {
                return Err(format!(
                    "machine {machine} is already connected from {} with stream {}; this connection from {peer} \
                     presents stream {}: two agents claim one machine (a cloned machine or a copied state \
                     directory?). Refusing the second; the two are never merged. Give the clone its own \
                     machine id and certificate",
                    old.peer,
                    crate::hex(&old.stream_id),
                    crate::hex(&stream_id)
                ));
            }
            Some(old) => {
                old.cancel.cancel();
                old.lock.clone()
            }
            None => Arc::new(Mutex::new(())),
        };
        slots.insert(
            machine.to_string(),
            Slot {
                generation,
                cancel: cancel.clone(),
                lock: lock.clone(),
                ctl,
                stream_id,
                peer: peer.to_string(),
            },
        );
        Ok((generation, cancel, lock))
    }

    pub(super) fn release(&self, machine: &str, generation: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.get(machine).map(|s| s.generation) == Some(generation) {
            slots.remove(machine);
        }
    }
}
