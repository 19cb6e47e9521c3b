//! Kubernetes objects strata reads and writes besides its own
//! [`crate::crd::StrataVolume`]: the VolumeSnapshot API's objects
//! ([`snapshot`]), and Events on the objects the built-in resizer and
//! snapshotter work on ([`events`]).

pub mod events;
pub mod snapshot;
