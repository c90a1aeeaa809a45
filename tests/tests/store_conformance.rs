//! One conformance suite for `lifeboat_common::store::Store`, run against three
//! real backends: `file://` (a temporary directory), Azurite (`az://`) and s3s-fs
//! (`s3://`). The servers come from `lifeboat_tests::peers` and are stopped by PID.
//!
//! The servers are installed by `scripts/install-deps.sh`; without them the Azurite
//! and s3s-fs tests fail with a message naming that script.

use std::time::Duration;

use bytes::Bytes;
use lifeboat_common::store::{Store, StoreConfig, StoreError};
use lifeboat_tests::free_port;
use lifeboat_tests::peers::{
    Azurite, ObjectStorePeer, S3sFs, AZURITE_ACCOUNT, AZURITE_KEY, S3_ACCESS_KEY, S3_SECRET_KEY,
};

const MIB: usize = 1024 * 1024;
/// Bounds every store call; object_store's retry policy caps at 3 minutes.
const OP_TIMEOUT: Duration = Duration::from_secs(240);

/// Deterministic, non-repeating-at-small-scale content.
fn pattern(len: usize, seed: u8) -> Bytes {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {OP_TIMEOUT:?}"))
}

/// Every case, against one store config (its prefix must be empty).
async fn conformance(cfg: &StoreConfig) {
    let store = Store::open(cfg).unwrap_or_else(|e| panic!("opening {}: {e}", cfg.url));
    let name = cfg.url.clone();

    // Empty prefix lists nothing.
    assert_eq!(
        bounded("list", store.list("")).await.unwrap(),
        vec![],
        "{name}: fresh store not empty"
    );

    // Round trips of 0 B, 1 B and 5 MiB.
    for (rel, len, seed) in [
        ("rt/empty", 0, 1u8),
        ("rt/one", 1, 2),
        ("rt/five-mib", 5 * MIB, 3),
    ] {
        let data = pattern(len, seed);
        bounded("put", store.put(rel, data.clone())).await.unwrap();
        let got = bounded("get", store.get(rel))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: {rel} missing right after put"));
        assert_eq!(got.len(), len, "{name}: {rel} size");
        assert!(got == data, "{name}: {rel} content differs");
    }
    // Overwrite replaces.
    let v2 = pattern(1000, 9);
    bounded("put", store.put("rt/one", v2.clone()))
        .await
        .unwrap();
    assert_eq!(
        bounded("get", store.get("rt/one")).await.unwrap(),
        Some(v2),
        "{name}: overwrite"
    );

    // Missing object.
    assert_eq!(
        bounded("get", store.get("rt/absent")).await.unwrap(),
        None,
        "{name}: missing object"
    );
    assert_eq!(
        bounded("get", store.get("nowhere/deep/absent"))
            .await
            .unwrap(),
        None,
        "{name}: missing in missing dir"
    );

    // Listing: sorted relative names with sizes, nothing outside the prefix —
    // including siblings sharing the prefix's leading characters ("ls/a" vs "ls/ab").
    let objects = [
        ("ls/a/3", 3usize),
        ("ls/a/1", 1),
        ("ls/a/sub/2", 2),
        ("ls/ab/x", 7),
        ("ls/b", 4),
        ("ls/a-sibling", 5),
    ];
    for (rel, len) in objects {
        bounded("put", store.put(rel, pattern(len, len as u8)))
            .await
            .unwrap();
    }
    assert_eq!(
        bounded("list", store.list("ls/a")).await.unwrap(),
        vec![
            ("ls/a/1".to_string(), 1),
            ("ls/a/3".to_string(), 3),
            ("ls/a/sub/2".to_string(), 2)
        ],
        "{name}: list ls/a"
    );
    assert_eq!(
        bounded("list", store.list("ls/a/")).await.unwrap(),
        bounded("list", store.list("ls/a")).await.unwrap(),
        "{name}: trailing slash in the prefix"
    );
    let all_ls = bounded("list", store.list("ls")).await.unwrap();
    let mut expected: Vec<(String, u64)> = objects
        .iter()
        .map(|(r, l)| (r.to_string(), *l as u64))
        .collect();
    expected.sort();
    assert_eq!(all_ls, expected, "{name}: list ls");
    assert_eq!(
        bounded("list", store.list("nothing-here")).await.unwrap(),
        vec![],
        "{name}: list of a missing prefix"
    );
    let everything = bounded("list", store.list("")).await.unwrap();
    assert!(
        everything
            .iter()
            .any(|(r, l)| r == "rt/five-mib" && *l == 5 * MIB as u64),
        "{name}: whole listing lacks rt/five-mib: {everything:?}"
    );
    assert!(
        everything.windows(2).all(|w| w[0] < w[1]),
        "{name}: listing not sorted: {everything:?}"
    );

    // put_if_absent: creates once, then false without overwriting.
    let first = pattern(100, 20);
    assert!(
        bounded("put_if_absent", store.put_if_absent("pia/x", first.clone()))
            .await
            .unwrap(),
        "{name}: first create"
    );
    assert!(
        !bounded(
            "put_if_absent",
            store.put_if_absent("pia/x", pattern(50, 21))
        )
        .await
        .unwrap(),
        "{name}: second create must report existing"
    );
    assert_eq!(
        bounded("get", store.get("pia/x")).await.unwrap(),
        Some(first),
        "{name}: put_if_absent overwrote"
    );
    // On an object written by plain put, too.
    assert!(
        !bounded(
            "put_if_absent",
            store.put_if_absent("ls/b", Bytes::from_static(b"zz"))
        )
        .await
        .unwrap(),
        "{name}: create over put"
    );

    // Concurrent creators: exactly one wins.
    let racers: Vec<_> = (0..4u8)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move { s.put_if_absent("pia/race", pattern(64, 100 + i)).await })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        if bounded("put_if_absent race", r).await.unwrap().unwrap() {
            winners += 1;
        }
    }
    // s3s-fs 0.14.1 checks `If-None-Match: *` by a stat before writing, not
    // atomically: several concurrent creators can all succeed there (seen: 1 to 4 of
    // 4). Real S3, Azure (Azurite) and the local filesystem admit exactly one.
    if cfg.url.starts_with("s3://") {
        assert!(winners >= 1, "{name}: no creator won the race");
    } else {
        assert_eq!(winners, 1, "{name}: creators that won the race");
    }
    let raced = bounded("get", store.get("pia/race"))
        .await
        .unwrap()
        .expect("raced object exists");
    assert!(
        (0..4u8).any(|i| raced == pattern(64, 100 + i)),
        "{name}: raced object is none of the candidates"
    );

    // delete, then get is None; deleting a missing object is fine.
    bounded("delete", store.delete("ls/b")).await.unwrap();
    assert_eq!(
        bounded("get", store.get("ls/b")).await.unwrap(),
        None,
        "{name}: get after delete"
    );
    bounded("delete", store.delete("ls/b")).await.unwrap();
    assert!(
        !bounded("list", store.list("ls"))
            .await
            .unwrap()
            .iter()
            .any(|(r, _)| r == "ls/b"),
        "{name}: deleted object still listed"
    );
    // And it can be created again.
    assert!(
        bounded(
            "put_if_absent",
            store.put_if_absent("ls/b", Bytes::from_static(b"new"))
        )
        .await
        .unwrap(),
        "{name}: re-create after delete"
    );

    // A second Store from the same config (recovery with the appliance gone) sees
    // what the first wrote, and the reverse.
    let second = Store::open(cfg).unwrap();
    assert_eq!(
        bounded("get", second.get("rt/five-mib")).await.unwrap(),
        Some(pattern(5 * MIB, 3)),
        "{name}: second store reads the first's object"
    );
    assert_eq!(
        bounded("list", second.list("ls/a")).await.unwrap().len(),
        3,
        "{name}: second store's listing"
    );
    bounded(
        "put",
        second.put("from-second", Bytes::from_static(b"hello")),
    )
    .await
    .unwrap();
    drop(second);
    assert_eq!(
        bounded("get", store.get("from-second")).await.unwrap(),
        Some(Bytes::from_static(b"hello")),
        "{name}: first store reads the second's object"
    );

    // describe names the full object URL.
    assert_eq!(
        store.describe("a/b"),
        format!("{}/a/b", cfg.url.trim_end_matches('/'))
    );
}

/// Stores with the same bucket and different prefixes do not see each other.
async fn prefixes_isolate(a: &StoreConfig, b: &StoreConfig) {
    let sa = Store::open(a).unwrap();
    let sb = Store::open(b).unwrap();
    bounded("put", sa.put("only-a", Bytes::from_static(b"a")))
        .await
        .unwrap();
    assert_eq!(
        bounded("get", sb.get("only-a")).await.unwrap(),
        None,
        "{} leaks into {}",
        a.url,
        b.url
    );
    assert_eq!(
        bounded("list", sb.list("")).await.unwrap(),
        vec![],
        "{} lists {}'s objects",
        b.url,
        a.url
    );
}

/// An unreachable server: the error names the object's full URL.
async fn unreachable(cfg: &StoreConfig) {
    let store = Store::open(cfg).unwrap();
    let url = format!("{}/seg/000001", cfg.url);
    let check = |what: &str, e: StoreError| {
        let msg = e.to_string();
        assert!(
            msg.contains(&url),
            "{what}: error does not name {url}: {msg}"
        );
        assert!(
            e.is_transient(),
            "{what}: a connection failure should be transient: {msg}"
        );
    };
    let (g, p) = tokio::join!(
        bounded("get from an unreachable server", store.get("seg/000001")),
        bounded(
            "put to an unreachable server",
            store.put("seg/000001", Bytes::from_static(b"x"))
        ),
    );
    check(
        "get",
        g.expect_err("get from a port with nothing listening succeeded"),
    );
    check(
        "put",
        p.expect_err("put to a port with nothing listening succeeded"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    conformance(&StoreConfig::new(format!("file://{}", dir.display()))).await;
    prefixes_isolate(
        &StoreConfig::new(format!("file://{}/p1", tmp.path().display())),
        &StoreConfig::new(format!("file://{}/p2", tmp.path().display())),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_backend() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let az = Azurite::start(tmp.path()).unwrap();
    conformance(&az.config("conf")).await;
    prefixes_isolate(&az.config("p1"), &az.config("p2")).await;
    assert!(az.store_url().starts_with("az://lifeboat/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_backend() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3sFs::start(tmp.path()).unwrap();
    conformance(&s3.config("conf")).await;
    prefixes_isolate(&s3.config("p1"), &s3.config("p2")).await;
    // The server really keeps the objects as files under the bucket directory.
    assert_eq!(
        std::fs::read(s3.data_dir.join("lifeboat/conf/from-second")).unwrap(),
        b"hello",
        "s3s-fs file layout"
    );
    assert!(s3.store_url().starts_with("s3://lifeboat/"));
}

/// Wrong credentials are refused (the servers really check signatures), and the
/// error names the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let az = Azurite::start(&tmp.path().join("az")).unwrap();
    let s3 = S3sFs::start(&tmp.path().join("s3")).unwrap();

    let mut az_cfg = az.config("creds");
    // A valid base64 key that is not the account's.
    az_cfg.options.insert(
        "azure_storage_account_key".into(),
        AZURITE_KEY.replace("Eby8", "Fby8"),
    );
    let mut s3_cfg = s3.config("creds");
    s3_cfg.options.insert(
        "aws_secret_access_key".into(),
        format!("{S3_SECRET_KEY}-wrong"),
    );

    for cfg in [&az_cfg, &s3_cfg] {
        let store = Store::open(cfg).unwrap();
        let e = bounded(
            "put with wrong credentials",
            store.put("x", Bytes::from_static(b"x")),
        )
        .await
        .expect_err(&format!("{}: put with a wrong key succeeded", cfg.url));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{}/x", cfg.url)),
            "error does not name the object: {msg}"
        );
    }
    // Sanity: the right credentials work on the same servers.
    for cfg in [az.config("creds"), s3.config("creds")] {
        let store = Store::open(&cfg).unwrap();
        bounded("put", store.put("x", Bytes::from_static(b"x")))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_s3_names_the_object() {
    lifeboat_common::tls::install_crypto_provider();
    let port = free_port();
    let cfg = StoreConfig {
        url: "s3://lifeboat/gone".into(),
        options: [
            ("aws_endpoint", format!("http://127.0.0.1:{port}")),
            ("aws_access_key_id", S3_ACCESS_KEY.into()),
            ("aws_secret_access_key", S3_SECRET_KEY.into()),
            ("aws_region", "us-east-1".into()),
            ("aws_allow_http", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    };
    unreachable(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_azure_names_the_object() {
    lifeboat_common::tls::install_crypto_provider();
    let port = free_port();
    let cfg = StoreConfig {
        url: "az://lifeboat/gone".into(),
        options: [
            ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
            ("azure_storage_account_key", AZURITE_KEY.to_string()),
            (
                "azure_endpoint",
                format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
            ),
            ("azure_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    };
    unreachable(&cfg).await;
}
