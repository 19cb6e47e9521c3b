//! The NBD server frontend (NetworkBlockDevice/nbd `doc/proto.md`),
//! generic over a [`Backend`].
//!
//! Bytes come in from an NBD client (kernel `nbd-client`, qemu, nbdcopy,
//! libnbd tools) on a TCP socket; [`serve`] accepts, [`handshake`] runs
//! the fixed newstyle negotiation (EXPORT_NAME, GO, INFO, LIST, ABORT,
//! STRUCTURED_REPLY, SET/LIST_META_CONTEXT with `base:allocation`, and
//! STARTTLS: [`tls`] then runs TLS with the volume's pre-shared key from
//! [`psk`], offered or required, and everything after it goes through
//! TLS), and
//! [`transmission`] parses pipelined requests, validates them, and hands
//! them to [`ops::Export`], which aligns them to 4096-byte blocks and
//! calls the [`Backend`](crate::frontend::Backend) (the replicator in
//! production, `MemBackend` in tests). Replies go back through one writer, possibly out of order.
//!
//! - [`proto`]: the wire format, pure parsers and encoders (fuzzed in
//!   `controller/fuzz`);
//! - [`error`]: why a connection ended, and [`nbd_errno`]: a backend
//!   failure as an NBD error number;
//! - [`psk`]: the per-volume TLS key derived from the cluster key and the
//!   psktool file clients read; [`tls`]: the OpenSSL server side;
//! - [`handshake`], [`transmission`], [`ops`], [`server`]: the server.
//!
//! Choices worth knowing: `NBD_FLAG_CAN_MULTI_CONN` is advertised (a
//! backend must make flush cover writes completed on any connection);
//! `NBD_CMD_FLAG_FAST_ZERO` succeeds when holes may be punched (zeroing is
//! metadata) and fails with `ENOTSUP` together with `NO_HOLE`;
//! `NBD_FLAG_SEND_DF` is advertised with structured replies because a
//! read is always answered in one chunk. Without TLS configured STARTTLS
//! gets `NBD_REP_ERR_POLICY`. Not implemented: extended headers,
//! `NBD_CMD_CACHE`, `NBD_CMD_RESIZE`, read-only exports, TLS with
//! certificates.

pub mod error;
pub mod handshake;
pub mod ops;
pub mod proto;
pub mod psk;
pub mod server;
pub mod tls;
pub mod transmission;

pub use error::{nbd_errno, ConnError};
pub use ops::Export;
pub use psk::Psk;
pub use server::{serve, serve_connection};
pub use tls::{NbdTls, TlsMode};
