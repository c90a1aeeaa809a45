//! The sequencing and acknowledgement logic of a replication session, as plain
//! structs with no I/O and no clock (tested with two endpoints in one process).
//!
//! Positions, all monotonic:
//! - sender (agent): `captured ≥ sent ≥ acked`. Entries with `seq > acked` stay
//!   queued; a reconnect rewinds `sent` to the receiver's `durable`.
//! - receiver: `received ≥ durable`. Entries with `seq ≤ received` are duplicates
//!   and are dropped (exactly-once apply); the first new entry must be
//!   `received + 1` and the rest consecutive.
//!
//! Memory: the sender keeps at most `memory_max` bytes of queued entries in
//! memory ([`SenderState::with_memory_limit`]); a write captured beyond it is
//! queued by its seq and length only (spilled), and [`SenderState::poll_transmit_upto`]
//! hands out the seq range for the caller to read back from where it keeps every
//! entry anyway (the agent's journal). Tags always stay (a rebase reports them).

use std::collections::VecDeque;

use thiserror::Error;

use crate::protocol::{self, Entry, Frame, Hello, Op, PROTOCOL_MAX, PROTOCOL_MIN};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("peer acknowledged seq {ack}, beyond what was sent ({sent})")]
    AckBeyondSent { ack: u64, sent: u64 },
    #[error("peer's acknowledged position went backwards: {ack} < {acked}")]
    AckBackwards { ack: u64, acked: u64 },
    #[error("gap in the write stream: expected seq {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("the receiver holds another numbering of this machine's stream (stream id {theirs}, ours {ours}); the agent must rebase on the receiver's position before it sends entries")]
    StreamMismatch { ours: String, theirs: String },
    #[error("unexpected {0} frame in this state")]
    Unexpected(&'static str),
    #[error("no common protocol version: peer speaks {min}..={max}, we speak {PROTOCOL_MIN}..={PROTOCOL_MAX}")]
    Version { min: u16, max: u16 },
}

/// What a welcome means for the sender ([`SenderState::on_welcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    /// The numbering is this sender's: send from `after + 1`.
    Resume { after: u64 },
    /// One side lost state: rebase on the receiver's durable position.
    LostState(LostState),
}

/// How the two sides' streams fail to match.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LostState {
    /// Another numbering: this agent's state was lost or replaced.
    #[error("the process server holds another numbering of this machine's stream (stream id {}, ours {}): this agent's state was lost or replaced", crate::hex(theirs), crate::hex(ours))]
    OtherNumbering {
        ours: protocol::StreamId,
        theirs: protocol::StreamId,
    },
    /// The receiver holds less than it acknowledged (rebuilt without its cache).
    #[error("the process server holds seqs up to {durable} but had acknowledged {acked}: it lost acknowledged data (rebuilt without its cache?)")]
    ReceiverLostAcked { durable: u64, acked: u64 },
    /// The receiver holds seqs this agent cannot vouch for.
    #[error("the process server holds seqs up to {durable}, beyond the {owned} this agent's journal kept: the journal lost its tail")]
    JournalLostTail { durable: u64, owned: u64 },
}

/// A queued entry: in memory, or only its place (its data is in the journal).
#[derive(Debug, Clone)]
enum Queued {
    Held(Entry),
    Spilled { seq: u64, len: usize },
}

impl Queued {
    fn seq(&self) -> u64 {
        match self {
            Queued::Held(e) => e.seq,
            Queued::Spilled { seq, .. } => *seq,
        }
    }
    fn len(&self) -> usize {
        match self {
            Queued::Held(e) => e.encoded_len(),
            Queued::Spilled { len, .. } => *len,
        }
    }
}

/// What [`SenderState::poll_transmit_upto`] hands out, in seq order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Frame(Frame),
    /// Writes `first..=last`, spilled: read them back and send them as one
    /// `Frame::Writes`. `bytes`: their encoded length.
    Spilled {
        first: u64,
        last: u64,
        bytes: usize,
    },
}

/// The agent's side: a queue of captured entries not yet acknowledged.
#[derive(Debug)]
pub struct SenderState {
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// Bytes of the entries held in memory, at most `memory_max` (see the header).
    held_bytes: usize,
    /// Spilled entries queued: while there are any, new entries spill too, so
    /// that spilled runs stay contiguous and are read back sequentially.
    spilled: usize,
    memory_max: usize,
    captured: u64,
    sent: u64,
    acked: u64,
    /// Every seq up to here is this sender's own: restored from its journal at
    /// start or sent since. A receiver durable beyond it holds seqs this sender
    /// cannot vouch for (its state was lost), whatever it captured meanwhile.
    owned: u64,
}

impl Default for SenderState {
    fn default() -> Self {
        SenderState {
            queue: VecDeque::new(),
            queued_bytes: 0,
            held_bytes: 0,
            spilled: 0,
            memory_max: usize::MAX,
            captured: 0,
            sent: 0,
            acked: 0,
            owned: 0,
        }
    }
}

impl SenderState {
    #[cfg(test)]
    fn clone_for_test(&self) -> SenderState {
        SenderState {
            queue: self.queue.clone(),
            queued_bytes: self.queued_bytes,
            held_bytes: self.held_bytes,
            spilled: self.spilled,
            memory_max: self.memory_max,
            captured: self.captured,
            sent: self.sent,
            acked: self.acked,
            owned: self.owned,
        }
    }

    /// Starts after `acked` (everything up to it is known durable at the receiver).
    pub fn new(acked: u64) -> Self {
        SenderState {
            captured: acked,
            sent: acked,
            acked,
            owned: acked,
            ..Default::default()
        }
    }

    /// Like [`Self::new`], keeping at most `memory_max` bytes of entries in
    /// memory, tags aside: entries beyond it are spilled (see the header); the caller must
    /// be able to read every queued entry back.
    pub fn with_memory_limit(acked: u64, memory_max: usize) -> Self {
        SenderState {
            memory_max,
            ..Self::new(acked)
        }
    }

    /// Whether [`Self::push`] would keep `entry` in memory now (tags always;
    /// others while nothing is spilled and the limit allows).
    pub fn would_hold(&self, entry: &Entry) -> bool {
        matches!(entry.op, Op::Tag { .. })
            || (self.spilled == 0 && self.held_bytes + entry.encoded_len() <= self.memory_max)
    }

    /// Bytes of queued entries held in memory (at most the memory limit).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// See the field: the highest seq known to be this sender's own.
    pub fn owned(&self) -> u64 {
        self.owned
    }

    /// Entries up to `seq` are this sender's own (replayed from its journal).
    pub fn own_upto(&mut self, seq: u64) {
        self.owned = self.owned.max(seq);
    }

    pub fn captured(&self) -> u64 {
        self.captured
    }
    pub fn sent(&self) -> u64 {
        self.sent
    }
    pub fn acked(&self) -> u64 {
        self.acked
    }
    /// Encoded bytes of entries captured but not yet acknowledged.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The seq the next captured entry must take.
    pub fn next_seq(&self) -> u64 {
        self.captured + 1
    }

    /// Queues an entry; its seq must be [`Self::next_seq`].
    pub fn push(&mut self, entry: Entry) {
        debug_assert_eq!(entry.seq, self.captured + 1, "seqs are assigned in order");
        self.captured = entry.seq;
        let len = entry.encoded_len();
        self.queued_bytes += len;
        if !self.would_hold(&entry) {
            self.spilled += 1;
            self.queue.push_back(Queued::Spilled {
                seq: entry.seq,
                len,
            });
        } else {
            self.held_bytes += len;
            self.queue.push_back(Queued::Held(entry));
        }
    }

    /// Judges a welcome — the receiver's stream id and where its durable
    /// stream ends — against this sender's numbering (`ours`): either the
    /// session resumes after `durable` (applied here), or one side lost state
    /// and the agent must rebase (nothing applied).
    ///
    /// Lost state is judged against `owned`, the seqs this sender can vouch
    /// for, not against what it captured since: a journal that lost its tail
    /// is noticed even after new writes took those seqs.
    pub fn on_welcome(
        &mut self,
        ours: protocol::StreamId,
        theirs: protocol::StreamId,
        durable: u64,
    ) -> Welcome {
        let lost = if ours != theirs {
            Some(LostState::OtherNumbering { ours, theirs })
        } else if durable < self.acked {
            Some(LostState::ReceiverLostAcked {
                durable,
                acked: self.acked,
            })
        } else if durable > self.owned {
            Some(LostState::JournalLostTail {
                durable,
                owned: self.owned,
            })
        } else {
            None
        };
        if let Some(lost) = lost {
            return Welcome::LostState(lost);
        }
        // `owned ≤ captured`, so the receiver holds nothing this sender lacks.
        self.release(durable);
        self.sent = durable;
        Welcome::Resume { after: durable }
    }

    /// Forgets every queued entry and continues the numbering after `base` (the
    /// receiver's durable position) as if everything up to it were acknowledged.
    /// Used when the agent lost its state: what the dropped entries changed is
    /// repaired by a checksum resync. Returns the recovery points (tags) it
    /// dropped, never acknowledged: seq and label.
    pub fn rebase(&mut self, base: u64) -> Vec<(u64, String)> {
        let dropped = self
            .queue
            .iter()
            .filter_map(|q| match q {
                Queued::Held(Entry {
                    seq,
                    op: crate::protocol::Op::Tag { label, .. },
                }) => Some((*seq, label.clone())),
                _ => None,
            })
            .collect();
        self.queue.clear();
        self.queued_bytes = 0;
        self.held_bytes = 0;
        self.spilled = 0;
        self.captured = base;
        self.sent = base;
        self.acked = base;
        self.owned = base;
        dropped
    }

    /// The connection dropped: everything unacknowledged will be sent again.
    pub fn on_disconnect(&mut self) {
        self.sent = self.acked;
    }

    pub fn on_ack(&mut self, durable: u64) -> Result<(), SessionError> {
        if durable > self.sent {
            return Err(SessionError::AckBeyondSent {
                ack: durable,
                sent: self.sent,
            });
        }
        if durable < self.acked {
            return Err(SessionError::AckBackwards {
                ack: durable,
                acked: self.acked,
            });
        }
        self.release(durable);
        Ok(())
    }

    fn release(&mut self, upto: u64) {
        while let Some(front) = self.queue.front() {
            if front.seq() > upto {
                break;
            }
            let len = front.len();
            self.queued_bytes -= len;
            match front {
                Queued::Held(_) => self.held_bytes -= len,
                Queued::Spilled { .. } => self.spilled -= 1,
            }
            self.queue.pop_front();
        }
        self.acked = self.acked.max(upto);
    }

    /// Frames for the next entries to send, at most about `max_bytes` of entries
    /// (always at least one entry if any is pending). Tags travel as tag frames;
    /// spilled writes as seq ranges to read back ([`Outgoing::Spilled`]).
    pub fn poll_transmit(&mut self, max_bytes: usize) -> Vec<Outgoing> {
        self.poll_transmit_upto(max_bytes, u64::MAX)
    }

    /// Like [`Self::poll_transmit`], sending nothing beyond seq `limit` (the agent
    /// sends only what its local journal already holds, so that a restarted agent
    /// never reuses a seq the receiver has).
    pub fn poll_transmit_upto(&mut self, max_bytes: usize, limit: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let mut batch: Vec<Entry> = Vec::new();
        let mut spilled: Option<(u64, u64, usize)> = None;
        let mut bytes = 0usize;
        // Queued seqs are consecutive from the front's.
        let skip = match self.queue.front() {
            Some(f) => ((self.sent + 1).saturating_sub(f.seq()) as usize).min(self.queue.len()),
            None => 0,
        };
        for q in self.queue.iter().skip(skip) {
            let seq = q.seq();
            if seq > limit {
                break;
            }
            let len = q.len();
            if bytes > 0 && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            self.sent = seq;
            self.owned = self.owned.max(seq);
            match q {
                Queued::Spilled { .. } => {
                    if !batch.is_empty() {
                        out.push(Outgoing::Frame(Frame::Writes(std::mem::take(&mut batch))));
                    }
                    let (first, bytes) = spilled.map_or((seq, 0), |(f, _, b)| (f, b));
                    spilled = Some((first, seq, bytes + len));
                }
                Queued::Held(e) => {
                    if let Some((first, last, bytes)) = spilled.take() {
                        out.push(Outgoing::Spilled { first, last, bytes });
                    }
                    if matches!(e.op, Op::Tag { .. }) {
                        if !batch.is_empty() {
                            out.push(Outgoing::Frame(Frame::Writes(std::mem::take(&mut batch))));
                        }
                        out.push(Outgoing::Frame(Frame::Tag(e.clone())));
                    } else {
                        batch.push(e.clone());
                    }
                }
            }
        }
        if let Some((first, last, bytes)) = spilled {
            out.push(Outgoing::Spilled { first, last, bytes });
        }
        if !batch.is_empty() {
            out.push(Outgoing::Frame(Frame::Writes(batch)));
        }
        out
    }
}

/// What the driver must do after the receiver state handled a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do.
    None,
    /// Send this frame back.
    Reply(Frame),
    /// Make these entries durable, then call [`ReceiverState::on_durable`].
    Persist(Vec<Entry>),
    /// A checksum-resync frame of the agent: answer it once everything received
    /// before it is durable.
    Resync(Frame),
    /// A consistency-group reply of the agent: hand it to whoever runs the
    /// group point (`Sessions::group_link`).
    Group(Frame),
}

/// The receiving side: version negotiation, dedup and gap detection.
#[derive(Debug, Default)]
pub struct ReceiverState {
    hello: Option<Hello>,
    version: u16,
    received: u64,
    durable: u64,
    /// The receiver's stream id when it differs from the hello's: entries refused.
    mismatch: Option<protocol::StreamId>,
}

impl ReceiverState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The negotiated protocol version (0 before the hello).
    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }
    pub fn received(&self) -> u64 {
        self.received
    }
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Validates the first frame; the driver then looks up the durable position
    /// and calls [`Self::welcome`].
    pub fn on_hello(&mut self, frame: Frame) -> Result<&Hello, SessionError> {
        let Frame::Hello(h) = frame else {
            return Err(SessionError::Unexpected("non-hello first"));
        };
        self.version =
            protocol::negotiate(h.min_version, h.max_version).ok_or(SessionError::Version {
                min: h.min_version,
                max: h.max_version,
            })?;
        Ok(self.hello.insert(h))
    }

    /// The welcome frame announcing where the sender must resume; `stream_id`
    /// is the numbering the receiver holds (entries are refused when it is not
    /// the hello's).
    pub fn welcome(&mut self, durable: u64, stream_id: protocol::StreamId) -> Frame {
        self.received = durable;
        self.durable = durable;
        let hello_id = self.hello.as_ref().map(|h| h.stream_id);
        self.mismatch = (hello_id != Some(stream_id)).then_some(stream_id);
        Frame::Welcome {
            version: self.version,
            durable,
            max_frame: protocol::MAX_FRAME_LEN,
            stream_id,
        }
    }

    pub fn on_frame(&mut self, frame: Frame) -> Result<Action, SessionError> {
        let Some(hello) = &self.hello else {
            return Err(SessionError::Unexpected("frame before hello"));
        };
        if let Some(theirs) = self.mismatch {
            if !matches!(frame, Frame::Ping { .. }) {
                return Err(SessionError::StreamMismatch {
                    ours: crate::hex(&hello.stream_id),
                    theirs: crate::hex(&theirs),
                });
            }
        }
        let entries = match frame {
            Frame::Writes(entries) => entries,
            Frame::Tag(e) => vec![e],
            Frame::Ping {
                nonce,
                reply: false,
            } => {
                return Ok(Action::Reply(Frame::Ping { nonce, reply: true }));
            }
            Frame::Ping { reply: true, .. } => return Ok(Action::None),
            Frame::Hello(_) => return Err(SessionError::Unexpected("second hello")),
            Frame::Welcome { .. } => return Err(SessionError::Unexpected("welcome")),
            Frame::Ack { .. } => return Err(SessionError::Unexpected("ack")),
            Frame::Error { .. } => return Err(SessionError::Unexpected("error")),
            f @ (Frame::RegionHashes { .. } | Frame::BlockHashes { .. } | Frame::ResyncDone(_)) => {
                return Ok(Action::Resync(f))
            }
            f @ (Frame::GroupPrepared { .. }
            | Frame::GroupCommitted { .. }
            | Frame::GroupQuiesced { .. }
            | Frame::FinalPointTaken { .. }) => return Ok(Action::Group(f)),
            Frame::FinalPoint { .. } => return Err(SessionError::Unexpected("final-point")),
            Frame::GroupQuiesce { .. } => return Err(SessionError::Unexpected("group-quiesce")),
            Frame::GroupPrepare { .. } => return Err(SessionError::Unexpected("group-prepare")),
            Frame::GroupCommit { .. } => return Err(SessionError::Unexpected("group-commit")),
            Frame::GroupRelease { .. } => return Err(SessionError::Unexpected("group-release")),
            Frame::ResyncStart { .. } => return Err(SessionError::Unexpected("resync-start")),
            Frame::RegionsDiffer { .. } => return Err(SessionError::Unexpected("regions-differ")),
            Frame::BlocksDiffer { .. } => return Err(SessionError::Unexpected("blocks-differ")),
        };
        let mut fresh = Vec::with_capacity(entries.len());
        for e in entries {
            if e.seq <= self.received {
                continue; // duplicate of something already received
            }
            if e.seq != self.received + 1 {
                return Err(SessionError::Gap {
                    expected: self.received + 1,
                    got: e.seq,
                });
            }
            self.received = e.seq;
            fresh.push(e);
        }
        Ok(if fresh.is_empty() {
            Action::None
        } else {
            Action::Persist(fresh)
        })
    }

    /// Entries up to `durable` are durable: acknowledge them.
    pub fn on_durable(&mut self, durable: u64) -> Frame {
        debug_assert!(durable <= self.received);
        self.durable = self.durable.max(durable);
        Frame::Ack {
            durable: self.durable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn write(seq: u64) -> Entry {
        Entry {
            seq,
            op: Op::Write {
                disk: 0,
                offset: seq * 4096,
                data: Bytes::from(vec![seq as u8; 4096]),
            },
        }
    }

    /// The frames of `out`, spilled writes read back from `all` (what the
    /// journal would hold).
    fn resolve(out: Vec<Outgoing>, all: &[Entry]) -> Vec<Frame> {
        out.into_iter()
            .map(|o| match o {
                Outgoing::Frame(f) => f,
                Outgoing::Spilled { first, last, .. } => Frame::Writes(
                    all.iter()
                        .filter(|e| (first..=last).contains(&e.seq))
                        .cloned()
                        .collect(),
                ),
            })
            .collect()
    }

    /// The entries `frames` carry, in order (tags as tag frames).
    fn entries(frames: Vec<Frame>) -> Vec<Entry> {
        let mut out = Vec::new();
        for f in frames {
            match f {
                Frame::Writes(es) => {
                    assert!(es.iter().all(|e| !matches!(e.op, Op::Tag { .. })));
                    out.extend(es);
                }
                Frame::Tag(e) => out.push(e),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    fn hello() -> Frame {
        Frame::Hello(Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            machine: "m".into(),
            disks: vec![],
            stream_id: [1; 16],
        })
    }

    /// Drives sender and receiver against each other, losing the connection in
    /// the middle, and checks that every entry is persisted exactly once.
    #[test]
    fn exactly_once_across_a_reconnect() {
        let mut tx = SenderState::new(0);
        let mut persisted: Vec<u64> = Vec::new();
        for s in 1..=10 {
            tx.push(write(s));
        }
        // First connection: send everything, persist only the first 4, then drop.
        let mut rx = ReceiverState::new();
        rx.on_hello(hello()).unwrap();
        let Frame::Welcome { durable, .. } = rx.welcome(0, [1; 16]) else {
            panic!()
        };
        assert_eq!(
            tx.on_welcome([1; 16], [1; 16], durable),
            Welcome::Resume { after: durable }
        );
        let frames = resolve(tx.poll_transmit(4 * 4200), &[]);
        assert_eq!(tx.sent(), 4);
        for f in frames {
            if let Action::Persist(es) = rx.on_frame(f).unwrap() {
                persisted.extend(es.iter().map(|e| e.seq));
            }
        }
        let ack = rx.on_durable(4);
        let Frame::Ack { durable } = ack else {
            panic!()
        };
        tx.on_ack(durable).unwrap();
        let _unsent_on_wire = tx.poll_transmit(3 * 4200); // 5..=7 lost with the connection
        tx.on_disconnect();
        assert_eq!(tx.sent(), 4);

        // Second connection resumes from the receiver's durable position.
        let mut rx = ReceiverState::new();
        rx.on_hello(hello()).unwrap();
        let Frame::Welcome { durable, .. } = rx.welcome(4, [1; 16]) else {
            panic!()
        };
        assert_eq!(
            tx.on_welcome([1; 16], [1; 16], durable),
            Welcome::Resume { after: durable }
        );
        loop {
            let frames = resolve(tx.poll_transmit(1 << 20), &[]);
            if frames.is_empty() {
                break;
            }
            for f in frames {
                if let Action::Persist(es) = rx.on_frame(f).unwrap() {
                    persisted.extend(es.iter().map(|e| e.seq));
                }
            }
        }
        let Frame::Ack { durable } = rx.on_durable(rx.received()) else {
            panic!()
        };
        tx.on_ack(durable).unwrap();
        assert_eq!(persisted, (1..=10).collect::<Vec<_>>());
        assert_eq!(tx.acked(), 10);
        assert_eq!(tx.queued_bytes(), 0);
    }

    #[test]
    fn duplicates_dropped_and_gaps_refused() {
        let mut rx = ReceiverState::new();
        rx.on_hello(hello()).unwrap();
        rx.welcome(5, [1; 16]);
        assert_eq!(
            rx.on_frame(Frame::Writes(vec![write(4), write(5)]))
                .unwrap(),
            Action::None
        );
        assert_eq!(
            rx.on_frame(Frame::Writes(vec![write(7)])),
            Err(SessionError::Gap {
                expected: 6,
                got: 7
            })
        );
    }

    #[test]
    fn receiver_refuses_frames_before_hello_and_bad_versions() {
        let mut rx = ReceiverState::new();
        assert!(rx.on_frame(Frame::Writes(vec![write(1)])).is_err());
        let bad = Frame::Hello(Hello {
            min_version: 9,
            max_version: 9,
            machine: "m".into(),
            disks: vec![],
            stream_id: [1; 16],
        });
        assert!(matches!(
            rx.on_hello(bad),
            Err(SessionError::Version { .. })
        ));
    }

    #[test]
    fn a_welcome_is_a_resume_or_one_kind_of_lost_state() {
        let mut tx = SenderState::new(5);
        for s in 6..=9 {
            tx.push(write(s));
        }
        // Another numbering, whatever the positions.
        assert!(matches!(
            tx.clone_for_test().on_welcome([1; 16], [2; 16], 0),
            Welcome::LostState(LostState::OtherNumbering { .. })
        ));
        // Beyond what the agent owns (captured 9, but only 5 vouched for).
        assert_eq!(
            tx.clone_for_test().on_welcome([1; 16], [1; 16], 7),
            Welcome::LostState(LostState::JournalLostTail {
                durable: 7,
                owned: 5
            })
        );
        assert!(LostState::JournalLostTail {
            durable: 7,
            owned: 5
        }
        .to_string()
        .contains("lost its tail"));
        assert_eq!(
            tx.on_welcome([1; 16], [1; 16], 5),
            Welcome::Resume { after: 5 }
        );
        assert_eq!(tx.sent(), 5);
    }

    #[test]
    fn sender_detects_lost_acknowledged_data() {
        let mut tx = SenderState::new(0);
        for s in 1..=3 {
            tx.push(write(s));
        }
        assert_eq!(
            tx.on_welcome([1; 16], [1; 16], 0),
            Welcome::Resume { after: 0 }
        );
        tx.poll_transmit(1 << 20);
        tx.on_ack(3).unwrap();
        assert_eq!(
            tx.on_welcome([1; 16], [1; 16], 2),
            Welcome::LostState(LostState::ReceiverLostAcked {
                durable: 2,
                acked: 3
            })
        );
        assert_eq!(tx.acked(), 3, "nothing applied");
        assert!(matches!(
            tx.on_ack(9),
            Err(SessionError::AckBeyondSent { .. })
        ));
    }

    #[test]
    fn another_numbering_is_refused_until_the_agent_rebases() {
        let mut rx = ReceiverState::new();
        rx.on_hello(hello()).unwrap();
        let Frame::Welcome { stream_id, .. } = rx.welcome(7, [2; 16]) else {
            panic!()
        };
        assert_eq!(stream_id, [2; 16]);
        assert!(matches!(
            rx.on_frame(Frame::Writes(vec![write(8)])),
            Err(SessionError::StreamMismatch { .. })
        ));
        // The agent rebases on 7: its next entry is 8 and nothing is queued.
        let mut tx = SenderState::new(0);
        tx.push(write(1));
        tx.rebase(7);
        assert_eq!((tx.next_seq(), tx.queued_bytes(), tx.acked()), (8, 0, 7));
        assert!(tx.poll_transmit(1 << 20).is_empty());
    }

    #[test]
    fn tags_travel_as_tag_frames_in_order() {
        let mut tx = SenderState::new(0);
        tx.push(write(1));
        tx.push(Entry {
            seq: 2,
            op: Op::Tag {
                kind: protocol::TagKind::Crash,
                source: None,
                time_ms: 0,
                label: String::new(),
            },
        });
        tx.push(write(3));
        let frames = resolve(tx.poll_transmit(1 << 20), &[]);
        assert!(matches!(frames[0], Frame::Writes(ref v) if v.len() == 1));
        assert!(matches!(frames[1], Frame::Tag(_)));
        assert!(matches!(frames[2], Frame::Writes(ref v) if v[0].seq == 3));
    }

    /// A sender with a memory limit sends the same entries as one without,
    /// once its spilled writes are read back; it holds at most the limit, and
    /// acknowledgements make room for new writes again.
    #[test]
    fn spilled_writes_are_sent_like_held_ones() {
        let tag = |seq| Entry {
            seq,
            op: Op::Tag {
                kind: protocol::TagKind::Crash,
                source: None,
                time_ms: 0,
                label: format!("t{seq}"),
            },
        };
        let all: Vec<Entry> = (1..=40)
            .map(|s| if s % 7 == 0 { tag(s) } else { write(s) })
            .collect();
        let limit = 3 * write(1).encoded_len();
        let mut small = SenderState::with_memory_limit(0, limit);
        let mut big = SenderState::new(0);
        for e in &all {
            small.push(e.clone());
            big.push(e.clone());
            assert!(small.held_bytes() <= limit + tag(99).encoded_len() * 5);
        }
        assert_eq!(small.queued_bytes(), big.queued_bytes());
        let out = small.poll_transmit_upto(9 * 4200, 30);
        assert!(out.iter().any(|o| matches!(o, Outgoing::Spilled { .. })));
        assert_eq!(
            entries(resolve(out, &all)),
            entries(resolve(big.poll_transmit_upto(9 * 4200, 30), &[]))
        );
        // A reconnect resends from the acknowledged position, spilled or not.
        small.on_ack(4).unwrap();
        big.on_ack(4).unwrap();
        small.on_disconnect();
        big.on_disconnect();
        loop {
            let a = entries(resolve(small.poll_transmit(5 * 4200), &all));
            let b = entries(resolve(big.poll_transmit(5 * 4200), &[]));
            assert_eq!(a, b);
            if a.is_empty() {
                break;
            }
        }
        assert_eq!(small.sent(), 40);
        small.on_ack(40).unwrap();
        assert_eq!((small.queued_bytes(), small.held_bytes()), (0, 0));
        // Once one write spilled, the next ones spill too until the spilled
        // ones are acknowledged (one contiguous run, read back in order).
        let mut h = SenderState::with_memory_limit(0, limit);
        for s in 1..=5 {
            h.push(write(s));
        }
        let _ = h.poll_transmit(1 << 20);
        h.on_ack(2).unwrap();
        h.push(write(6));
        assert!(matches!(
            h.queue.back(),
            Some(Queued::Spilled { seq: 6, .. })
        ));
        let _ = h.poll_transmit(1 << 20);
        h.on_ack(6).unwrap();
        h.push(write(7));
        assert!(matches!(h.queue.back(), Some(Queued::Held(_))));
        // Room again: the next write is held.
        small.push(write(41));
        assert_eq!(small.held_bytes(), write(41).encoded_len());
        assert!(
            matches!(&small.poll_transmit(1 << 20)[..], [Outgoing::Frame(Frame::Writes(v))] if v[0].seq == 41)
        );
        // A rebase reports the dropped tags, spilled writes around them or not.
        let mut r = SenderState::with_memory_limit(0, limit);
        for e in &all[..14] {
            r.push(e.clone());
        }
        assert_eq!(r.rebase(20), vec![(7, "t7".into()), (14, "t14".into())]);
        assert_eq!((r.queued_bytes(), r.held_bytes()), (0, 0));
    }
}
