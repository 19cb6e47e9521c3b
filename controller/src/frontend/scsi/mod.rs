//! SCSI over a [`Backend`](crate::frontend::Backend) (SAM-5, SPC-4,
//! SBC-3), independent of the transport that carries it (today iSCSI):
//!
//! - [`cdb`]: command descriptor blocks parsed into a typed [`cdb::Command`];
//! - [`lun`]: the logical unit: each command's semantics on the backend,
//!   the capacity-changed unit attention;
//! - [`pages`]: INQUIRY, VPD and mode pages;
//! - [`sense`]: status codes and sense data, and how a
//!   [`BackendError`](crate::frontend::BackendError) becomes sense.

pub mod cdb;
pub mod lun;
pub mod pages;
pub mod sense;
