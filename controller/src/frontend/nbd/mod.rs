//! The NBD server frontend (NetworkBlockDevice/nbd `doc/proto.md`),
//! generic over a [`Backend`].
//!
//! Bytes come in from an NBD client (kernel `nbd-client`, qemu, nbdcopy,
//! libnbd tools) on a TCP socket; [`serve`] accepts, [`handshake`] runs
//! the fixed newstyle negotiation (EXPORT_NAME, GO, INFO, LIST, ABORT,
//! STRUCTURED_REPLY, SET/LIST_META_CONTEXT with `base:allocation`), and
//! [`transmission`] parses pipelined requests, validates them, and hands
//! them to [`ops::Export`], which aligns them to 4096-byte blocks and
//! calls the backend (the replicator in production, [`MemBackend`] in
//! tests). Replies go back through one writer, possibly out of order.
//!
//! - [`proto`]: the wire format, pure parsers and encoders (fuzzed in
//!   `controller/fuzz`);
//! - [`backend`]: the [`Backend`] trait and [`BackendError`] → NBD errno;
//! - [`mem`]: [`MemBackend`], an in-memory sparse backend;
//! - [`handshake`], [`transmission`], [`ops`], [`server`]: the server.
//!
//! Choices worth knowing: `NBD_FLAG_CAN_MULTI_CONN` is advertised (a
//! backend must make flush cover writes completed on any connection);
//! `NBD_CMD_FLAG_FAST_ZERO` succeeds when holes may be punched (zeroing is
//! metadata) and fails with `ENOTSUP` together with `NO_HOLE`;
//! `NBD_FLAG_SEND_DF` is advertised with structured replies because a
//! read is always answered in one chunk. Not implemented: TLS (STARTTLS
//! gets `NBD_REP_ERR_POLICY`), extended headers, `NBD_CMD_CACHE`,
//! `NBD_CMD_RESIZE`, read-only exports.

pub mod backend;
pub mod error;
pub mod handshake;
pub mod mem;
pub mod ops;
pub mod proto;
pub mod server;
pub mod transmission;

pub use backend::{Backend, BackendError, BLOCK_SIZE};
pub use error::ConnError;
pub use mem::{FailOn, MemBackend, MemStats};
pub use ops::Export;
pub use server::{serve, serve_connection};
