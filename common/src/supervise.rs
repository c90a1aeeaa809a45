//! One supervisor for every long-running task: run it, and when it fails (an
//! error or a panic) log why and start it again after a growing pause, until
//! it ends on its own or the cancellation token fires.
//!
//! A task that ran for at least [`HEALTHY_RUN`] before failing counts as
//! healthy: its next pause starts again from the minimum.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// First pause after a failure; doubles up to [`MAX_PAUSE`].
pub const MIN_PAUSE: Duration = Duration::from_secs(1);
pub const MAX_PAUSE: Duration = Duration::from_secs(60);
/// A run at least this long resets the pause.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `make()` until it returns `Ok`, restarting it after each error or
/// panic (named `name` in the log) with a pause of [`MIN_PAUSE`] doubling to
/// [`MAX_PAUSE`]. Returns when the task ended or `cancel` fired.
pub async fn supervise<F, Fut>(name: &str, cancel: CancellationToken, make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    supervise_with(name, cancel, (MIN_PAUSE, MAX_PAUSE), make).await
}

/// [`supervise`] with its own pauses: `(first, longest)`.
pub async fn supervise_with<F, Fut>(
    name: &str,
    cancel: CancellationToken,
    (min_pause, max_pause): (Duration, Duration),
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut pause = min_pause;
    while !cancel.is_cancelled() {
        let started = tokio::time::Instant::now();
        let run = crate::spawn(make());
        let failure = tokio::select! {
            r = run => match r {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
                Err(e) => format!("{e}"),
            },
            _ = cancel.cancelled() => return,
        };
        if started.elapsed() >= HEALTHY_RUN {
            pause = min_pause;
        }
        error!("{name} stopped: {failure}; starting it again in {pause:?}");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = cancel.cancelled() => return,
        }
        info!("{name}: starting again");
        pause = (pause * 2).min(max_pause);
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const FAST: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(4));

    #[tokio::test]
    async fn failures_and_panics_restart_until_the_task_succeeds() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        supervise_with("test task", CancellationToken::new(), FAST, move || {
            let r = r.clone();
            async move {
                match r.fetch_add(1, Ordering::SeqCst) {
                    0 => anyhow::bail!("read error"),
                    1 => panic!("boom"),
                    _ => Ok(()),
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn cancel_stops_a_failing_task() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        supervise_with("failing task", cancel, FAST, move || {
            let (r, c) = (r.clone(), c.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 4 {
                    c.cancel();
                }
                anyhow::bail!("always fails")
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 5);
    }
}
