//! A replica that stalls (its process stopped with SIGSTOP: the kernel
//! still acknowledges TCP, nothing answers, as with a hung disk) costs the
//! application about a second, not the IO timeout (issue 21): once the
//! other two replicas answered, the silent one is faulted as lagging and
//! resynced when it answers again. Brief stalls within the bound fault
//! nobody, and a replica the quorum needs is never faulted for lagging.
//! (`tests/partition.rs` checks the same bound for a replica cut off by
//! the network.)

mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on a child process id we own.
    let r = unsafe { libc::kill(p.child.id() as i32, sig) };
    assert_eq!(r, 0, "kill({sig}) failed");
}

/// fio writing 4 KiB at QD16 with verify for `secs`, flushing every 64 writes.
fn fio(uri: String, secs: u32) -> std::thread::JoinHandle<std::process::Output> {
    std::thread::spawn(move || {
        run(
            "fio",
            &[
                "--name=lag",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=32M",
                "--time_based",
                &format!("--runtime={secs}"),
                "--fsync=64",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_backlog=256",
                "--verify_state_save=0",
                "--output-format=json",
            ],
            120,
        )
    })
}

/// fio's longest write and longest flush, in seconds.
fn longest(out: &std::process::Output) -> (f64, f64) {
    assert!(
        out.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = fio_json(&out.stdout);
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    let write = job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e9;
    let sync = job["sync"]["lat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e9;
    (write, sync)
}

#[test]
fn a_stalled_replica_costs_writes_under_two_seconds() {
    require("fio");
    let mut c = Cluster::start(3, 64 * MIB);
    let job = fio(c.uri(), 12);
    std::thread::sleep(Duration::from_secs(3));
    signal(&c.replicas[2], libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    let during = c.status();
    signal(&c.replicas[2], libc::SIGCONT);
    assert_eq!(during["replicas"][2]["state"], "faulted", "{during}");
    assert!(
        during["replicas"][2]["fault_reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("lagging"),
        "{during}"
    );
    assert_eq!(during["lag_faults"], 1, "{during}");
    let (write, sync) = longest(&job.join().unwrap());
    eprintln!("a replica stalled for 3 s: longest write {write:.3} s, longest flush {sync:.3} s");
    assert!(
        write < 2.0,
        "a write waited {write:.3} s for a stalled replica"
    );
    assert!(
        sync < 2.0,
        "a flush waited {sync:.3} s for a stalled replica"
    );
    let after = c.wait_all_healthy(60);
    assert_eq!(after["lag_faults"], 1, "{after}");
    c.stop_and_compare();
}

#[test]
fn brief_stalls_within_the_bound_fault_nobody() {
    require("fio");
    let mut c = Cluster::start(3, 64 * MIB);
    let job = fio(c.uri(), 8);
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..4 {
        signal(&c.replicas[2], libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(300));
        signal(&c.replicas[2], libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(700));
    }
    longest(&job.join().unwrap());
    let after = c.status();
    assert_eq!(after["lag_faults"], 0, "{after}");
    assert_eq!(after["replicas"][2]["state"], "healthy", "{after}");
    c.stop_and_compare();
}

#[test]
fn a_replica_the_quorum_needs_is_never_faulted_for_lagging() {
    require("qemu-io");
    let mut c = Cluster::start(3, 64 * MIB);
    c.replicas[0].kill9();
    // The volume notices replica 0 is gone on the next request.
    let _ = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &c.uri()], 30);
    signal(&c.replicas[2], libc::SIGSTOP);
    let uri = c.uri();
    let started = Instant::now();
    let write = std::thread::spawn(move || {
        run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 7 1M 64k", &uri],
            60,
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    let during = c.status();
    signal(&c.replicas[2], libc::SIGCONT);
    assert_eq!(during["replicas"][2]["state"], "healthy", "{during}");
    let out = write.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    let after = c.status();
    assert_eq!(after["lag_faults"], 0, "{after}");
    qemu_io(&c.uri(), &["read -P 7 1M 64k"]);
}
