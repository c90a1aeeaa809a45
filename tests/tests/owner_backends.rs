//! The ownership record's conditional puts on every backend, real servers
//! included: create-if-absent, an ETag-matched takeover that bumps the epoch,
//! a stale ETag refused, and a server that lost the machine told so by name.

use lifeboat_common::catalogue::CatalogueKey;
use lifeboat_common::owner::{self, Claim, ServerIdentity};
use lifeboat_common::seal::Key;
use lifeboat_common::store::{Store, StoreConfig};
use lifeboat_tests::peers::{Azurite, S3sFs};
use lifeboat_tests::ObjectStorePeer;

fn me(id: &str) -> ServerIdentity {
    ServerIdentity {
        id: id.into(),
        address: format!("host-{id} 127.0.0.1:9443"),
    }
}

async fn ownership_rules(cfg: &StoreConfig) {
    let store = Store::open(cfg).unwrap();
    let key = CatalogueKey::derive(&Key::from_bytes([3; 32]));
    let m = "machine-1";
    let (a, b) = (me("aaaa"), me("bbbb"));

    // First claim creates epoch 1.
    let Claim::Owned { held: ha, previous } =
        owner::claim(&store, &key, m, &a, None).await.unwrap()
    else {
        panic!("{}: first claim must own", cfg.url)
    };
    assert_eq!((ha.record.epoch, previous), (1, None), "{}", cfg.url);
    // The same server again: confirmed, same epoch.
    let Claim::Owned { held, .. } = owner::claim(&store, &key, m, &a, Some(1)).await.unwrap()
    else {
        panic!("{}: re-claim by the owner", cfg.url)
    };
    assert_eq!(held.record.epoch, 1);

    // A server that never held it takes it over at epoch 2.
    let Claim::Owned { held: hb, previous } =
        owner::claim(&store, &key, m, &b, None).await.unwrap()
    else {
        panic!("{}: takeover", cfg.url)
    };
    assert_eq!(hb.record.epoch, 2, "{}", cfg.url);
    assert_eq!(previous.map(|p| p.server), Some("aaaa".into()));

    // A's stale ETag cannot swap the record back.
    let body = bytes::Bytes::from_static(b"{}");
    let swapped = store
        .update_versioned(&owner::owner_object(m), body, &ha.etag)
        .await
        .unwrap();
    assert!(
        swapped.is_none(),
        "{}: a stale ETag must not update",
        cfg.url
    );

    // A, which held epoch 1, is fenced, and told who owns the machine.
    let mut stale = ha.clone();
    let by = owner::verify(&store, &key, m, &mut stale).await.unwrap();
    assert_eq!(by.map(|o| o.server), Some("bbbb".into()), "{}", cfg.url);
    match owner::claim(&store, &key, m, &a, Some(1)).await.unwrap() {
        Claim::Fenced { by, held_epoch } => {
            assert_eq!((by.server.as_str(), by.epoch, held_epoch), ("bbbb", 2, 1));
            assert!(by.to_string().contains("host-bbbb"), "{by}");
        }
        other => panic!("{}: A must be fenced, got {other:?}", cfg.url),
    }
    // B still verifies cheaply.
    let mut hb = hb;
    assert!(owner::verify(&store, &key, m, &mut hb)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend() {
    let tmp = tempfile::tempdir().unwrap();
    ownership_rules(&StoreConfig::new(format!(
        "file://{}",
        tmp.path().join("store").display()
    )))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_backend() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let az = Azurite::start(tmp.path()).unwrap();
    ownership_rules(&az.config("own")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_backend() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3sFs::start(tmp.path()).unwrap();
    ownership_rules(&s3.config("own")).await;
}
