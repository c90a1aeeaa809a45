//! `--log-format json` (here through `LIFEBOAT_LOG_FORMAT`): every line the
//! process server and the agent write is one JSON object, and data-path
//! events carry the machine (and a sync's disk) in their spans — what a log
//! pipeline filters on.

use std::time::Duration;

use lifeboat_tests::nbd::NbdClient;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";

/// The JSON lines of a log; panics on a line that is not JSON.
fn json_lines(log: &str, who: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who} wrote a non-JSON line ({e}): {l}"))
        })
        .collect()
}

/// The first event whose message contains `text`.
fn event<'a>(lines: &'a [serde_json::Value], text: &str, who: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(text))
        })
        .unwrap_or_else(|| panic!("{who} logged no {text:?}"))
}

/// Whether one of the event's spans has `field` = `value`.
fn in_span(v: &serde_json::Value, field: &str, value: &str) -> bool {
    v["spans"]
        .as_array()
        .is_some_and(|s| s.iter().any(|sp| sp[field] == value))
}

#[test]
fn json_logs_are_one_object_per_line_with_the_machine_and_disk_on_data_path_events() {
    // Inherited by the servers this test starts (each test file is its own
    // process).
    std::env::set_var("LIFEBOAT_LOG_FORMAT", "json");
    let root = tempfile::tempdir().unwrap();
    let (ps, agent) = start_pair(root.path(), &[("root", 8 << 20)], "").unwrap();
    let mut nbd = NbdClient::connect(&agent.disks[0].2, "root").unwrap();
    nbd.write(4096, &[7u8; 65536], 0).unwrap();
    nbd.flush().unwrap();
    let seq = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(60)).unwrap();
    wait_for("the point's checksums", Duration::from_secs(30), || {
        agent
            .proc
            .as_ref()
            .unwrap()
            .log_text()
            .contains("point checksums hashed")
            .then_some(())
    })
    .unwrap();

    let ps_lines = json_lines(&ps.log(), "lifeboat-ps");
    let recorded = event(&ps_lines, "recovery point recorded", "lifeboat-ps");
    assert!(
        in_span(recorded, "machine", MACHINE),
        "the uploader's event lacks the machine: {recorded}"
    );
    assert_eq!(recorded["level"], "INFO");
    assert!(recorded["timestamp"].is_string());

    let agent_lines = json_lines(&agent.proc.as_ref().unwrap().log_text(), "lifeboat-agent");
    let hashed = event(&agent_lines, "point checksums hashed", "lifeboat-agent");
    assert!(
        in_span(hashed, "machine", MACHINE),
        "the agent's event lacks the machine: {hashed}"
    );
    let synced = event(&agent_lines, "initial sync", "lifeboat-agent");
    assert!(
        in_span(synced, "machine", MACHINE),
        "no machine on {synced}"
    );
    // A disk's sync events name the disk.
    assert!(
        agent_lines
            .iter()
            .any(|v| in_span(v, "disk", "root") && in_span(v, "machine", MACHINE)),
        "no event of the sync task names disk root"
    );
}
