//! A replica on a slow disk: 30 MiB/s (nbdkit's rate filter under ext4 on
//! a loop device, `scripts/slow-disk.sh`, set up and torn down here). Checks
//! that a FLUSH after (and during) a burst of 4 KiB random writes without
//! flushes waits about a second, not for the gigabytes the kernel would let
//! pile up; that the controller and the replica stop within 10 s of SIGTERM
//! in the middle of such a burst; that data acknowledged by a FLUSH survives
//! kill -9; and that a replica whose stop ran out of time for its flush
//! finishes it at its next start and is not compared with its peers. And
//! that a full rebuild onto the slow disk runs once, without a request
//! timing out and the rebuild starting over.
//!
//! Needs root (loop devices, mount), nbdkit, nbdfuse and fio.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// The slow disk's bandwidth (reads and writes together).
const DISK_MIB_PER_SEC: u64 = 30;
/// A FLUSH must finish within this: the replica's default bound is a second
/// of measured writeback, plus the journal commit, on a shared machine.
/// Without the bound the same FLUSH waits tens of seconds (BENCHMARKS.md).
const FLUSH_BOUND: Duration = Duration::from_secs(4);
/// What a pod's stop may take.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// A mounted slow filesystem; unmounted and removed on drop.
struct SlowDisk {
    dir: tempfile::TempDir,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slow-disk.sh")
}

impl SlowDisk {
    fn up() -> SlowDisk {
        for tool in ["nbdkit", "nbdfuse", "fio", "losetup", "mkfs.ext4"] {
            require(tool);
        }
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            "bash",
            &[
                script().to_str().unwrap(),
                "up",
                dir.path().to_str().unwrap(),
                &DISK_MIB_PER_SEC.to_string(),
                "3G",
            ],
            180,
        );
        SlowDisk { dir }
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let out = run(
            "bash",
            &[
                script().to_str().unwrap(),
                "down",
                self.dir.path().to_str().unwrap(),
            ],
            180,
        );
        if !out.status.success() {
            eprintln!(
                "slow disk teardown: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Puts replica 0's directory of `c` on `disk` (in `name`); returns where.
fn replica_0_on(c: &Cluster, disk: &SlowDisk, name: &str) -> PathBuf {
    let on_disk = disk.mnt().join(name);
    std::fs::create_dir_all(&on_disk).unwrap();
    std::os::unix::fs::symlink(&on_disk, c.replica_dir(0)).unwrap();
    on_disk
}

/// A one-replica cluster whose replica keeps its data on `disk`, started
/// with `replica_args` on its `replica serve` line. One replica: the flush
/// latency measured is that disk's, not a faster peer's.
fn cluster_on(disk: &SlowDisk, name: &str, replica_args: &[&str]) -> Cluster {
    let mut c = Cluster::without_processes(1 << 30);
    replica_0_on(&c, disk, name);
    let addr = free_addr();
    c.replica_addrs.push(addr);
    c.replicas
        .push(spawn_replica_with(&c, 0, addr, replica_args));
    c.start_controller();
    c
}

fn spawn_replica_with(c: &Cluster, i: usize, addr: SocketAddr, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "replica".into(),
        "serve".into(),
        "--dir".into(),
        c.replica_dir(i).display().to_string(),
        "--listen".into(),
        addr.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn(&format!("replica-{i}"), &args, c.dir.path());
    wait_listening(addr, &mut p, 60);
    p
}

/// Sends one NBD FLUSH on a fresh connection and returns how long the
/// reply took.
fn flush_latency(nbd: SocketAddr, export: &str) -> Duration {
    let mut s = TcpStream::connect_timeout(&nbd, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    strata_attach::handshake::negotiate(&mut s, export).unwrap();
    let mut req = Vec::with_capacity(28);
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes()); // request magic
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&3u16.to_be_bytes()); // NBD_CMD_FLUSH
    req.extend_from_slice(&7u64.to_be_bytes()); // cookie
    req.extend_from_slice(&0u64.to_be_bytes()); // offset
    req.extend_from_slice(&0u32.to_be_bytes()); // length
    let started = Instant::now();
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    let took = started.elapsed();
    assert_eq!(
        reply[..4],
        0x6744_6698u32.to_be_bytes(),
        "simple reply magic"
    );
    assert_eq!(reply[4..8], [0, 0, 0, 0], "FLUSH failed");
    assert_eq!(reply[8..16], 7u64.to_be_bytes(), "cookie");
    took
}

/// fio: 4 KiB random writes at QD16 over the whole volume for `secs`, no
/// flushes, in the background. Returns the bytes written.
fn burst(uri: String, secs: u64) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let out = run(
            "fio",
            &[
                "--name=burst",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=1G",
                "--time_based",
                &format!("--runtime={secs}"),
                "--output-format=json",
            ],
            secs + 120,
        );
        // A burst cut short by a stop ends with an error; count what it wrote.
        fio_json_opt(&out.stdout)
            .map(|j| j["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    })
}

/// fio writing (`verify: false`) or checking a crc32c pattern over the
/// first `mib` MiB, 1 MiB sequential; the write ends with a FLUSH only if
/// `flush`.
fn pattern(uri: &str, mib: u64, verify: bool, flush: bool) {
    let mut args: Vec<String> = [
        "--name=pattern",
        "--ioengine=nbd",
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--verify_fatal=1",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--uri={uri}"));
    args.push(format!("--size={mib}M"));
    if verify {
        args.push("--verify_only".into());
    } else {
        args.push("--do_verify=0".into());
        if flush {
            args.push("--end_fsync=1".into());
        }
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("fio", &argv, 300);
    assert!(
        out.status.success(),
        "fio ({}) failed:\n{}\n{}",
        if verify { "verify" } else { "write" },
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGTERM, then the time to exit (panics past `STOP_BOUND` + a margin to
/// report). Returns (time, exited 0).
fn stop_time(p: &mut Proc) -> (Duration, bool) {
    let started = Instant::now();
    // SAFETY: kill(2) on a child we own.
    unsafe {
        libc::kill(p.child.id() as i32, libc::SIGTERM);
    }
    while started.elapsed() < STOP_BOUND * 3 {
        if let Ok(Some(status)) = p.child.try_wait() {
            return (started.elapsed(), status.success());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    p.kill9();
    panic!(
        "{} ignored SIGTERM for {:?}:\n{}",
        p.name,
        STOP_BOUND * 3,
        p.log_text()
    );
}

/// One slow disk at a time: two would share this machine's cores and disk.
static ONE_DISK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_slow_disk_bounds_flushes_and_stops() {
    let _one = ONE_DISK.lock().unwrap_or_else(|e| e.into_inner());
    let disk = SlowDisk::up();

    // 1. A burst, a FLUSH during it and one after it.
    let mut c = cluster_on(&disk, "burst", &[]);
    let writer = burst(c.uri(), 30);
    std::thread::sleep(Duration::from_secs(15));
    let during = flush_latency(c.nbd, &c.volume);
    let written = writer.join().unwrap();
    let after = flush_latency(c.nbd, &c.volume);
    eprintln!(
        "slow disk: burst wrote {} MiB; FLUSH during it {during:?}, after it {after:?}",
        written >> 20
    );
    // The burst must have written more than the bound lets stay unflushed
    // (at 30 MiB/s a second is 30 MiB), or the test proves nothing.
    assert!(written > 300 << 20, "the burst wrote only {written} bytes");
    assert!(
        during < FLUSH_BOUND,
        "FLUSH during the burst took {during:?}"
    );
    assert!(after < FLUSH_BOUND, "FLUSH after the burst took {after:?}");

    // 2. SIGTERM to the controller in the middle of a burst.
    let writer = burst(c.uri(), 20);
    std::thread::sleep(Duration::from_secs(6));
    let mut ctl = c.controller.take().unwrap();
    let (ctl_stop, ctl_ok) = stop_time(&mut ctl);
    let _ = writer.join();
    eprintln!(
        "slow disk: controller stopped {ctl_stop:?} after SIGTERM mid-burst (exit 0: {ctl_ok})"
    );
    assert!(
        ctl_stop < STOP_BOUND,
        "controller took {ctl_stop:?}:\n{}",
        ctl.log_text()
    );
    assert!(
        ctl_ok,
        "controller did not stop cleanly:\n{}",
        ctl.log_text()
    );

    // 3. SIGTERM to the replica in the middle of a burst.
    c.start_controller();
    let writer = burst(c.uri(), 20);
    std::thread::sleep(Duration::from_secs(6));
    let (rep_stop, rep_ok) = stop_time(&mut c.replicas[0]);
    let _ = writer.join();
    eprintln!("slow disk: replica stopped {rep_stop:?} after SIGTERM mid-burst (exit 0: {rep_ok})");
    assert!(
        rep_stop < STOP_BOUND,
        "replica took {rep_stop:?}:\n{}",
        c.replicas[0].log_text()
    );
    assert!(
        rep_ok,
        "replica failed to stop:\n{}",
        c.replicas[0].log_text()
    );
    c.controller.take().unwrap().kill9();

    // 4. kill -9 after a FLUSH: everything it covered reads back.
    c.replicas[0] = spawn_replica_with(&c, 0, c.replica_addrs[0], &[]);
    c.start_controller();
    pattern(&c.uri(), 128, false, true);
    c.controller.take().unwrap().kill9();
    c.replicas[0].kill9();
    c.replicas[0] = spawn_replica_with(&c, 0, c.replica_addrs[0], &[]);
    c.start_controller();
    pattern(&c.uri(), 128, true, false);
    c.stop_clean();
    drop(c);

    // 5. A stop that runs out of time for its flush: without the bound,
    // 400 MiB sit unflushed (13 s at 30 MiB/s, the stop has 8 s). The
    // replica says so, stops in time, and its next start finishes the
    // flush: no comparison, the data all there.
    let mut c = cluster_on(&disk, "unbounded", &["--no-writeback-bound"]);
    pattern(&c.uri(), 400, false, false);
    // Its FLUSH now waits for the disk far longer than the slow threshold:
    // the status says so while it waits, before any timeout.
    let (nbd, volume) = (c.nbd, c.volume.clone());
    let flush = std::thread::spawn(move || flush_latency(nbd, &volume));
    std::thread::sleep(Duration::from_secs(5));
    let status = c.status();
    let disk_json = &status["replicas"][0]["disk"];
    assert_eq!(disk_json["slow"], true, "{status}");
    assert!(
        disk_json["slow_reason"]
            .as_str()
            .unwrap()
            .contains("waiting"),
        "{status}"
    );
    let took = flush.join().unwrap();
    let metrics = run_ok(
        "curl",
        &["-sf", &format!("http://{}/metrics", c.metrics)],
        10,
    );
    assert!(
        metrics.contains("strata_replica_flush_latency_max_seconds{volume=\"vol\""),
        "{metrics}"
    );
    eprintln!("slow disk: without the bound, a FLUSH after 400 MiB took {took:?}");
    assert!(
        took > FLUSH_BOUND,
        "without the bound the FLUSH took only {took:?}"
    );
    pattern(&c.uri(), 400, false, false);
    c.controller.take().unwrap().kill9();
    let (stop, ok) = stop_time(&mut c.replicas[0]);
    let log = c.replicas[0].log_text();
    eprintln!("slow disk: replica with 400 MiB unflushed stopped in {stop:?} (exit 0: {ok})");
    assert!(stop < STOP_BOUND, "replica took {stop:?}:\n{log}");
    assert!(
        log.contains("did not finish within"),
        "the stop did not say it ran out of time:\n{log}"
    );
    c.replicas[0] = spawn_replica_with(&c, 0, c.replica_addrs[0], &[]);
    c.start_controller();
    pattern(&c.uri(), 400, true, false);
    let log = c.replicas[0].log_text();
    assert!(
        log.contains("finished it now"),
        "the next start did not finish the flush:\n{log}"
    );
    assert!(
        !log.contains("not closed cleanly"),
        "the replica counted as unclean:\n{log}"
    );
    let status = c.status();
    assert_eq!(status["state"], "healthy", "{status}");
    c.stop_clean();
}

/// A 2 GiB volume on three replicas, replica 0's data on `disk` (in
/// `name`): replica 0 is killed, `mib` MiB of the pattern are written
/// without it, and its data is wiped. Start it again to rebuild it.
fn lost_replica_0(disk: &SlowDisk, name: &str, mib: u64) -> Cluster {
    let mut c = Cluster::without_processes(2 << 30);
    let on_disk = replica_0_on(&c, disk, name);
    for i in 0..3 {
        let addr = free_addr();
        c.replica_addrs.push(addr);
        let replica = spawn_replica_with(&c, i, addr, &[]);
        c.replicas.push(replica);
    }
    c.start_controller();
    c.wait_all_healthy(60);
    c.replicas[0].kill9();
    pattern(&c.uri(), mib, false, true);
    std::fs::remove_dir_all(&on_disk).unwrap();
    std::fs::create_dir_all(&on_disk).unwrap();
    c
}

/// A full rebuild of 1 GiB onto the slow disk, from two replicas on the
/// machine's disk: it runs once, with no request timing out. The disk
/// stack takes its first ~64 MiB at memory speed (nbdkit behind FUSE),
/// as an SD card's or a USB disk's cache does; a writeback bound that
/// believed those first batches grew to a gigabyte, the rebuild's writes
/// then waited longer than the controller's 10 s timeout, and each attempt
/// was faulted and started over from an empty replica.
#[test]
fn a_rebuild_onto_a_slow_disk_runs_once() {
    let _one = ONE_DISK.lock().unwrap_or_else(|e| e.into_inner());
    let disk = SlowDisk::up();
    // Replica 0 is lost with its disk's contents while 1 GiB is written.
    let mut c = lost_replica_0(&disk, "rebuild", 1024);
    let started = Instant::now();
    c.replicas[0] = spawn_replica_with(&c, 0, c.replica_addrs[0], &[]);
    // 1 GiB at 30 MiB/s is 35 s; a rebuild starting over takes minutes.
    c.wait_all_healthy(180);
    let took = started.elapsed();
    let log = c.controller.as_ref().unwrap().log_text();
    let attempts = log.matches("replica rejoined write-only").count();
    eprintln!(
        "slow disk: full rebuild of 1 GiB onto it in {took:?} ({:.1} MiB/s), {attempts} attempt(s)",
        1024.0 / took.as_secs_f64()
    );
    assert!(
        !log.contains("sync stopped") && !log.contains("timed out"),
        "the rebuild was interrupted:\n{log}"
    );
    assert_eq!(attempts, 1, "the rebuild started over:\n{log}");
    pattern(&c.uri(), 1024, true, false);
    c.stop_clean();
}

/// A client writing 4 KiB blocks at random, QD16, while a full rebuild
/// copies onto the slow disk: both keep a share of that disk. The
/// rebuild's copies and the client's writes share the target's bound on
/// unflushed data; without the shares the copies filled it and the
/// client's writes waited a whole writeback batch at a time (about 500
/// IOPS, 99th percentile 0.8 s, against about 1800 and 0.07-0.2 s with
/// them; BENCHMARKS.md, "Session 22"). The rebuild must still copy at 40%
/// of the disk's rate or more while the client writes.
#[test]
fn a_client_and_a_rebuild_share_a_slow_disk() {
    let _one = ONE_DISK.lock().unwrap_or_else(|e| e.into_inner());
    let disk = SlowDisk::up();
    let mut c = lost_replica_0(&disk, "shared", 512);
    c.replicas[0] = spawn_replica_with(&c, 0, c.replica_addrs[0], &[]);
    // The client writes beside the pattern, for less time than the
    // rebuild takes to copy the pattern (512 MiB, over 20 s at the
    // shares), so the bytes it copies meanwhile are all data.
    const SECS: u64 = 12;
    let copied = |c: &Cluster| {
        c.status()["replicas"][0]["sync"]["done_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = copied(&c);
    let uri = c.uri();
    let client = std::thread::spawn(move || {
        let out = run_ok(
            "fio",
            &[
                "--name=client",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--offset=1G",
                "--size=512M",
                "--time_based",
                &format!("--runtime={SECS}"),
                "--output-format=json",
            ],
            SECS + 120,
        );
        fio_json_opt(out.as_bytes()).expect("fio's json")["jobs"][0]["write"].clone()
    });
    let write = client.join().unwrap();
    let during = copied(&c).saturating_sub(before);
    let status = c.status();
    assert_eq!(
        status["replicas"][0]["state"], "syncing",
        "the rebuild ended before the client did, so the shares were not measured: {status}"
    );
    let iops = write["iops"].as_f64().unwrap();
    let p99_ms = write["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap()
        / 1e6;
    let copy_mib_s = during as f64 / (1 << 20) as f64 / SECS as f64;
    eprintln!(
        "slow disk: during a rebuild a 4K QD16 client wrote {iops:.0} IOPS (99th percentile {p99_ms:.0} ms), \
         the rebuild copied {copy_mib_s:.1} MiB/s"
    );
    c.wait_all_healthy(180);
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(
        !log.contains("sync stopped") && !log.contains("timed out"),
        "the rebuild was interrupted:\n{log}"
    );
    assert!(
        iops >= 1000.0,
        "the client kept {iops:.0} IOPS (99th percentile {p99_ms:.0} ms) during the rebuild"
    );
    assert!(
        copy_mib_s >= 0.4 * DISK_MIB_PER_SEC as f64,
        "the rebuild copied {copy_mib_s:.1} MiB/s while the client wrote"
    );
    pattern(&c.uri(), 512, true, false);
    c.stop_clean();
}
