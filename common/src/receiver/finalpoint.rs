//! A planned failover's final point, asked of a machine's agent through its
//! live session: one final-point frame, then the agent's final-point-taken,
//! bounded. The process server asks it for `POST /machines/<machine>/final-point`
//! (process-server/src/http.rs), the master target for a failback
//! (master-target/src/serve.rs). A
//! session that ends first is [`Failed::Lost`] (the caller asks again once
//! the agent is back: the agent answers the point it took, if it took one). The agent's side, and why every acknowledged
//! write precedes the tag, is `agent/src/finalpoint.rs`. The point then
//! reaches the store as every point does (cache, segment cut at the tag,
//! upload); `lifeboat-mt failover --planned` waits for it there.

use std::time::Duration;

use super::Sessions;
use crate::protocol::{Frame, TagSource};
use tracing::{info, warn};

/// How long a final point may quiesce when the caller does not say.
pub const DEFAULT_QUIESCE: Duration = Duration::from_secs(60);
/// The longest the agent quiesces, whatever is asked (the agent caps it too).
pub const MAX_QUIESCE: Duration = Duration::from_secs(600);
/// Time over the quiesce bound for the agent's settle (at most 120 s,
/// `agent/src/finalpoint.rs`), the drain, the journal sync and the reply.
const REPLY_SLACK: Duration = Duration::from_secs(180);
/// The tag's label.
pub const LABEL: &str = "planned-failover";

/// The final point the agent placed.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FinalPoint {
    pub machine: String,
    /// The tag's seq: every write the agent acknowledged is below it, and it
    /// refuses every write from now on.
    pub seq: u64,
    /// `app` (quiesced, with its source) or `crash` (no `[app]` quiescer).
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<TagSource>,
    pub label: &'static str,
}

/// Why no final point came back.
#[derive(Debug)]
pub enum Failed {
    /// The agent answered no (its reason), or cannot be asked (an old agent).
    Refused(String),
    /// No live session, or it ended before the answer: ask again once the
    /// agent is connected.
    Lost(String),
}

/// How often the wait looks whether the session is still the one asked.
const SESSION_POLL: Duration = Duration::from_millis(250);

/// Asks `machine`'s agent for its final point, quiescing at most `quiesce`.
pub async fn final_point(
    sessions: &Sessions,
    machine: &str,
    quiesce: Duration,
) -> Result<FinalPoint, Failed> {
    let quiesce = quiesce.min(MAX_QUIESCE);
    let Some(session) = sessions.session_of(machine) else {
        return Err(Failed::Lost(format!(
            "machine {machine:?} has no live session (is its agent running and connected?)"
        )));
    };
    let mut link = sessions.final_point_link(machine).map_err(|e| {
        if sessions.session_of(machine).is_none() {
            Failed::Lost(e)
        } else {
            Failed::Refused(e)
        }
    })?;
    let id = crate::now_ms();
    link.send(Frame::FinalPoint {
        id,
        quiesce_ms: quiesce.as_millis() as u32,
        label: LABEL.into(),
    })
    .map_err(Failed::Lost)?;
    info!(
        machine,
        "asked the agent for the final point of a planned failover"
    );
    let bound = quiesce + REPLY_SLACK;
    let reply = tokio::time::timeout(bound, async {
        let mut poll = tokio::time::interval(SESSION_POLL);
        loop {
            tokio::select! {
                f = link.recv() => match f {
                    Some(Frame::FinalPointTaken { id: got, seq, source, error }) if got == id => {
                        return Some((seq, source, error));
                    }
                    Some(_) => {}
                    None => return None,
                },
                _ = poll.tick() => {
                    if sessions.session_of(machine) != Some(session) {
                        return None;
                    }
                }
            }
        }
    })
    .await;
    let (seq, source, error) = match reply {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(Failed::Lost(format!(
                "the session of {machine:?} ended before its agent answered (if it took the point it refuses writes now; asked again, it answers that point)"
            )))
        }
        Err(_) => {
            // A half-open connection looks the same: ask again.
            return Err(Failed::Lost(format!(
                "the agent of {machine:?} did not answer within {bound:?} (if it took the point it refuses writes now; asked again, it answers that point)"
            )))
        }
    };
    if !error.is_empty() {
        warn!(machine, "no final point: {error}");
        return Err(Failed::Refused(format!(
            "the agent of {machine:?}: {error}"
        )));
    }
    info!(machine, seq, "final point of a planned failover placed");
    Ok(FinalPoint {
        machine: machine.to_string(),
        seq,
        kind: if source.is_some() { "app" } else { "crash" },
        source,
        label: LABEL,
    })
}
