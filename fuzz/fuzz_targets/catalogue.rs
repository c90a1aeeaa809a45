//! The store's signed JSON records as read before their signature is checked
//! (`catalogue::open_record_unverified`): machine, point, checksum and epoch
//! records, base manifests, group records and indexes, owner records.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lifeboat_common::base::BaseManifest;
use lifeboat_common::catalogue::{open_record_unverified, MachineRecord, PointRecord, SumsRecord};
use lifeboat_common::group::{GroupIndex, GroupRecord};
use lifeboat_common::owner::OwnerRecord;
use lifeboat_common::store::{Store, StoreConfig};

fn store() -> &'static Store {
    static S: OnceLock<Store> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join("lifeboat-fuzz-store");
        std::fs::create_dir_all(&dir).unwrap();
        Store::open(&StoreConfig {
            url: format!("file://{}", dir.display()),
            options: Default::default(),
        })
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let s = store();
    let _ = open_record_unverified::<MachineRecord>(s, "machines/m-1/machine.json", data);
    let _ = open_record_unverified::<PointRecord>(s, "machines/m-1/points/1.json", data);
    let _ = open_record_unverified::<SumsRecord>(s, "machines/m-1/sums/1.json", data);
    let _ = open_record_unverified::<BaseManifest>(s, "machines/m-1/bases/1.json", data);
    let _ = open_record_unverified::<GroupRecord>(s, "machines/m-1/groups/g/1.json", data);
    let _ = open_record_unverified::<GroupIndex>(s, "groups/g/1.json", data);
    let _ = serde_json::from_slice::<OwnerRecord>(data);
});
