//! `lifeboat-mt`, the master target: lists recovery points and materialises
//! them into disk images (failover, test failover), reading only the object
//! store; serves agents' streams onto target disks, the way home (reprotect,
//! failback).
//!
//! Modules: [`materialize`] (point resolution and image writing), [`verify`]
//! (a point's chain and objects checked, its disks' checksums, no failover),
//! [`group`] (consistency-group points: listing, authentication, choice),
//! [`sums`] (recovered images against the checksums recorded at the point),
//! [`output`] (qcow2, existing devices and files, NBD exports; the machine
//! description and QEMU command line; drills and their cleanup),
//! [`planned`] (a planned failover's final point, asked of the process
//! server and awaited in the store), [`plan`] (recovery plans: ordered
//! groups of machines, scripts, pauses, the report), [`serve`] (the master
//! target server: agents' streams applied to target disks; its control
//! socket), [`failback`] (reprotect, failback and status, the commands of
//! the way home), [`instant`] (instant recovery: a point served as NBD
//! exports before it is copied, writes to a local overlay, hydration).

pub mod failback;
pub mod group;
pub mod instant;
pub mod materialize;
pub mod output;
pub mod plan;
pub mod planned;
pub mod serve;
pub mod sums;
pub mod verify;
