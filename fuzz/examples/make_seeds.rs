//! Writes the seed corpus, `fuzz/corpus/<target>/`, from the real encoders:
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --example make_seeds`.
//! The committed corpus is its output; `bench/fuzz.sh` adds what the fuzzer
//! finds interesting to a copy outside the clone.

use std::path::Path;

use bytes::Bytes;
use lifeboat_common::catalogue::encode_segment;
use lifeboat_common::protocol::{
    DiskInfo, DiskSum, Entry, Frame, Hello, Op, PartialBlock, ResyncReport, TagKind, TagSource,
};
use lifeboat_common::register::{passphrase_key, Message, Reply, Request};

fn entries() -> Vec<Entry> {
    let ops = vec![
        Op::Write {
            disk: 0,
            offset: 4096,
            data: Bytes::from(vec![0x5a; 600]),
        },
        Op::Zero {
            disk: 1,
            offset: 1 << 20,
            len: 65536,
        },
        Op::Tag {
            kind: TagKind::App,
            source: Some(TagSource::Fsfreeze),
            time_ms: 1_700_000_000_000,
            label: "before-upgrade".into(),
        },
        Op::Resize {
            disk: 0,
            size: 8 << 20,
        },
        Op::Inconsistent {
            label: "initial-sync".into(),
        },
        Op::Sums {
            point: 12,
            disks: vec![DiskSum {
                disk: 0,
                size: 8 << 20,
                sum: [7; 32],
            }],
        },
        Op::Hashes {
            disk: 0,
            blocks: vec![PartialBlock {
                block: 3,
                before: [1; 16],
                after: [2; 16],
            }],
        },
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Entry {
            seq: 10 + i as u64,
            op,
        })
        .collect()
}

fn frames() -> Vec<Frame> {
    let es = entries();
    vec![
        Frame::Hello(Hello {
            min_version: 3,
            max_version: 8,
            machine: "web-1".into(),
            disks: vec![
                DiskInfo::new("root", 8 << 20),
                DiskInfo {
                    id: "old".into(),
                    size: 4096,
                    retired: true,
                },
            ],
            stream_id: [9; 16],
        }),
        Frame::Welcome {
            version: 7,
            durable: 9,
            max_frame: 1 << 20,
            stream_id: [9; 16],
        },
        Frame::Writes(es[..2].to_vec()),
        Frame::Tag(es[2].clone()),
        Frame::Writes(es[3..].to_vec()),
        Frame::Ack { durable: 15 },
        Frame::Error {
            code: 3,
            message: "not allowed".into(),
        },
        Frame::Ping {
            nonce: 77,
            reply: true,
        },
        Frame::ResyncStart { disks: vec![0, 1] },
        Frame::RegionHashes {
            disk: 0,
            first_region: 2,
            hashes: vec![[1; 16], [2; 16]],
        },
        Frame::RegionsDiffer {
            disk: 0,
            first_region: 2,
            count: 2,
            regions: vec![3],
        },
        Frame::BlockHashes {
            disk: 0,
            region: 3,
            hashes: vec![[4; 8]; 3],
        },
        Frame::BlocksDiffer {
            disk: 0,
            region: 3,
            blocks: vec![0, 2],
        },
        Frame::ResyncDone(ResyncReport {
            disk_count: 1,
            hashed_bytes: 8 << 20,
            hash_bytes: 64,
            block_bytes: 8192,
            blocks: 2,
            tag_seq: 16,
            error: String::new(),
        }),
        Frame::GroupPrepare {
            id: 5,
            hold_ms: 10_000,
            group: "billing".into(),
        },
        Frame::GroupPrepared {
            id: 5,
            error: String::new(),
        },
        Frame::GroupCommit {
            id: 5,
            label: "g".into(),
        },
        Frame::GroupCommitted {
            id: 5,
            seq: 17,
            error: String::new(),
        },
        Frame::GroupRelease { id: 5 },
        Frame::GroupQuiesce {
            id: 6,
            quiesce_ms: 1000,
            hold_ms: 1000,
            group: "billing".into(),
        },
        Frame::GroupQuiesced {
            id: 6,
            source: Some(TagSource::Fsfreeze),
            error: String::new(),
        },
        Frame::FinalPoint {
            id: 7,
            quiesce_ms: 1000,
            label: "final".into(),
        },
        Frame::FinalPointTaken {
            id: 7,
            seq: 18,
            source: None,
            error: String::new(),
        },
    ]
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// A client's side of an NBD session: fixed newstyle, OPT_LIST, OPT_INFO,
/// OPT_GO "disk", then requests and a disconnect.
fn nbd_session(requests: &[(u16, u16, u64, u32, Vec<u8>)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&3u32.to_be_bytes()); // client flags: fixed newstyle, no zeroes
    let opt = |v: &mut Vec<u8>, code: u32, data: &[u8]| {
        v.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    };
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    opt(&mut v, 3, &[]); // LIST
    opt(&mut v, 6, &go); // INFO
    opt(&mut v, 7, &go); // GO
    for (i, (flags, ty, offset, len, data)) in requests.iter().enumerate() {
        v.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&(i as u64).to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(data);
    }
    v.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 2]); // DISC
    v.extend_from_slice(&[0; 20]);
    v
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (i, f) in frames().iter().enumerate() {
        put(
            &root.join("frame"),
            &format!("seed-{i:02}"),
            &f.to_bytes()[4..],
        );
    }

    let es = entries();
    for (i, part) in [&es[..], &es[..1], &es[2..3]].iter().enumerate() {
        let mut v = Vec::new();
        v.extend_from_slice(&part[0].seq.to_be_bytes());
        v.extend_from_slice(&part[part.len() - 1].seq.to_be_bytes());
        v.extend_from_slice(&encode_segment("m-1", part));
        put(&root.join("segment"), &format!("seed-{i:02}"), &v);
    }

    let mut journal = Vec::new();
    for e in &es {
        lifeboat_agent::journal::encode_record(&mut journal, e);
    }
    put(&root.join("journal"), "seed-00", &journal);
    put(
        &root.join("journal"),
        "seed-01-torn",
        &journal[..journal.len() - 7],
    );
    put(
        &root.join("journal"),
        "seed-02-fixture",
        include_bytes!("../../common/fixtures/journal-v1.bin"),
    );

    for (i, bits) in [vec![true, false, true], vec![false; 40], vec![true; 17]]
        .iter()
        .enumerate()
    {
        let mut v = (bits.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(&lifeboat_agent::dirty::encode(bits));
        put(&root.join("activity_log"), &format!("seed-{i:02}"), &v);
    }

    let k = passphrase_key("ABCDE-FGHJK").unwrap();
    let q = Request::new(&k, &[1; 32], "web-1", vec![0x30, 0x82, 1, 2, 3]);
    let msgs = [
        Message::Register(q.clone()),
        Message::Registered(Reply::new(
            &k,
            &[1; 32],
            &q,
            "-----BEGIN CERTIFICATE-----\n".into(),
            "ca".into(),
        )),
        Message::Refused {
            code: 1,
            message: "wrong passphrase".into(),
        },
    ];
    for (i, m) in msgs.iter().enumerate() {
        put(
            &root.join("register"),
            &format!("seed-{i:02}"),
            &m.encode()[4..],
        );
    }

    let write = (0u16, 1u16, 4096u64, 512u32, vec![0xab; 512]);
    let fua_write = (1, 1, 8191, 3000, vec![0xcd; 3000]);
    let read = (0, 0, 0, 65536, vec![]);
    let past_end = (0, 0, (8 << 20) - 100, 4096, vec![]);
    let zero = (0, 6, 1 << 20, 1 << 20, vec![]);
    let trim = (0, 4, 0, 4096, vec![]);
    let flush = (0, 3, 0, 0, vec![]);
    put(
        &root.join("nbd_server"),
        "seed-00",
        &nbd_session(&[write, read.clone(), flush.clone()]),
    );
    put(
        &root.join("nbd_server"),
        "seed-01",
        &nbd_session(&[fua_write, zero, trim, past_end, read, flush]),
    );
    put(&root.join("nbd_server"), "seed-02-oldstyle-name", &{
        let mut v = 1u32.to_be_bytes().to_vec();
        v.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&4u32.to_be_bytes());
        v.extend_from_slice(b"disk");
        v
    });

    // Catalogue records: the shapes the store holds (signature not checked
    // by the target; these only steer it into each record's fields).
    let recs = [
        r#"{"signed":1,"record":"{\"machine\":\"m-1\",\"disks\":[{\"id\":\"root\",\"size\":8388608}],\"created\":\"2026-12-01T00:00:00Z\"}","mac":"00"}"#,
        r#"{"signed":1,"record":"{\"machine\":\"m-1\",\"seq\":12,\"kind\":\"app\",\"time\":\"2026-12-01T00:00:00Z\",\"label\":\"x\",\"segment\":\"00000000000000000001-00000000000000000012\"}","mac":"00"}"#,
        r#"{"signed":1,"record":"{\"machine\":\"m-1\",\"seq\":40,\"disks\":[{\"id\":\"root\",\"size\":8388608,\"chunks\":[\"ab\",null]}]}","mac":"00"}"#,
        r#"{"server":{"id":"b722e75a26a0b288","address":"127.0.0.1:9443"},"epoch":3}"#,
    ];
    for (i, r) in recs.iter().enumerate() {
        put(
            &root.join("catalogue"),
            &format!("seed-{i:02}"),
            r.as_bytes(),
        );
    }
    println!("seed corpus written to {}", root.display());
}
