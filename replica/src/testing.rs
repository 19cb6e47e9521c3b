//! Test support: [`CrashSimEngine`], an IO engine that models the page
//! cache so a test can "pull the plug".
//!
//! Writes and hole punches are kept in memory per file (by device and inode)
//! until an `fdatasync` of that file applies them to disk. [`crash`]
//! forgets them (or, in [`CrashMode::TornRandom`], writes back a random
//! subset of pages, as real writeback might have done before the power cut).
//! Reads see the cached state, like a real page cache.
//!
//! [`crash`]: CrashSimEngine::crash
//!
//! Also [`spare_loopback_addr`], the ports tests give the servers they start.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

use parking_lot::Mutex;

use crate::engine::{punch_hole, BatchError, IoEngine, IoOp, PortableEngine};

const PAGE: u64 = 4096;

#[derive(Debug)]
enum Page {
    Bytes(Box<[u8]>),
    Hole,
}

#[derive(Debug)]
struct Cached {
    file: File,
    pages: BTreeMap<u64, Page>,
}

/// How a simulated crash treats unsynced pages.
#[derive(Debug, Clone, Copy)]
pub enum CrashMode {
    /// Every unsynced page is lost.
    DropAll,
    /// Each unsynced page independently reaches the disk or not.
    TornRandom { seed: u64 },
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct CrashSimEngine {
    files: Mutex<HashMap<(u64, u64), Cached>>,
}

fn key(file: &File) -> io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl CrashSimEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a power cut: unsynced pages are lost (or torn, per `mode`).
    pub fn crash(&self, mode: CrashMode) {
        let mut files = self.files.lock();
        let mut rng = match mode {
            CrashMode::TornRandom { seed } => Some(seed | 1),
            CrashMode::DropAll => None,
        };
        for (_, cached) in files.drain() {
            let Some(state) = rng.as_mut() else { continue };
            for (page, content) in cached.pages {
                // xorshift: deterministic per seed.
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                if *state % 2 == 0 {
                    apply_page(&cached.file, page, &content).expect("torn write-back");
                }
            }
        }
    }

    fn page_of(cached: &mut Cached, page: u64) -> io::Result<&mut Box<[u8]>> {
        let file = &cached.file;
        let entry = cached.pages.entry(page).or_insert_with(|| {
            let mut buf = vec![0u8; PAGE as usize].into_boxed_slice();
            let _ = crate::engine::read_full_at(file, &mut buf, page * PAGE);
            Page::Bytes(buf)
        });
        if let Page::Hole = entry {
            *entry = Page::Bytes(vec![0u8; PAGE as usize].into_boxed_slice());
        }
        match entry {
            Page::Bytes(b) => Ok(b),
            Page::Hole => unreachable!("replaced above"),
        }
    }

    fn run(&self, op: &mut IoOp<'_>) -> io::Result<()> {
        let mut files = self.files.lock();
        match op {
            IoOp::Read { file, offset, buf } => {
                crate::engine::read_full_at(file, buf, *offset)?;
                if let Some(cached) = files.get(&key(file)?) {
                    let end = *offset + buf.len() as u64;
                    for (&page, content) in cached.pages.range(*offset / PAGE..end.div_ceil(PAGE)) {
                        let (ps, pe) = (page * PAGE, page * PAGE + PAGE);
                        let (s, e) = (ps.max(*offset), pe.min(end));
                        let dst = &mut buf[(s - *offset) as usize..(e - *offset) as usize];
                        match content {
                            Page::Bytes(b) => {
                                dst.copy_from_slice(&b[(s - ps) as usize..(e - ps) as usize])
                            }
                            Page::Hole => dst.fill(0),
                        }
                    }
                }
                Ok(())
            }
            IoOp::Write { file, offset, buf } => {
                let k = key(file)?;
                let cached = files.entry(k).or_insert(Cached {
                    file: file.try_clone()?,
                    pages: BTreeMap::new(),
                });
                let end = *offset + buf.len() as u64;
                for page in *offset / PAGE..end.div_ceil(PAGE) {
                    let (ps, pe) = (page * PAGE, page * PAGE + PAGE);
                    let (s, e) = (ps.max(*offset), pe.min(end));
                    let p = Self::page_of(cached, page)?;
                    p[(s - ps) as usize..(e - ps) as usize]
                        .copy_from_slice(&buf[(s - *offset) as usize..(e - *offset) as usize]);
                }
                Ok(())
            }
            IoOp::PunchHole { file, offset, len } => {
                let k = key(file)?;
                let cached = files.entry(k).or_insert(Cached {
                    file: file.try_clone()?,
                    pages: BTreeMap::new(),
                });
                let end = *offset + *len;
                for page in *offset / PAGE..end.div_ceil(PAGE) {
                    let (ps, pe) = (page * PAGE, page * PAGE + PAGE);
                    let (s, e) = (ps.max(*offset), pe.min(end));
                    if s == ps && e == pe {
                        cached.pages.insert(page, Page::Hole);
                    } else {
                        let p = Self::page_of(cached, page)?;
                        p[(s - ps) as usize..(e - ps) as usize].fill(0);
                    }
                }
                Ok(())
            }
            IoOp::SyncData { file } => {
                if let Some(cached) = files.remove(&key(file)?) {
                    for (page, content) in &cached.pages {
                        apply_page(&cached.file, *page, content)?;
                    }
                }
                file.sync_data()
            }
        }
    }
}

fn apply_page(file: &File, page: u64, content: &Page) -> io::Result<()> {
    match content {
        Page::Bytes(b) => file.write_all_at(b, page * PAGE),
        Page::Hole => punch_hole(file, page * PAGE, PAGE),
    }
}

impl IoEngine for CrashSimEngine {
    fn name(&self) -> &'static str {
        "crash-sim"
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<(), BatchError> {
        for (index, op) in ops.iter_mut().enumerate() {
            self.run(op)
                .map_err(|source| BatchError { index, source })?;
        }
        Ok(())
    }
}

/// The portable engine, for tests that want to name both engines.
pub fn portable() -> std::sync::Arc<dyn IoEngine> {
    std::sync::Arc::new(PortableEngine)
}

/// A loopback address for a server a test is about to start in another
/// process (or restart on the same address).
///
/// Ports from `bind(":0")` come from the kernel's ephemeral range, the same
/// range outgoing connections take their source ports from: between the
/// test releasing the port and the server binding it, any connection on the
/// machine could take it ("Address already in use"). These ports come from
/// below that range (10000-29999), 500 per process (spread by pid), each
/// checked free when handed out.
pub fn spare_loopback_addr() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const PER_PROCESS: u32 = 500;
    let base = 10_000 + (std::process::id() % 40) * PER_PROCESS;
    for _ in 0..(PER_PROCESS * 40) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (base - 10_000 + n) % (PER_PROCESS * 40);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port as u16));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in 10000-29999");
}
