//! The status page (`GET /` of `http.rs`): the status snapshot as plain
//! server-rendered HTML with inline SVG, no script. It shows the health and
//! backpressure, every machine and disk with its state and RPO, an RPO chart
//! per machine over the last [`crate::monitor::RPO_HISTORY_SPAN`] (sampled by
//! the tick, the worst of each [`crate::monitor::RPO_HISTORY_STEP`]), the
//! recent points with their suspect marks, and the active alerts. It reloads
//! itself every [`REFRESH_SECS`].
//!
//! Every value from outside (reasons, labels, messages) is HTML-escaped.
//! Elements tests and scripts may rely on: `#health` (`data-level`),
//! `tr.machine` (`data-machine`, `data-state`), `svg.rpo-chart`
//! (`data-machine`), `#alerts li` (`data-kind`).

use std::fmt::Write;
use std::time::Duration;

use crate::status::{MachineStatus, Status};

pub const REFRESH_SECS: u64 = 10;
const CHART_W: f64 = 600.0;
const CHART_H: f64 = 120.0;

/// HTML-escapes text and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn dur(s: f64) -> String {
    humantime::format_duration(Duration::from_secs(s as u64)).to_string()
}

/// One machine's RPO chart: `samples` are (Unix seconds, RPO seconds),
/// oldest first, over the `span` before `now`.
fn chart(m: &MachineStatus, samples: &[(u64, f64)], now: u64, span: Duration) -> String {
    let span_s = span.as_secs().max(1) as f64;
    let top = samples
        .iter()
        .map(|(_, r)| *r)
        .fold(m.rpo_alert_seconds * 1.2, f64::max)
        .max(1.0);
    let x = |t: u64| CHART_W - (now.saturating_sub(t) as f64 / span_s * CHART_W).min(CHART_W);
    let y = |r: f64| CHART_H - (r / top * CHART_H).min(CHART_H);
    let points: Vec<String> = samples
        .iter()
        .map(|(t, r)| format!("{:.1},{:.1}", x(*t), y(*r)))
        .collect();
    let mut o = String::new();
    let _ = write!(
        o,
        r##"<svg class="rpo-chart" data-machine="{m}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="RPO of {m} over the last {span}">
<rect x="0" y="0" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>
<line x1="0" x2="{w}" y1="{ty:.1}" y2="{ty:.1}" stroke="#c33" stroke-dasharray="4 3"/>
<text x="{w}" dx="-4" y="{tty:.1}" font-size="10" fill="#c33" text-anchor="end">alert {alert}</text>
<text x="4" y="12" font-size="10" fill="#555">{top}</text>
<text x="{w}" y="{h}" dy="-3" dx="-4" font-size="10" fill="#555" text-anchor="end">now</text>
<text x="4" y="{h}" dy="-3" font-size="10" fill="#555">-{span}</text>
"##,
        m = esc(&m.machine),
        w = CHART_W,
        h = CHART_H,
        ty = y(m.rpo_alert_seconds),
        tty = (y(m.rpo_alert_seconds) - 3.0).max(10.0),
        alert = dur(m.rpo_alert_seconds),
        top = dur(top),
        span = humantime::format_duration(span),
    );
    if points.len() == 1 {
        let _ = writeln!(
            o,
            r##"<circle cx="{}" cy="{}" r="2" fill="#1a6"/>"##,
            x(samples[0].0),
            y(samples[0].1)
        );
    } else if !points.is_empty() {
        let _ = writeln!(
            o,
            r##"<polyline fill="none" stroke="#1a6" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
    }
    o.push_str("</svg>\n");
    o
}

/// The page; `history(machine)` gives each machine's RPO samples.
pub fn render(
    st: &Status,
    now_s: u64,
    span: Duration,
    history: impl Fn(&str) -> Vec<(u64, f64)>,
) -> String {
    let mut o = String::new();
    let level = st.health.level.as_str();
    let _ = write!(
        o,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECS}">
<title>Lifeboat process server {id}</title>
<style>
body {{ font-family: "DejaVu Sans", sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; font-size: 90%; }}
th {{ background: #eee; }}
.ok {{ color: #1a6; }} .warning {{ color: #b80; }} .critical {{ color: #c33; }}
.state-streaming {{ color: #1a6; }} .state-disconnected, .state-resync-required, .state-fenced {{ color: #c33; }}
.suspect {{ color: #c33; font-weight: bold; }}
</style></head><body>
<h1>Lifeboat process server {id}</h1>
<p>{addr} &middot; {time}</p>
<p id="health" data-level="{level}">Health: <strong class="{level}">{level}</strong>{reasons}</p>
"#,
        id = esc(&st.server_id),
        addr = esc(&st.address),
        time = esc(&st.time),
        reasons = if st.health.reasons.is_empty() {
            String::new()
        } else {
            format!(" &mdash; {}", esc(&st.health.reasons.join("; ")))
        },
    );
    if let Some(bp) = &st.health.backpressure {
        let _ = writeln!(
            o,
            r#"<p id="backpressure" class="critical">Backpressure: {}</p>"#,
            esc(bp)
        );
    }
    let free = st
        .health
        .cache_free
        .map(|f| format!("{:.0}% free", f * 100.0))
        .unwrap_or_else(|| "free space unknown".into());
    let _ = writeln!(
        o,
        "<p>Cache {}: {}, {}; upload backlog {}.</p>",
        esc(&st.cache.dir.display().to_string()),
        if st.cache.writable {
            "writable"
        } else {
            "NOT writable"
        },
        free,
        dur(st.health.backlog_seconds)
    );

    o.push_str("<h2>Machines</h2>\n<table id=\"machines\"><tr><th>Machine / disk</th><th>State</th><th>RPO</th><th>Alert over</th><th>Churn</th><th>Backlog</th><th>Owner</th></tr>\n");
    for m in &st.machines {
        let _ = writeln!(
            o,
            r#"<tr class="machine" data-machine="{id}" data-state="{state}"><td><strong>{id}</strong></td><td class="state-{state}">{state}{reason}</td><td>{rpo}</td><td>{alert}</td><td>{churn:.3} MB/s</td><td>{entries} entries, {bytes} B, {age}</td><td>{owner}</td></tr>"#,
            id = esc(&m.machine),
            state = esc(&m.state),
            reason = m
                .reason
                .as_deref()
                .map(|r| format!("<br><small>{}</small>", esc(r)))
                .unwrap_or_default(),
            rpo = dur(m.rpo_seconds),
            alert = dur(m.rpo_alert_seconds),
            churn = m.churn_mb_per_s,
            entries = m.backlog.entries,
            bytes = m.backlog.bytes,
            age = dur(m.backlog.seconds),
            owner = esc(m.owner.as_deref().unwrap_or("another server (fenced)")),
        );
        for d in &m.disks {
            let _ = writeln!(
                o,
                r#"<tr class="disk" data-machine="{m}" data-disk="{d}"><td>&nbsp;&nbsp;disk {d} ({size} B)</td><td class="state-{s}">{s}</td><td></td><td></td><td>{churn:.3} MB/s</td><td></td><td></td></tr>"#,
                m = esc(&m.machine),
                d = esc(&d.id),
                size = d.size,
                s = esc(&d.state),
                churn = d.churn_mb_per_s,
            );
        }
    }
    o.push_str("</table>\n");

    for m in &st.machines {
        let _ = writeln!(o, "<h2>{}</h2>", esc(&m.machine));
        let _ = writeln!(o, "<h3>RPO, last {}</h3>", humantime::format_duration(span));
        o.push_str(&chart(m, &history(&m.machine), now_s, span));
        o.push_str("<h3>Recent points</h3>\n");
        if m.last_points.is_empty() {
            o.push_str("<p>None stored since this server started.</p>\n");
            continue;
        }
        let _ = writeln!(
            o,
            r#"<table class="points" data-machine="{}"><tr><th>Seq</th><th>Kind</th><th>Time</th><th>Label</th><th>Churn</th></tr>"#,
            esc(&m.machine)
        );
        for p in m.last_points.iter().rev() {
            let _ = writeln!(
                o,
                r#"<tr class="point" data-seq="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td></tr>"#,
                p.seq,
                p.seq,
                esc(&p.kind),
                esc(&p.time),
                esc(&p.label),
                if p.suspect { r#" class="suspect""# } else { "" },
                if p.suspect { "suspect" } else { "clean" }
            );
        }
        o.push_str("</table>\n");
    }

    o.push_str("<h2>Active alerts</h2>\n<ul id=\"alerts\">\n");
    if st.alerts.is_empty() {
        o.push_str("<li class=\"none\">none</li>\n");
    }
    for a in &st.alerts {
        let _ = writeln!(
            o,
            r#"<li data-kind="{k}" data-machine="{m}"><strong>{k}</strong>{mm} since {since}: {msg}</li>"#,
            k = esc(&a.kind),
            m = esc(&a.machine),
            mm = if a.machine.is_empty() {
                String::new()
            } else {
                format!(" ({})", esc(&a.machine))
            },
            since = esc(&a.since),
            msg = esc(&a.message),
        );
    }
    o.push_str("</ul>\n</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
