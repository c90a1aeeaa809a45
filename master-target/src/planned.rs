//! A planned failover (`lifeboat-mt failover --planned`): ask the machine's
//! process server for a final point (`POST /machines/<machine>/final-point`
//! on its `[http]` endpoint, bearer token; `process-server/src/planned.rs`),
//! then wait until that point is recoverable from the store — listed, its
//! segments stored up to it, its disk checksums recorded — and hand its id
//! to the failover.
//!
//! Zero data loss: the agent placed the tag after every write it had
//! acknowledged and refuses every write since (`agent/src/finalpoint.rs`),
//! so the point holds every acknowledged write. A failover interrupted
//! while it waits can run again: the agent answers the same final point.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lifeboat_common::catalogue::{CatalogueKey, PointRecord};
use lifeboat_common::store::Store;
use serde::{Deserialize, Serialize};

/// How often the store is looked at while the final point uploads.
const POLL: Duration = Duration::from_millis(500);
/// How often the wait says where it is.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Time over the quiesce bound for the process server's answer (it waits
/// the quiesce bound and 180 s more for the agent).
const ANSWER_SLACK: Duration = Duration::from_secs(240);
/// How long a 503 (no live session, or it ended before the agent answered)
/// is asked again: an agent reconnects within seconds.
const RECONNECT_WAIT: Duration = Duration::from_secs(30);
const RECONNECT_PAUSE: Duration = Duration::from_secs(2);

/// The final point the agent placed, as the process server answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FinalPoint {
    pub machine: String,
    pub seq: u64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Asks the process server at `ps` (`http://HOST:PORT`, its `[http]
/// listen`) for `machine`'s final point; an error names the server and the
/// agent's reason.
pub async fn ask_final_point(
    ps: &str,
    token: &str,
    machine: &str,
    quiesce: Duration,
) -> Result<FinalPoint> {
    let base = ps.trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        bail!("--ps {ps:?} is not http://HOST:PORT (the process server's [http] listen)");
    }
    let url = format!(
        "{base}/machines/{machine}/final-point?quiesce-timeout={}ms",
        quiesce.as_millis()
    );
    let client = reqwest::Client::builder()
        .timeout(quiesce + ANSWER_SLACK)
        .build()
        .context("making the HTTP client")?;
    let mut first_503: Option<Instant> = None;
    loop {
        match ask_once(&client, base, &url, token, machine).await? {
            Ok(p) => return Ok(p),
            Err(why) if first_503.get_or_insert_with(Instant::now).elapsed() < RECONNECT_WAIT => {
                eprintln!("  {why}; asking again in {RECONNECT_PAUSE:?}");
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
            Err(why) => bail!(
                "the process server at {base} took no final point of {machine}: {why} (asked for {RECONNECT_WAIT:?})"
            ),
        }
    }
}

/// One request: the point, or (inner error) a 503 to ask again.
async fn ask_once(
    client: &reqwest::Client,
    base: &str,
    url: &str,
    token: &str,
    machine: &str,
) -> Result<std::result::Result<FinalPoint, String>> {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| {
            format!("asking the process server at {base} for the final point of {machine}")
        })?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading the answer of {base}"))?;
    if !status.is_success() {
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Ok(Err(why));
        }
        bail!("the process server at {base} took no final point of {machine} ({status}): {why}");
    }
    Ok(Ok(serde_json::from_str(&body).with_context(|| {
        format!("parsing the answer of {base}: {body:?}")
    })?))
}

/// Waits (at most `bound`) until the point at `seq` can be recovered from
/// the store: listed, the stream stored up to it, and (with `sums`) its
/// disk checksums recorded. Returns it.
pub async fn wait_in_store(
    store: &Store,
    key: &CatalogueKey,
    machine: &str,
    seq: u64,
    sums: bool,
    bound: Duration,
) -> Result<PointRecord> {
    let started = Instant::now();
    let mut reported = Instant::now();
    loop {
        let inv = crate::materialize::inventory(store, Some(key), machine).await?;
        if let Some(b) = inv.base.as_ref().filter(|b| b.seq >= seq) {
            bail!(
                "retention folded the final point of {machine} (seq {seq}) into the base at seq {}: \
                 nothing was written since it, so `--point latest` recovers the same disks",
                b.seq
            );
        }
        let point = inv.points.iter().find(|p| p.seq == seq && inv.end >= seq);
        let summed = !sums
            || lifeboat_common::catalogue::list_sums_points(store, machine)
                .await?
                .contains(&seq);
        let waiting_for = match point {
            Some(p) if summed => return Ok(p.clone()),
            Some(_) => "its disk checksums (the agent hashes them after the point; --skip-checksum recovers without comparing)".to_string(),
            None if inv.end >= seq => "its point record".to_string(),
            None => format!("the stream up to it (stored up to seq {})", inv.end),
        };
        if started.elapsed() >= bound {
            bail!(
                "the final point of {machine} (seq {seq}) is not in the store after {}: waiting for {waiting_for}. \
                 Nothing is lost: the agent refuses writes since the point and its process server still holds it; \
                 run the planned failover again (the agent answers the same point) once the upload catches up",
                humantime::format_duration(bound)
            );
        }
        if reported.elapsed() >= REPORT_EVERY {
            eprintln!(
                "  still waiting for the final point (seq {seq}) to reach the store: {waiting_for} ({:.0?} so far)",
                started.elapsed()
            );
            reported = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}
