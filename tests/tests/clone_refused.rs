//! Two agents with one machine identity (a cloned VM: same machine id, same
//! certificate, its own disks and state) never mix their disks into one
//! replica: while the first is connected the second is refused, by name.

use std::time::Duration;

use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

#[test]
fn a_clone_with_another_stream_is_refused_while_the_original_is_live() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 16 * MIB;
    let mut rng = Rng(0xc10e);
    let (ps, original) = synced_random_disk(root, size, &mut rng, |ps| ps.port);

    // The clone: same machine id and certificate, a disk that went its own way.
    let certs = ps.dir.join("machines").join(MACHINE);
    let mut clone = Agent::configure(
        &root.join("clone"),
        MACHINE,
        &certs,
        ps.port,
        &[("root", size)],
        "",
    )
    .unwrap();
    fill_random(&clone.image("root"), 0, size, &mut Rng(0xbad));
    clone.start().unwrap();
    let refusal = wait_for("the clone to be refused", Duration::from_secs(30), || {
        clone
            .proc
            .as_ref()
            .unwrap()
            .log_text()
            .lines()
            .find(|l| l.contains("two agents claim one machine"))
            .map(String::from)
    });
    // Long enough for a merge (a rebase and resync of 16 MiB) to happen.
    std::thread::sleep(Duration::from_secs(5));
    let ps_log = ps.log();
    let clone_log = clone.proc.as_ref().unwrap().log_text();
    clone.proc.as_mut().unwrap().kill9();
    // The replica is the original's disk, at a point taken after the clone tried.
    let seq = original.tag().unwrap();
    let out = root.join("out");
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(60)).unwrap();
    ps.failover_ok(MACHINE, &seq.to_string(), &out);
    assert_same(&out.join("root.raw"), &original.image("root"));
    assert!(
        original.status().unwrap()["state"] == "streaming",
        "the original keeps streaming"
    );
    let refusal =
        refusal.unwrap_or_else(|e| panic!("{e}\nclone log:\n{clone_log}\nPS log:\n{ps_log}"));
    // Both sides are named: the live connection's and the clone's stream ids
    // and peer addresses.
    assert!(
        refusal.matches("stream ").count() >= 2 && refusal.matches("127.0.0.1:").count() >= 2,
        "the refusal names both sides: {refusal}"
    );
}
