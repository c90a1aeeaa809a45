//! Two process servers on one store never splice two numberings into one
//! stream: the one that lost ownership of a machine stops uploading it.
//!
//! A first server (PS1) holds writes of machine-1 it has acknowledged but not
//! yet uploaded (a long segment age) when it is cut off; the machine, rebuilt
//! without its agent state, is protected through a rebuilt server (PS2, same
//! CA and key, empty cache, same store), which takes the machine over and
//! continues the stream from the store's end with a resync in a new numbering.
//! When PS1's segment falls due it must not be stored: PS1 logs that it lost
//! the machine, naming PS2, and every point stays byte-exact.
//!
//! PS1's ownership check and its put are two requests, so one put may still
//! land after PS2 took over. The test lands one as PS1 would have (a segment
//! and a point of epoch 1 at seqs PS2 numbers anew): no reader may count it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use lifeboat_common::catalogue::{self, SegmentName};
use lifeboat_common::protocol::{Entry, Op, TagKind};
use lifeboat_common::seal::Key;
use lifeboat_common::store::{Store, StoreConfig};
use lifeboat_tests::peers::S3sFs;
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

/// A copy of an initialised (never started) server directory as a second
/// server: same CA, certificates, key and store; its own port and cache.
fn second_server(first: &ProcessServer, dir: &Path) -> ProcessServer {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = std::process::Command::new("cp");
    cmd.arg("-a")
        .arg(format!("{}/.", first.dir.display()))
        .arg(dir);
    run_ok(&mut cmd, Duration::from_secs(30)).unwrap();
    let _ = std::fs::remove_dir_all(dir.join("cache"));
    let port = free_port();
    let cfg_path = dir.join("ps.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace(
        &format!("127.0.0.1:{}", first.port),
        &format!("127.0.0.1:{port}"),
    );
    std::fs::write(&cfg_path, cfg).unwrap();
    ProcessServer {
        dir: dir.canonicalize().unwrap(),
        port,
        store_url: first.store_url.clone(),
        proc: None,
    }
}

fn set_segment_age(ps: &ProcessServer, age: &str) {
    let p = ps.dir.join("ps.toml");
    let cfg = std::fs::read_to_string(&p).unwrap();
    let mut out = String::new();
    for l in cfg.lines() {
        if l.starts_with("segment-max-age") {
            out.push_str(&format!("segment-max-age = \"{age}\"\n"));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    std::fs::write(&p, out).unwrap();
}

fn point_agent_at(agent: &Agent, from: u16, to: u16) {
    let cfg = std::fs::read_to_string(&agent.config)
        .unwrap()
        .replace(&format!("127.0.0.1:{from}"), &format!("127.0.0.1:{to}"));
    std::fs::write(&agent.config, cfg).unwrap();
}

/// Every stored segment of the machine, with its entries (authenticated and
/// decrypted with the machine's data key).
fn stored_segments(
    ps: &ProcessServer,
    cfg: &StoreConfig,
) -> Vec<(SegmentName, Vec<lifeboat_common::protocol::Entry>)> {
    let kek = Key::from_hex(&std::fs::read_to_string(ps.kek()).unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(cfg).unwrap();
        let key = catalogue::load_data_key(&store, &kek, MACHINE)
            .await
            .unwrap();
        let mut out = Vec::new();
        for s in catalogue::list_segments(&store, MACHINE).await.unwrap() {
            let name = catalogue::segment_object(MACHINE, &s);
            let sealed = store.get(&name).await.unwrap().unwrap();
            let plain = lifeboat_common::seal::open(&key, &name, 0, &sealed).unwrap();
            out.push((s, catalogue::decode_segment(&plain, MACHINE, s).unwrap()));
        }
        out
    })
}

/// Lands what PS1 (epoch 1) would have put had its last ownership check
/// passed just before PS2 took over: a segment right after the seq PS2
/// continued from, writing 0xEE over the first MiB, ending with a tag, and
/// that tag's point. Returns the point's seq.
fn land_late_upload_of_the_old_owner(ps: &ProcessServer, cfg: &StoreConfig) -> u64 {
    let kek = Key::from_hex(&std::fs::read_to_string(ps.kek()).unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(cfg).unwrap();
        let data = catalogue::load_data_key(&store, &kek, MACHINE)
            .await
            .unwrap();
        let ck = catalogue::CatalogueKey::derive(&data);
        let fences = catalogue::list_fences(&store, Some(&ck), MACHINE)
            .await
            .unwrap();
        let took_over = fences
            .records()
            .iter()
            .find(|r| r.epoch == 2)
            .unwrap_or_else(|| panic!("PS2's takeover is recorded: {fences:?}"));
        let first = took_over.after + 1;
        let mut entries: Vec<Entry> = (0..4u64)
            .map(|i| Entry {
                seq: first + i,
                op: Op::Write {
                    disk: 0,
                    offset: i * 256 * 1024,
                    data: Bytes::from(vec![0xee; 256 * 1024]),
                },
            })
            .collect();
        let tag_seq = first + 4;
        let time_ms = lifeboat_common::now_ms();
        entries.push(Entry {
            seq: tag_seq,
            op: Op::Tag {
                kind: TagKind::Crash,
                source: None,
                time_ms,
                label: "late".into(),
            },
        });
        let name = SegmentName::new(first, tag_seq, 1);
        let obj = catalogue::segment_object(MACHINE, &name);
        let plain = catalogue::encode_segment(MACHINE, &entries);
        let sealed = lifeboat_common::seal::seal(&data, &obj, 0, &plain, 3);
        store.put(&obj, Bytes::from(sealed)).await.unwrap();
        let point = catalogue::PointRecord {
            format: catalogue::FORMAT_VERSION,
            id: catalogue::point_id(tag_seq),
            kind: TagKind::Crash,
            seq: tag_seq,
            time_ms,
            time: catalogue::format_time_ms(time_ms),
            label: "late".into(),
            disks: vec![lifeboat_common::protocol::DiskInfo::new("root", 32 * MIB)],
            epoch: 1,
            source: None,
            churn: None,
        };
        let pobj = catalogue::point_object(MACHINE, tag_seq);
        let body = Bytes::from(catalogue::sign_record(&ck, &pobj, &point));
        // Not over a point PS2 recorded itself (PS1's create-only put could not).
        assert!(
            store.put_if_absent(&pobj, body).await.unwrap(),
            "PS2 has a point at seq {tag_seq}; the test needs a free seq"
        );
        tag_seq
    })
}

#[test]
fn a_server_that_lost_the_machine_stops_uploading_it() {
    let tmp = tempfile::tempdir().unwrap();
    two_servers_one_store(tmp.path(), None);
}

#[test]
fn a_server_that_lost_the_machine_stops_uploading_it_on_s3() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3sFs::start(&tmp.path().join("s3")).unwrap();
    two_servers_one_store(tmp.path(), Some(s3.config("fencing")));
}

/// The scenario on a file:// store (`None`) or the store `cfg`.
fn two_servers_one_store(root: &Path, cfg: Option<StoreConfig>) {
    let opts: Vec<(String, String)> = cfg
        .as_ref()
        .map(|c| c.options.clone().into_iter().collect())
        .unwrap_or_default();
    let opt_refs: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let opt_args: Vec<String> = opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut ps1 = ProcessServer::init(
        &root.join("ps1"),
        cfg.as_ref().map(|c| c.url.as_str()),
        &opt_refs,
    )
    .unwrap();
    let store_cfg = cfg
        .clone()
        .unwrap_or_else(|| StoreConfig::new(ps1.store_url.clone()));
    // PS1 keeps untagged writes for a while before it uploads them.
    set_segment_age(&ps1, "25s");
    let mut ps2 = second_server(&ps1, &root.join("ps2"));
    set_segment_age(&ps2, "300ms");
    ps1.start().unwrap();

    let size = 32 * MIB;
    let certs = ps1.dir.join("machines").join(MACHINE);
    let mut agent = Agent::configure(
        &root.join("agent"),
        MACHINE,
        &certs,
        ps1.port,
        &[("root", size)],
        "",
    )
    .unwrap();
    fill_random(&agent.image("root"), 0, size, &mut Rng(0xfe11));
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    let first_point = agent.tag().unwrap();
    wait_stored(
        &ps1.store_url,
        MACHINE,
        &opt_args,
        first_point,
        Duration::from_secs(60),
    )
    .unwrap();
    let at_first: PathBuf = root.join("at-first.raw");
    snapshot(&agent.image("root"), &at_first);

    // Writes PS1 acknowledges but holds back (no tag: no cut for 25 s).
    fio_randwrite(
        &agent.uri("root"),
        &root.join("fio.json"),
        &["--bs=4k", "--size=2M", "--iodepth=4"],
    )
    .unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();
    // PS1 is cut off; the machine is rebuilt (its agent state is lost, its
    // disk kept) and protected through PS2: a new numbering continues from
    // the store's end, where PS1's held-back seqs would also go.
    agent.stop_clean();
    std::fs::remove_dir_all(agent.dir.join("state")).unwrap();
    point_agent_at(&agent, ps1.port, ps2.port);
    ps2.start().unwrap();
    agent.start().unwrap();
    if let Err(e) = agent.wait_checksum_resync(Duration::from_secs(120)) {
        panic!(
            "{e}\nagent log:\n{}\nPS2 log:\n{}",
            agent.proc.as_ref().unwrap().log_text(),
            ps2.log()
        );
    }
    let second_point = agent.tag().unwrap();
    wait_stored(
        &ps2.store_url,
        MACHINE,
        &opt_args,
        second_point,
        Duration::from_secs(60),
    )
    .unwrap();
    let at_second = root.join("at-second.raw");
    snapshot(&agent.image("root"), &at_second);

    // PS1's held-back segment falls due: it must refuse, naming PS2.
    let ps2_id = std::fs::read_to_string(ps2.dir.join("cache/server-id"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "<ps2 has no server id>".into());
    let fenced = wait_for(
        "PS1 to report it lost machine-1",
        Duration::from_secs(60),
        || {
            let log = ps1.log();
            log.lines()
                .find(|l| l.contains("FENCED") && l.contains(&ps2_id))
                .map(String::from)
        },
    );
    // Give a (wrong) upload time to land before looking at the store.
    std::thread::sleep(Duration::from_secs(3));
    let segments = stored_segments(&ps2, &store_cfg);
    for w in segments.windows(2) {
        let ((a, ea), (b, eb)) = (&w[0], &w[1]);
        if b.first <= a.last {
            // Overlap is only tolerable if it is the very same entries.
            let shared: Vec<_> = ea.iter().filter(|e| e.seq >= b.first).collect();
            let theirs: Vec<_> = eb.iter().filter(|e| e.seq <= a.last).collect();
            assert_eq!(
                shared, theirs,
                "segments {a} and {b} hold different entries for the same seqs: two numberings spliced"
            );
        }
    }
    fenced.unwrap_or_else(|e| panic!("{e}\nPS1 log:\n{}", ps1.log()));
    // ...and in its status.
    let status = ps1.status_json();
    let why = status["fenced"][MACHINE].as_str().unwrap_or_default();
    assert!(
        why.contains(&ps2_id),
        "PS1's status names the owner: {status}"
    );
    assert!(ps1.proc.as_mut().unwrap().is_running(), "PS1 keeps running");

    // A late put of PS1 is not part of the stream: its point is not listed,
    // and neither it nor its segment changes what any point recovers.
    let late = land_late_upload_of_the_old_owner(&ps2, &store_cfg);
    let listed = points(&ps2.store_url, MACHINE, &opt_args).unwrap();
    assert!(
        !listed["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["seq"].as_u64() == Some(late) || p["label"] == "late"),
        "the old owner's late point is listed: {listed}"
    );
    let o = failover(
        &ps2.store_url,
        MACHINE,
        &late.to_string(),
        &root.join("o-late"),
        &ps2.kek(),
        &opt_args,
    )
    .unwrap();
    assert!(
        !o.status.success(),
        "failover at the old owner's late point {late} succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("has no point {late}")),
        "refused because the point is not part of the stream: {err}"
    );

    // Every point recovers exactly what the disk held.
    for (point, out, want) in [
        (first_point, "o1", &at_first),
        (second_point, "o2", &at_second),
    ] {
        let o = failover(
            &ps2.store_url,
            MACHINE,
            &point.to_string(),
            &root.join(out),
            &ps2.kek(),
            &opt_args,
        )
        .unwrap();
        assert!(
            o.status.success(),
            "failover at {point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_same(&root.join(out).join("root.raw"), want);
    }
}
