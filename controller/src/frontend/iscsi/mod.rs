//! The iSCSI target frontend (RFC 7143; SCSI per SAM-5/SPC-4/SBC-3),
//! generic over the same [`Backend`](crate::frontend::Backend) as NBD.
//!
//! Bytes come in from an initiator (open-iscsi, libiscsi tools, qemu) on a
//! TCP socket; [`server`] accepts and runs [`login`] (security stage with
//! optional one-way or mutual [`chap`], operational negotiation), then
//! [`conn`] runs the full feature phase: PDUs ([`pdu`], pure, fuzzed in
//! `controller/fuzz`) go through the command [`window`]; SCSI commands
//! are parsed (`scsi::cdb`), collect their Data-Out ([`dataout`]:
//! immediate, unsolicited, R2T-solicited) and run as [`task`]s on the
//! logical unit (`scsi::lun`: SCSI semantics over the backend, with
//! `scsi::pages` and `scsi::sense`; see [`crate::frontend::scsi`]).
//! Answers go back through one writer that stamps StatSN/ExpCmdSN/MaxCmdSN.
//!
//! One target per volume (`iqn.2026-11.io.strata:<volume>`) with one LUN
//! (0) of 4096-byte logical blocks. Negotiated: header and data digests
//! (CRC32C), MaxRecvDataSegmentLength (this target accepts 256 KiB),
//! MaxBurstLength (≤ 1 MiB), FirstBurstLength (≤ 256 KiB), InitialR2T,
//! ImmediateData, MaxOutstandingR2T (≤ 4); fixed: ErrorRecoveryLevel 0,
//! MaxConnections 1, DataPDUInOrder and DataSequenceInOrder Yes.
//!
//! Not built: error recovery levels 1 and 2 (SNACK is rejected; any
//! sequence error drops the connection), multiple connections per session,
//! persistent reservations, extended copy, protection information, ACA,
//! target/LUN reset affecting other sessions (LUN RESET aborts the tasks
//! of the session that asked), and a unit attention after a reset.
//! Capacity changes are noticed: each session raises CAPACITY DATA HAS
//! CHANGED once when the backend's size differs from what it last saw.

pub mod chap;
pub mod conn;
pub mod dataout;
pub mod error;
pub mod login;
pub mod pdu;
pub mod server;
pub mod task;
pub mod text;
pub mod window;

pub use chap::ChapConfig;
pub use conn::ConnOptions;
pub use error::ConnError;
pub use server::{serve, serve_connection, target_name, IscsiOptions, Target};
