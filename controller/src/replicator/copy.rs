//! Copying one range of the volume from a healthy replica to a syncing one:
//! the inner step of a resync or rebuild (`recovery.rs` holds the range's
//! lock around it).
//!
//! [`copy_steps`] turns the source's allocation map of the range into
//! steps (data pieces of at most [`COPY_PIECE`] bytes, and trims covering
//! the holes, merged); [`skip_needless_trims`] drops the trims where the
//! target reads zeros already (all of them on a rebuilt, empty replica);
//! [`copy_jobs`] reads several small pieces from the source in one
//! request: when both replicas know READ_PIECES ([`Reads::Pieces`]) up to
//! [`PIECES_READ`] bytes of them however far apart, and only their bytes;
//! otherwise ([`Reads::Spans`]) neighbours at most [`READ_GAP`] apart, in
//! one read of the span around them (the holes read as zeros and are not
//! written). [`copy_range`] runs
//! up to [`COPY_DEPTH`] jobs and [`COPY_BYTES`] at once. Jobs cover
//! disjoint ranges, so their order does not matter; what does is that a range written by 4 KiB
//! random writes (dozens of small extents per region) is not copied one
//! round trip after another.
//!
//! A job's bytes go straight from the source to the target when the target
//! can pull (PULL, [`strata_replica::wire::PullPlan`]): the controller
//! sends the plan, the target reads the source and writes. Otherwise (a
//! replica of an earlier release, or a target that cannot reach the
//! source) the controller relays them: it reads the source and writes the
//! target. Either way the source is asked to drop from its page cache what
//! the copy's reads brought in, when it knows how.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use strata_replica::auth::{self, WireMode};
use strata_replica::client::ReplicaClient;
use strata_replica::wire::{piece_slices, PieceList, PullPlan, Status};
use strata_replica::{Allocation, AllocationExtent};
use tokio::sync::Semaphore;

use super::{Slot, SyncError, Volume};

/// The two replicas of a copy, each with its data connection, and the
/// volume's IO timeout.
pub struct Ends<'a> {
    pub source: (&'a Slot, &'a ReplicaClient),
    pub target: (&'a Slot, &'a ReplicaClient),
    pub timeout: Duration,
}

/// The largest read (and write) of a copy.
pub const COPY_PIECE: u64 = 1 << 20;

/// Bytes of one range's jobs in flight at once (their reads' spans). With
/// the sync job's [`SYNC_PARALLEL`](super::recovery::SYNC_PARALLEL)
/// ranges, at most `SYNC_PARALLEL × COPY_BYTES` are held (32 MiB) when the
/// controller relays.
pub const COPY_BYTES: u32 = 4 << 20;

/// Jobs of one range in flight at once, however small: a range written by
/// 4 KiB random writes is hundreds of small jobs, each a round trip or
/// two, and four of them at a time (the bound by bytes alone for 1 MiB
/// jobs) left the replicas waiting on each other (BENCHMARKS.md,
/// "Session 17", "Deeper small copies").
pub const COPY_DEPTH: usize = 16;

/// Data pieces this close together are read from the source in one request
/// ([`Reads::Spans`]).
pub const READ_GAP: u64 = 64 << 10;

/// Bytes of data pieces one READ_PIECES gathers ([`Reads::Pieces`]): what
/// the source reads from its page cache and the target writes into its
/// own on their connections' tasks, without a thread hand-off. A rebuild
/// of 4 KiB random writes is then a request per 32 blocks rather than one
/// per few.
pub const PIECES_READ: u64 = 128 << 10;

/// How a copy reads its data pieces from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// The span around pieces at most [`READ_GAP`] apart, at most
    /// [`COPY_PIECE`] long, holes and all.
    Spans,
    /// Up to [`PIECES_READ`] bytes of pieces, however far apart, in one
    /// READ_PIECES: only their bytes cross the wire. Both replicas must
    /// know it (their status says `reads_pieces`).
    Pieces,
}

impl Reads {
    /// How a copy from `source` to `target` reads.
    pub fn between(source: &Slot, target: &Slot) -> Reads {
        if source.reads_pieces.load(Ordering::Acquire)
            && target.reads_pieces.load(Ordering::Acquire)
        {
            Reads::Pieces
        } else {
            Reads::Spans
        }
    }
}

/// One piece of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStep {
    /// Read `[offset, offset + len)` from the source, write it to the target.
    Data { offset: u64, len: u32 },
    /// Trim `[offset, offset + len)` on the target (a hole on the source).
    Trim { offset: u64, len: u32 },
}

/// One request's worth of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyJob {
    /// Write the `pieces` (offset, length; sorted, inside `[offset, offset
    /// + len)`) to the target, read from the source as `reads` says: the
    /// whole of `[offset, offset + len)`, or the pieces alone.
    Copy {
        offset: u64,
        len: u32,
        pieces: Vec<(u64, u32)>,
        reads: Reads,
    },
    /// Trim `[offset, offset + len)` on the target.
    Trim { offset: u64, len: u32 },
}

/// Groups `steps` into jobs: consecutive data pieces share one read, as
/// `reads` says (trims in between do not break it).
pub fn copy_jobs(steps: &[CopyStep], reads: Reads) -> Vec<CopyJob> {
    let mut jobs = Vec::new();
    // The read being gathered: a `CopyJob::Copy`, and its pieces' bytes.
    let mut read: Option<(CopyJob, u64)> = None;
    for step in steps {
        match *step {
            CopyStep::Trim { offset, len } => jobs.push(CopyJob::Trim { offset, len }),
            CopyStep::Data { offset, len } => {
                let end = offset + u64::from(len);
                if let Some((
                    CopyJob::Copy {
                        offset: from,
                        len: span,
                        pieces,
                        ..
                    },
                    bytes,
                )) = &mut read
                {
                    let to = *from + u64::from(*span);
                    let joins = match reads {
                        Reads::Spans => offset - to <= READ_GAP && end - *from <= COPY_PIECE,
                        Reads::Pieces => *bytes + u64::from(len) <= PIECES_READ,
                    };
                    if joins {
                        *span = (end - *from) as u32;
                        *bytes += u64::from(len);
                        pieces.push((offset, len));
                        continue;
                    }
                }
                let job = CopyJob::Copy {
                    offset,
                    len,
                    pieces: vec![(offset, len)],
                    reads,
                };
                jobs.extend(read.replace((job, u64::from(len))).map(|(job, _)| job));
            }
        }
    }
    jobs.extend(read.map(|(job, _)| job));
    jobs
}

impl CopyJob {
    /// Bytes read from the source for this job.
    fn read_len(&self) -> u64 {
        match self {
            CopyJob::Copy {
                reads: Reads::Spans,
                len,
                ..
            } => u64::from(*len),
            CopyJob::Copy { pieces, .. } => pieces.iter().map(|&(_, n)| u64::from(n)).sum(),
            CopyJob::Trim { .. } => 0,
        }
    }
}

/// Bytes of data a copy moved, by the way they went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// Read by the target from the source itself (PULL).
    pub pulled: u64,
    /// Read and written by the controller.
    pub relayed: u64,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, other: Copied) {
        self.pulled += other.pulled;
        self.relayed += other.relayed;
    }
}

impl Copied {
    pub fn total(&self) -> u64 {
        self.pulled + self.relayed
    }
}

/// Which side of a copy failed: a source failure faults the source and the
/// job carries on from another; a target failure ends the job.
pub enum CopyError {
    Source(SyncError),
    Target(SyncError),
}

/// The steps that make `[start, end)` of the target equal to the source,
/// given the source's allocation `extents` (as BLOCK_STATUS returns them:
/// sorted, possibly starting before `start` or ending after `end`, possibly
/// not covering the whole range, in which case the rest is a hole).
/// Adjacent holes become one trim; data is cut into pieces of at most
/// [`COPY_PIECE`] bytes. `end - start` must fit a u32.
pub fn copy_steps(extents: &[AllocationExtent], start: u64, end: u64) -> Vec<CopyStep> {
    debug_assert!(end - start <= u64::from(u32::MAX));
    let mut steps = Vec::new();
    let mut hole_from: Option<u64> = None;
    let mut cursor = start;
    for ext in extents {
        let s = ext.offset.max(cursor);
        let e = (ext.offset + ext.len).min(end);
        if s >= e {
            continue;
        }
        if s > cursor {
            hole_from.get_or_insert(cursor);
        }
        match ext.kind {
            Allocation::Hole => {
                hole_from.get_or_insert(s);
            }
            Allocation::Data => {
                close_hole(&mut steps, &mut hole_from, s);
                let mut at = s;
                while at < e {
                    let len = (e - at).min(COPY_PIECE);
                    steps.push(CopyStep::Data {
                        offset: at,
                        len: len as u32,
                    });
                    at += len;
                }
            }
        }
        cursor = e;
    }
    if cursor < end {
        hole_from.get_or_insert(cursor);
    }
    close_hole(&mut steps, &mut hole_from, end);
    steps
}

/// Keeps of `steps`' trims only what the target holds data in (its
/// `target` allocation map of the same range): a trim where it reads
/// zeros already is a wasted request (and on the replica a block-map write
/// and a hole punch). Data steps are kept as they are.
pub fn skip_needless_trims(steps: Vec<CopyStep>, target: &[AllocationExtent]) -> Vec<CopyStep> {
    let mut out = Vec::with_capacity(steps.len());
    for step in steps {
        let CopyStep::Trim { offset, len } = step else {
            out.push(step);
            continue;
        };
        let end = offset + u64::from(len);
        for ext in target.iter().filter(|e| e.kind == Allocation::Data) {
            let s = ext.offset.max(offset);
            let e = (ext.offset + ext.len).min(end);
            if s < e {
                out.push(CopyStep::Trim {
                    offset: s,
                    len: (e - s) as u32,
                });
            }
        }
    }
    out
}

/// Ends the hole that began at `hole_from` (if any) at `at`.
fn close_hole(steps: &mut Vec<CopyStep>, hole_from: &mut Option<u64>, at: u64) {
    if let Some(from) = hole_from.take() {
        if at > from {
            steps.push(CopyStep::Trim {
                offset: from,
                len: (at - from) as u32,
            });
        }
    }
}

/// Copies `[start, end)` from `source` to `target`: data where the source
/// has data, a trim where it has holes. Returns the bytes of data copied.
/// The caller holds the range's lock and names the source's slot in
/// errors; a failed read or BLOCK_STATUS is a [`CopyError::Source`].
pub async fn copy_range(ends: &Ends<'_>, start: u64, end: u64) -> Result<Copied, CopyError> {
    let (source, target) = (ends.source.1, ends.target.1);
    let len = (end - start) as u32;
    let (on_source, on_target) = tokio::join!(
        source.block_status(start, len),
        target.block_status(start, len)
    );
    let on_source = on_source
        .map_err(|e| CopyError::Source(SyncError::data("block status on the source", e)))?;
    let on_target = on_target
        .map_err(|e| CopyError::Target(SyncError::data("block status on the target", e)))?;
    let steps = skip_needless_trims(copy_steps(&on_source, start, end), &on_target);
    let jobs = copy_jobs(&steps, Reads::between(ends.source.0, ends.target.0));
    let bytes = Semaphore::new(COPY_BYTES as usize);
    let bytes = &bytes;
    stream::iter(jobs)
        .map(|job| async move {
            // A job larger than the whole budget would wait forever.
            let read = job.read_len().min(u64::from(COPY_BYTES)) as u32;
            // Never closed: the semaphore lives as long as the stream.
            let _held = bytes.acquire_many(read).await.ok();
            copy_job(ends, job).await
        })
        .buffer_unordered(COPY_DEPTH)
        .try_fold(Copied::default(), |mut all, one| async move {
            all += one;
            Ok(all)
        })
        .await
}

async fn copy_job(ends: &Ends<'_>, job: CopyJob) -> Result<Copied, CopyError> {
    let ((source_slot, source), (target_slot, target)) = (ends.source, ends.target);
    let on_target = |e| CopyError::Target(SyncError::data("resync write on the target", e));
    let drop_cache = source_slot.peer_copy.load(Ordering::Acquire);
    match job {
        CopyJob::Copy {
            offset,
            len,
            pieces,
            reads,
        } => {
            let bytes = pieces.iter().map(|&(_, n)| u64::from(n)).sum();
            if target_slot.peer_copy.load(Ordering::Acquire) {
                // The target's steps against the source must end well
                // before our deadline on the PULL does.
                let plan = PullPlan::new(
                    offset,
                    source_slot.addr,
                    ends.timeout / 3,
                    drop_cache,
                    auth::process_wire_mode() == WireMode::Encrypted,
                    len,
                    pieces.clone(),
                )
                .map(|plan| match reads {
                    Reads::Pieces => plan.read_as_pieces(),
                    Reads::Spans => plan,
                });
                match plan {
                    Ok(plan) => match target.pull(offset, plan).await {
                        Ok(()) => {
                            return Ok(Copied {
                                pulled: bytes,
                                relayed: 0,
                            })
                        }
                        Err(e) if e.status() == Some(Status::PeerFailed) => {
                            if target_slot.peer_copy.swap(false, Ordering::AcqRel) {
                                tracing::warn!(replica = %target_slot.addr, source = %source_slot.addr, "the replica could not copy from its peer itself, the controller relays its copies from now on: {}", strata_replica::error_chain(&e));
                            }
                        }
                        Err(e) => return Err(on_target(e)),
                    },
                    Err(why) => {
                        tracing::error!(
                            offset,
                            len,
                            "a copy plan was refused before sending ({why}); relaying it"
                        );
                    }
                }
            }
            // Pieces the checks refuse (a bug here) are read as a span.
            let list = match reads {
                Reads::Pieces => PieceList::new(pieces.clone()).ok(),
                Reads::Spans => None,
            };
            let piecewise = list.is_some();
            let read = match list {
                Some(list) => source.read_pieces(list, drop_cache).await,
                None if drop_cache => source.read_for_copy(offset, len).await,
                None => source.read(offset, len).await,
            };
            let data =
                read.map_err(|e| CopyError::Source(SyncError::data("read on the source", e)))?;
            let writes = piece_slices(&data, offset, &pieces, piecewise)
                .map(|(at, bytes)| target.write(at, bytes, false));
            futures::future::try_join_all(writes)
                .await
                .map_err(on_target)?;
            Ok(Copied {
                pulled: 0,
                relayed: bytes,
            })
        }
        CopyJob::Trim { offset, len } => {
            target.trim(offset, len).await.map_err(on_target)?;
            Ok(Copied::default())
        }
    }
}

/// The healthy replica a copy reads from, or why there is none.
pub fn pick_source(
    volume: &Volume,
    at: u64,
) -> Result<(std::sync::Arc<super::Slot>, std::sync::Arc<ReplicaClient>), CopyError> {
    volume
        .slots()
        .into_iter()
        .filter(|s| s.is_healthy())
        .find_map(|s| s.healthy_client().map(|c| (s, c)))
        .ok_or_else(|| CopyError::Source(SyncError::from(volume.below_quorum("resync", at))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn ext(offset: u64, len: u64, kind: Allocation) -> AllocationExtent {
        AllocationExtent { offset, len, kind }
    }

    #[test]
    fn data_is_cut_into_pieces_and_holes_merge() {
        let extents = [
            ext(0, 4096, Allocation::Hole),
            ext(4096, 4096, Allocation::Hole),
            ext(8192, 3 * MIB, Allocation::Data),
        ];
        let steps = copy_steps(&extents, 0, 4 * MIB);
        assert_eq!(
            steps,
            vec![
                CopyStep::Trim {
                    offset: 0,
                    len: 8192
                },
                CopyStep::Data {
                    offset: 8192,
                    len: MIB as u32
                },
                CopyStep::Data {
                    offset: 8192 + MIB,
                    len: MIB as u32
                },
                CopyStep::Data {
                    offset: 8192 + 2 * MIB,
                    len: MIB as u32
                },
                // The uncovered tail is a hole.
                CopyStep::Trim {
                    offset: 8192 + 3 * MIB,
                    len: (MIB - 8192) as u32
                },
            ]
        );
    }

    #[test]
    fn extents_beyond_the_range_are_clipped() {
        let extents = [
            ext(0, 2 * MIB, Allocation::Data),
            ext(2 * MIB, 2 * MIB, Allocation::Hole),
        ];
        let steps = copy_steps(&extents, MIB, 3 * MIB);
        assert_eq!(
            steps,
            vec![
                CopyStep::Data {
                    offset: MIB,
                    len: MIB as u32
                },
                CopyStep::Trim {
                    offset: 2 * MIB,
                    len: MIB as u32
                },
            ]
        );
    }

    #[test]
    fn no_extents_is_one_trim() {
        assert_eq!(
            copy_steps(&[], 0, 8 * MIB),
            vec![CopyStep::Trim {
                offset: 0,
                len: 8 * MIB as u32
            }]
        );
    }

    /// Random allocation maps of a range of 4 KiB blocks.
    fn maps() -> impl Strategy<Value = (Vec<AllocationExtent>, u64, u64)> {
        proptest::collection::vec((1u64..64, any::<bool>()), 0..40).prop_flat_map(|runs| {
            let mut extents = Vec::new();
            let mut at = 0;
            for (blocks, data) in runs {
                let kind = if data {
                    Allocation::Data
                } else {
                    Allocation::Hole
                };
                extents.push(ext(at * 4096, blocks * 4096, kind));
                at += blocks;
            }
            let total = at.max(1) + 8;
            (Just(extents), 0..total, 0..total).prop_map(|(e, a, b)| {
                let (lo, hi) = (a.min(b) * 4096, (a.max(b) + 1) * 4096);
                (e, lo, hi)
            })
        })
    }

    #[test]
    fn trims_only_where_the_target_has_data() {
        let steps = vec![
            CopyStep::Trim {
                offset: 0,
                len: 4 * MIB as u32,
            },
            CopyStep::Data {
                offset: 4 * MIB,
                len: 4096,
            },
        ];
        let target = [
            ext(0, MIB, Allocation::Hole),
            ext(MIB, 4096, Allocation::Data),
            ext(MIB + 4096, MIB, Allocation::Hole),
            ext(3 * MIB, 2 * MIB, Allocation::Data),
        ];
        assert_eq!(
            skip_needless_trims(steps.clone(), &target),
            vec![
                CopyStep::Trim {
                    offset: MIB,
                    len: 4096
                },
                CopyStep::Trim {
                    offset: 3 * MIB,
                    len: MIB as u32
                },
                steps[1],
            ]
        );
        // An empty target needs no trims at all.
        assert_eq!(skip_needless_trims(steps.clone(), &[]), vec![steps[1]]);
    }

    #[test]
    fn near_pieces_share_a_read() {
        let k = 4096u32;
        let steps = [
            CopyStep::Data { offset: 0, len: k },
            CopyStep::Trim {
                offset: 4096,
                len: 2 * k,
            },
            CopyStep::Data {
                offset: 12288,
                len: k,
            },
            // Too far from the one before: a read of its own.
            CopyStep::Trim {
                offset: 16384,
                len: 1 << 20,
            },
            CopyStep::Data {
                offset: 16384 + MIB,
                len: k,
            },
        ];
        assert_eq!(
            copy_jobs(&steps, Reads::Spans),
            vec![
                CopyJob::Trim {
                    offset: 4096,
                    len: 2 * k
                },
                CopyJob::Trim {
                    offset: 16384,
                    len: 1 << 20
                },
                CopyJob::Copy {
                    offset: 0,
                    len: 4 * k,
                    pieces: vec![(0, k), (12288, k)],
                    reads: Reads::Spans,
                },
                CopyJob::Copy {
                    offset: 16384 + MIB,
                    len: k,
                    pieces: vec![(16384 + MIB, k)],
                    reads: Reads::Spans,
                },
            ]
        );
        // Read as pieces, distance does not matter: all three in one read,
        // which reads their 12 KiB only.
        let jobs = copy_jobs(&steps, Reads::Pieces);
        let read = CopyJob::Copy {
            offset: 0,
            len: (16384 + MIB) as u32 + k,
            pieces: vec![(0, k), (12288, k), (16384 + MIB, k)],
            reads: Reads::Pieces,
        };
        assert_eq!(read.read_len(), 3 * u64::from(k));
        assert_eq!(jobs.last(), Some(&read));
    }

    #[test]
    fn a_pieces_read_holds_at_most_pieces_read_bytes() {
        // 100 blocks 64 KiB apart, then one of 1 MiB.
        let mut steps: Vec<CopyStep> = (0..100)
            .map(|i| CopyStep::Data {
                offset: i * 65536,
                len: 4096,
            })
            .collect();
        steps.push(CopyStep::Data {
            offset: 100 * 65536,
            len: MIB as u32,
        });
        let jobs = copy_jobs(&steps, Reads::Pieces);
        let counts: Vec<usize> = jobs
            .iter()
            .map(|j| match j {
                CopyJob::Copy { pieces, .. } => pieces.len(),
                CopyJob::Trim { .. } => 0,
            })
            .collect();
        assert_eq!(counts, vec![32, 32, 32, 4, 1]);
        assert!(jobs[..4].iter().all(|j| j.read_len() <= PIECES_READ));
        assert_eq!(
            jobs[4].read_len(),
            MIB,
            "a large piece is a read of its own"
        );
    }

    proptest! {
        /// Jobs write exactly the data pieces and trim exactly the trims;
        /// a span read holds its pieces and is at most a piece long; a
        /// pieces read holds at most `PIECES_READ` bytes unless it is one
        /// piece.
        #[test]
        fn jobs_keep_every_piece((extents, start, end) in maps(), by_pieces in any::<bool>()) {
            let reads = if by_pieces { Reads::Pieces } else { Reads::Spans };
            let steps = copy_steps(&extents, start, end);
            let mut want_data = Vec::new();
            let mut want_trims = Vec::new();
            for step in &steps {
                match *step {
                    CopyStep::Data { offset, len } => want_data.push((offset, len)),
                    CopyStep::Trim { offset, len } => want_trims.push((offset, len)),
                }
            }
            let mut data = Vec::new();
            let mut trims = Vec::new();
            for job in copy_jobs(&steps, reads) {
                let read = job.read_len();
                match job {
                    CopyJob::Copy { offset, len, pieces, reads: r } => {
                        prop_assert_eq!(r, reads);
                        match reads {
                            Reads::Spans => prop_assert!(u64::from(len) <= COPY_PIECE),
                            Reads::Pieces => prop_assert!(read <= PIECES_READ || pieces.len() == 1),
                        }
                        for &(at, n) in &pieces {
                            prop_assert!(at >= offset && at + u64::from(n) <= offset + u64::from(len));
                        }
                        prop_assert_eq!(pieces.first().map(|p| p.0), Some(offset));
                        let last = pieces.last().expect("a read has pieces");
                        prop_assert_eq!(last.0 + u64::from(last.1), offset + u64::from(len));
                        data.extend(pieces);
                    }
                    CopyJob::Trim { offset, len } => trims.push((offset, len)),
                }
            }
            prop_assert_eq!(data, want_data);
            prop_assert_eq!(trims, want_trims);
        }

        /// The steps tile the range exactly once, in order; each block is
        /// copied iff the source has data there; no piece exceeds the limit;
        /// no two trims touch.
        #[test]
        fn steps_tile_the_range((extents, start, end) in maps()) {
            let steps = copy_steps(&extents, start, end);
            let is_data = |at: u64| extents.iter().any(|e| {
                e.kind == Allocation::Data && e.offset <= at && at < e.offset + e.len
            });
            let mut at = start;
            let mut last_trim = false;
            for step in &steps {
                let (offset, len, data) = match *step {
                    CopyStep::Data { offset, len } => (offset, u64::from(len), true),
                    CopyStep::Trim { offset, len } => (offset, u64::from(len), false),
                };
                prop_assert_eq!(offset, at);
                prop_assert!(len > 0);
                prop_assert!(!data || len <= COPY_PIECE);
                prop_assert!(data || !last_trim, "adjacent trims were not merged");
                let mut b = offset;
                while b < offset + len {
                    prop_assert_eq!(is_data(b), data, "block {}", b);
                    b += 4096;
                }
                last_trim = !data;
                at += len;
            }
            prop_assert_eq!(at, end);
        }
    }
}
