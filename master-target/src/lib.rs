//! `lifeboat-mt`, the master target: lists recovery points and materialises
//! them into disk images (failover, test failover), reading only the object store.
//!
//! Modules: [`materialize`] (point resolution and image writing), [`group`]
//! (consistency-group points: listing, authentication, choice).

pub mod group;
pub mod materialize;
