//! glibc's malloc, set for a process that runs backups and restores from
//! the command line.

/// Keeps glibc's malloc to two arenas, unless `MALLOC_ARENA_MAX` is set.
/// Call it first thing in `main`, before any thread starts.
///
/// By default glibc gives threads that contend an arena of their own, up
/// to 8 per core, and each arena keeps the 1 MiB chunk buffers freed in it
/// (after the first such buffer is freed, glibc raises its mmap threshold
/// above that size, so later ones come from the arenas). A full backup of
/// 1 GiB to moto peaked at 70-72 MiB RSS by default and 52 MiB with two
/// arenas, in 4.4 s against 4.7-4.9 s; a restore at 53-58 against 54 MiB
/// (`BENCHMARKS.md`). Servers keep the default: in two rounds of fio
/// against `strata up` (3 replicas in one process), two arenas served
/// 11-20% fewer 4 KiB random reads and peaked at 108 and 51 MiB RSS
/// against 50 and 54 MiB: no gain there, and a hot path to lose.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes malloc's parameters; the caller runs
        // it before other threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
