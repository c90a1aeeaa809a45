//! A catalogue edited in the store must not change what failover writes:
//! every catalogue object is authenticated, the stream's own entries win over
//! metadata, and no id from the store becomes a path outside `--out`.
//!
//! Each test protects a real disk through the real agent and process server
//! (file:// store), tampers with one object the way an attacker with write
//! access to the bucket could, and runs the real `lifeboat-mt`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

fn store_dir(ps: &ProcessServer) -> PathBuf {
    ps.dir.join("store").join("machines").join(MACHINE)
}

/// Applies `edit` to the JSON record of a catalogue object, whether it is
/// stored plain or inside a signed wrapper (whose MAC is then left as it was).
fn tamper_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut outer: serde_json::Value = serde_json::from_str(&text).unwrap();
    if let Some(inner) = outer.get("record").and_then(|r| r.as_str()) {
        let mut rec: serde_json::Value = serde_json::from_str(inner).unwrap();
        edit(&mut rec);
        outer["record"] = serde_json::Value::String(serde_json::to_string_pretty(&rec).unwrap());
    } else {
        edit(&mut outer);
    }
    std::fs::write(path, serde_json::to_vec_pretty(&outer).unwrap()).unwrap();
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A synced agent with one 32 MiB random disk and a stored point; returns
/// the pair, the point's seq and a snapshot of the disk at the point.
fn protected_with_point(root: &Path) -> (ProcessServer, Agent, u64, PathBuf) {
    let mut rng = Rng(0xca7a);
    let (ps, agent) = synced_random_disk(root, 32 * MIB, &mut rng, |ps| ps.port);
    let snap = root.join("at-point.raw");
    let seq = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(120)).unwrap();
    snapshot(&agent.image("root"), &snap);
    (ps, agent, seq, snap)
}

/// Halving the disk size recorded in a point must not truncate the image.
#[test]
fn edited_point_disk_size_is_refused_or_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ps, mut agent, seq, snap) = protected_with_point(root);
    agent.stop_clean();
    let point = store_dir(&ps).join(format!("points/{seq:016x}.json"));
    tamper_json(&point, |rec| {
        let size = rec["disks"][0]["size"].as_u64().unwrap();
        rec["disks"][0]["size"] = serde_json::json!(size / 2);
    });
    let out = root.join("out");
    let o = failover(
        &ps.store_url,
        MACHINE,
        &seq.to_string(),
        &out,
        &ps.kek(),
        &[],
    )
    .unwrap();
    if o.status.success() {
        // Recovered from the authenticated stream: the image is the disk.
        assert_same(&out.join("root.raw"), &snap);
    } else {
        let err = stderr(&o);
        assert!(
            err.contains(&format!("points/{seq:016x}.json")) && err.contains("authentication"),
            "the refusal must name the altered point: {err}"
        );
        assert!(!out.join("root.raw").exists(), "nothing written on refusal");
    }
}

/// A disk id that is a path in machine.json never becomes a path: failover
/// refuses, naming machine.json, whether the record is unsigned or signed
/// with the machine's real key; nothing is written outside `--out`.
#[test]
fn disk_id_with_a_path_in_machine_json_writes_nothing_outside_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ps, mut agent, seq, _snap) = protected_with_point(root);
    agent.stop_clean();
    let mj = store_dir(&ps).join("machine.json");
    let original = std::fs::read(&mj).unwrap();
    let out = root.join("a").join("b").join("out");
    let escaped = root.join("a").join("x.raw");
    let check = |what: &str| {
        let o = failover(
            &ps.store_url,
            MACHINE,
            &seq.to_string(),
            &out,
            &ps.kek(),
            &[],
        )
        .unwrap();
        assert!(
            !escaped.exists(),
            "{what}: failover wrote {} outside --out",
            escaped.display()
        );
        assert!(!o.status.success(), "{what}: failover must refuse");
        let err = stderr(&o);
        assert!(
            err.contains("machine.json"),
            "{what}: name the object: {err}"
        );
        err
    };

    // 1. Edited in place (the MAC, if any, no longer matches).
    tamper_json(&mj, |rec| {
        rec["disks"][0]["id"] = serde_json::json!("../../x")
    });
    check("edited machine.json");

    // 2. Re-signed with the machine's real catalogue key: the id check alone
    // must refuse it.
    if let Some(signed) = resign_machine_json(&ps, &original, "../../x") {
        std::fs::write(&mj, signed).unwrap();
        let err = check("signed machine.json");
        assert!(err.contains("invalid disk id"), "{err}");
    }
}

/// The machine's real catalogue key (from its sealed data key and the KEK),
/// to sign records as the process server would.
fn catalogue_key(ps: &ProcessServer) -> lifeboat_common::catalogue::CatalogueKey {
    use lifeboat_common::catalogue;
    use lifeboat_common::seal::Key;
    let kek = Key::from_hex(&std::fs::read_to_string(ps.kek()).unwrap()).unwrap();
    let sealed = std::fs::read(store_dir(ps).join("keys/data-key.sealed")).unwrap();
    let store = lifeboat_common::store::Store::open(&lifeboat_common::store::StoreConfig::new(
        ps.store_url.clone(),
    ))
    .unwrap();
    let data = catalogue::open_data_key(&kek, MACHINE, &sealed, &store).unwrap();
    catalogue::CatalogueKey::derive(&data)
}

/// The signed machine.json with disk 0 renamed `id`, signed with the
/// machine's real catalogue key; `None` if the stored record is not signed.
fn resign_machine_json(ps: &ProcessServer, original: &[u8], id: &str) -> Option<Vec<u8>> {
    use lifeboat_common::catalogue;
    let outer: serde_json::Value = serde_json::from_slice(original).ok()?;
    let mut rec: serde_json::Value = serde_json::from_str(outer.get("record")?.as_str()?).ok()?;
    rec["disks"][0]["id"] = serde_json::json!(id);
    let key = catalogue_key(ps);
    Some(catalogue::sign_record(
        &key,
        &catalogue::machine_json(MACHINE),
        &rec,
    ))
}

/// The stream ends inside the initial sync; deleting its `inconsistent/`
/// mark must not let failover at `latest` pass as crash-consistent: the
/// segments themselves hold the sync's start.
#[test]
fn deleted_inconsistent_mark_is_detected_from_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 256 * MIB;
    // 256 MiB at 8 MiB/s: the sync runs for half a minute.
    let (ps, mut agent) =
        configured_pair(root, &[("root", size)], "sync-rate-limit = 8388608").unwrap();
    fill_random(&agent.image("root"), 0, size, &mut Rng(0x1a7e));
    agent.start().unwrap();
    let marks = store_dir(&ps).join("inconsistent");
    wait_for(
        "part of the sync and its mark to be stored",
        Duration::from_secs(60),
        || {
            let p = points(&ps.store_url, MACHINE, &[]).ok()?;
            let any_mark = std::fs::read_dir(&marks).ok()?.next().is_some();
            (p["stream-end"].as_u64()? > 0 && any_mark).then_some(())
        },
    )
    .unwrap();
    // The machine is lost mid-sync.
    agent.proc.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(2));
    let end = points(&ps.store_url, MACHINE, &[]).unwrap()["stream-end"]
        .as_u64()
        .unwrap();
    assert!(end > 0);

    // With the mark, `latest` is refused (as before).
    let o = failover(
        &ps.store_url,
        MACHINE,
        "latest",
        &root.join("o1"),
        &ps.kek(),
        &[],
    )
    .unwrap();
    assert!(!o.status.success(), "refused with the mark present");
    assert!(
        stderr(&o).contains("--allow-inconsistent"),
        "{}",
        stderr(&o)
    );

    // Without it, still refused.
    for m in std::fs::read_dir(&marks).unwrap() {
        std::fs::remove_file(m.unwrap().path()).unwrap();
    }
    let o = failover(
        &ps.store_url,
        MACHINE,
        "latest",
        &root.join("o2"),
        &ps.kek(),
        &[],
    )
    .unwrap();
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "failover at `latest` inside the initial sync must be refused although its mark was deleted"
    );
    assert!(
        err.contains("initial sync") && err.contains("is missing from the store"),
        "the refusal must say the stream is inside the sync and its mark is missing: {err}"
    );
}

/// A point record (validly signed) at a seq that holds a write, not a tag,
/// in a later segment than the first: failover refuses it — the catalogue
/// does not match the data — even though earlier segments end in tags.
#[test]
fn a_point_at_a_seq_without_a_tag_is_refused() {
    use lifeboat_common::catalogue;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ps, mut agent, first, _snap) = protected_with_point(root);
    qemu_io(
        &agent.uri("root"),
        &["write -P 0x5a 1M 64k", "write -P 0x5b 5M 64k"],
    )
    .unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();
    let second = agent.tag().unwrap();
    wait_stored(
        &ps.store_url,
        MACHINE,
        &[],
        second,
        Duration::from_secs(120),
    )
    .unwrap();
    agent.stop_clean();
    // The write just before the second tag, well after the first point.
    let forged = second - 1;
    assert!(
        forged > first + 1,
        "writes between the points: {first}..{second}"
    );
    let listed = points(&ps.store_url, MACHINE, &[]).unwrap();
    let real = listed["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["seq"].as_u64() == Some(second))
        .cloned()
        .expect("the second point is listed");
    let mut rec: catalogue::PointRecord = serde_json::from_value(real).unwrap();
    rec.seq = forged;
    rec.id = catalogue::point_id(forged);
    let key = catalogue_key(&ps);
    let name = catalogue::point_object(MACHINE, forged);
    std::fs::write(
        ps.dir.join("store").join(&name),
        catalogue::sign_record(&key, &name, &rec),
    )
    .unwrap();
    let out = root.join("out");
    let o = failover(
        &ps.store_url,
        MACHINE,
        &forged.to_string(),
        &out,
        &ps.kek(),
        &[],
    )
    .unwrap();
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "failover at a point whose seq holds no tag must be refused"
    );
    assert!(
        err.contains(&format!("holds no tag at seq {forged}")),
        "the refusal names the mismatch: {err}"
    );
}
