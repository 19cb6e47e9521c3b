//! Running one request against the store: on the connection's task when
//! it cannot wait for the disk or another request ([`run_inline`]),
//! otherwise on the blocking pool ([`execute`], [`execute_on_snapshot`]);
//! the epoch fence every data request passes first ([`fence`]) and the
//! store's results as replies ([`store_reply`], [`store_status`]).

use bytes::Bytes;

use super::{read_buffers, read_pieces};
use crate::store::WriteClass;
use crate::wire::{self, Command, Reply, Status};
use crate::{error_chain, Store, StoreError, View};

/// The reply to a request whose store call panicked.
pub(super) fn panicked(store: &Store, id: u64) -> Reply {
    tracing::error!(request = id, "replica request panicked");
    Reply::error(
        id,
        store.epoch(),
        Status::IoError,
        "Internal error: the request panicked",
    )
}

/// Where a request runs.
pub(super) enum Inline {
    /// It ran on the connection's task; this is its reply.
    Done(Reply),
    /// It may wait for the disk: run it on the blocking pool.
    Blocking(Command, Tried),
}

/// What [`run_inline`] did with a read it passed on to the blocking pool.
pub(super) enum Tried {
    /// Nothing that matters to the pool.
    Nothing,
    /// A copy's read tried the page cache and missed: its pages are read
    /// and dropped, without trying the cache again (the miss's readahead
    /// would be found there and kept).
    CacheMissed,
    /// READ_PIECES read `done` pieces from the cache into `data`, and
    /// missed on the next one.
    PiecesMissed { data: Vec<u8>, done: usize },
}

/// Runs on the connection's own task what does not wait for the disk or
/// for another request: the epoch fence, writes into the page cache (not
/// FUA) and reads (a copy's too) whose pages are all cached. That saves a
/// thread hand-off per request, which cost more CPU than the IO itself.
/// Flushes, FUA writes, trims, reads that miss the cache, snapshot reads
/// and anything meeting a chain change go to the blocking pool.
pub(super) fn run_inline(
    store: &Store,
    view: Option<&str>,
    id: u64,
    epoch: u64,
    command: Command,
) -> Inline {
    if let Err(reply) = fence(store, id, epoch) {
        return Inline::Done(reply);
    }
    if view.is_some() {
        return Inline::Blocking(command, Tried::Nothing);
    }
    match command {
        Command::Write {
            offset,
            data,
            fua: false,
        } => match store.write_unless_busy(WriteClass::Client, offset, &data) {
            Ok(true) => Inline::Done(store_reply(store, id, Ok(Bytes::new()))),
            Ok(false) => Inline::Blocking(
                Command::Write {
                    offset,
                    data,
                    fua: false,
                },
                Tried::Nothing,
            ),
            Err(e) => Inline::Done(store_reply(store, id, Err(e))),
        },
        // A copy's read of cached pages is the same read: the source
        // drops only what a copy brought into its cache.
        Command::Read { offset, len } | Command::ReadForCopy { offset, len }
            if len <= INLINE_READ_MAX =>
        {
            let mut data = read_buffers::take(len as usize);
            match store.read_cached(offset, &mut data) {
                Ok(true) => {
                    Inline::Done(store_reply(store, id, Ok(read_buffers::into_bytes(data))))
                }
                Ok(false) => {
                    read_buffers::give_back(data);
                    Inline::Blocking(command, Tried::CacheMissed)
                }
                Err(e) => Inline::Done(store_reply(store, id, Err(e))),
            }
        }
        Command::ReadPieces { ref pieces, .. } if pieces.bytes() <= INLINE_READ_MAX => {
            let mut data = read_buffers::take(pieces.bytes() as usize);
            match read_pieces::read_cached(store, pieces.pieces(), &mut data) {
                Ok(None) => {
                    Inline::Done(store_reply(store, id, Ok(read_buffers::into_bytes(data))))
                }
                Ok(Some(done)) => Inline::Blocking(command, Tried::PiecesMissed { data, done }),
                Err(e) => Inline::Done(store_reply(store, id, Err(e))),
            }
        }
        command => Inline::Blocking(command, Tried::Nothing),
    }
}

/// Reads up to this long try the page cache on the connection's task;
/// longer ones go straight to the blocking pool. A read that is cached
/// only in part (common in sequential reads, where readahead is still
/// filling the end of the range) declines and is read again from the
/// start on the pool: for 1 MiB reads that second copy cost more than the
/// thread hand-off saved (`BENCHMARKS.md`, Findings).
const INLINE_READ_MAX: u32 = 128 << 10;

/// The epoch fence: a request must carry the replica's epoch exactly.
pub(super) fn fence(store: &Store, id: u64, epoch: u64) -> Result<(), Reply> {
    let current = store.epoch();
    if epoch < current {
        let msg = format!("Request epoch {epoch} is older than the replica's epoch {current}");
        return Err(Reply::error(id, current, Status::StaleEpoch, &msg));
    }
    if epoch > current {
        let msg = format!(
            "Request epoch {epoch} is newer than the replica's epoch {current}; set it first"
        );
        return Err(Reply::error(id, current, Status::EpochAhead, &msg));
    }
    Ok(())
}

/// Runs one data request against the bound store, or against snapshot
/// `view` of it (on a blocking thread), carrying on from what `run_inline`
/// `tried`.
pub(super) fn execute(
    store: &Store,
    view: Option<&str>,
    id: u64,
    epoch: u64,
    command: Command,
    tried: Tried,
) -> Reply {
    if let Err(reply) = fence(store, id, epoch) {
        return reply;
    }
    if let Some(snapshot) = view {
        return execute_on_snapshot(store, snapshot, id, command);
    }
    let result: Result<Bytes, StoreError> = match command {
        Command::Read { offset, len } => {
            let mut data = read_buffers::take(len as usize);
            store
                .read(offset, &mut data)
                .map(|()| read_buffers::into_bytes(data))
        }
        Command::ReadForCopy { offset, len } => {
            let mut data = read_buffers::take(len as usize);
            if matches!(tried, Tried::CacheMissed) {
                store.read_for_copy_uncached(offset, &mut data)
            } else {
                store.read_for_copy(offset, &mut data)
            }
            .map(|()| read_buffers::into_bytes(data))
        }
        Command::ReadPieces { pieces, for_copy } => {
            let (mut data, done, missed) = match tried {
                Tried::PiecesMissed { data, done } => (data, done, true),
                _ => (read_buffers::take(pieces.bytes() as usize), 0, false),
            };
            read_pieces::read_rest(store, pieces.pieces(), &mut data, done, for_copy, missed)
                .map(|()| read_buffers::into_bytes(data))
        }
        Command::Write { offset, data, fua } => store
            .write(offset, &data)
            .and_then(|()| if fua { store.flush() } else { Ok(()) })
            .map(|()| Bytes::new()),
        Command::Flush => store.flush().map(|()| Bytes::new()),
        Command::Trim { offset, len } => store.trim(offset, len.into()).map(|()| Bytes::new()),
        Command::WriteZeroes {
            offset,
            len,
            no_hole,
        } => store
            .write_zeroes(offset, len.into(), !no_hole)
            .map(|()| Bytes::new()),
        Command::BlockStatus { offset, len } => store
            .allocation(offset, len.into())
            .map(|e| wire::encode_extents(&e)),
        Command::Snapshot { name } => store.snapshot(&name).map(|()| Bytes::new()),
        Command::Hello { .. } | Command::Ping | Command::Pull { .. } => {
            unreachable!("answered by the reader")
        }
    };
    store_reply(store, id, result)
}

/// READ and BLOCK_STATUS of a snapshot; everything else is refused.
fn execute_on_snapshot(store: &Store, snapshot: &str, id: u64, command: Command) -> Reply {
    let view = View::Snapshot(snapshot);
    let result = match command {
        Command::Read { offset, len } | Command::ReadForCopy { offset, len } => {
            let mut data = read_buffers::take(len as usize);
            store
                .read_view(view, offset, &mut data)
                .map(|()| read_buffers::into_bytes(data))
        }
        Command::ReadPieces { pieces, .. } => {
            let mut data = read_buffers::take(pieces.bytes() as usize);
            let mut at = 0;
            pieces
                .pieces()
                .iter()
                .try_for_each(|&(offset, len)| {
                    let piece = &mut data[at..at + len as usize];
                    at += len as usize;
                    store.read_view(view, offset, piece)
                })
                .map(|()| read_buffers::into_bytes(data))
        }
        Command::BlockStatus { offset, len } => store
            .allocation_view(view, offset, len.into())
            .map(|e| wire::encode_extents(&e)),
        _ => {
            let msg = format!("The connection reads snapshot {snapshot:?}: it changes nothing");
            return Reply::error(id, store.epoch(), Status::Invalid, &msg);
        }
    };
    store_reply(store, id, result)
}

pub(super) fn store_reply(store: &Store, id: u64, result: Result<Bytes, StoreError>) -> Reply {
    match result {
        Ok(payload) => Reply::with_payload(id, store.epoch(), Status::Ok, payload),
        Err(e) => {
            let status = store_status(&e);
            if matches!(status, Status::IoError | Status::Corrupt) {
                tracing::warn!(dir = ?store.dir(), error = %error_chain(&e), "replica request failed");
            }
            Reply::error(id, store.epoch(), status, &error_chain(&e))
        }
    }
}

/// How a store error is reported on the wire. Request-shaped errors
/// (range, alignment, snapshot names, sizes) are INVALID so the controller
/// does not fault a healthy replica for them.
pub(crate) fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::Unaligned { .. }
        | StoreError::OutOfRange { .. }
        | StoreError::InvalidName(_)
        | StoreError::SnapshotExists(_)
        | StoreError::NoSuchSnapshot(_)
        | StoreError::NewerSnapshots { .. }
        | StoreError::BadSize { .. } => Status::Invalid,
        StoreError::Checksum { .. } | StoreError::CorruptMap { .. } => Status::Corrupt,
        _ => Status::IoError,
    }
}
