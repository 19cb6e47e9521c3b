//! End to end: a 3-way replicated volume (three `strata replica serve`
//! processes and a `strata controller serve`) used by real NBD clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{require, run, run_ok, Cluster};

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_shows_size_and_flags() {
    require("nbdinfo");
    let c = Cluster::start(3, 64 * MIB);
    let out = run_ok("nbdinfo", &["--json", &c.uri()], 30);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let export = &v["exports"][0];
    assert_eq!(export["export-size"], 64 * MIB, "{out}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag} in {out}");
    }
    assert_eq!(export["block_size_minimum"], 4096, "{out}");
}

#[test]
fn qemu_io_patterns_at_many_offsets_read_back() {
    require("qemu-io");
    let c = Cluster::start(3, 64 * MIB);
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let cases: &[(u64, u64)] = &[
        (0, 4096),
        (4096, 65536),
        (MIB, MIB),
        (7 * MIB + 512, 1024),
        (63 * MIB, MIB),
        (33 * MIB - 4096, 8192),
    ];
    for (i, (off, len)) in cases.iter().enumerate() {
        let pat = 0x11 * (i as u64 + 1) % 256;
        writes.push("-c".to_string());
        writes.push(format!("write -P {pat} {off} {len}"));
        reads.push("-c".to_string());
        reads.push(format!("read -P {pat} {off} {len}"));
    }
    let uri = c.uri();
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend(writes.iter().map(String::as_str));
    args.extend(["-c", "flush", &uri]);
    run_ok("qemu-io", &args, 60);
    // Read back in a separate connection.
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend(reads.iter().map(String::as_str));
    args.push(&uri);
    let out = run_ok("qemu-io", &args, 60);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Zeroes and discard read back as zeros.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -z 0 4096",
            "-c",
            "discard 1M 1M",
            &uri,
        ],
        60,
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 4096",
            "-c",
            "read -P 0 1M 1M",
            &uri,
        ],
        60,
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn nbdcopy_round_trips_256_mib_and_holes_are_reported() {
    require("nbdcopy");
    require("qemu-img");
    let c = Cluster::start(3, 512 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.raw");
    let back = dir.path().join("out.raw");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut rng_state = 0x9e3779b97f4a7c15u64;
        let mut buf = vec![0u8; MIB as usize];
        for _ in 0..256 {
            for chunk in buf.chunks_mut(8) {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                chunk.copy_from_slice(&rng_state.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    let uri = c.uri();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri], 300);
    // The volume is 512 MiB; copy out only the first 256 MiB.
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()], 300);
    let mut a = Vec::new();
    let mut b = Vec::new();
    std::fs::File::open(&src)
        .unwrap()
        .read_to_end(&mut a)
        .unwrap();
    std::fs::File::open(&back)
        .unwrap()
        .read_to_end(&mut b)
        .unwrap();
    assert_eq!(b.len() as u64, 512 * MIB);
    assert!(
        a[..] == b[..a.len()],
        "data copied out differs from data copied in"
    );
    assert!(
        b[a.len()..].iter().all(|&x| x == 0),
        "never-written range is not zero"
    );
    // Block status: the second half was never written and is a hole.
    let map = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri], 60);
    let extents: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut saw_data = false;
    let mut saw_hole_after = false;
    for e in extents.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        if e["data"] == true && start < 256 * MIB {
            saw_data = true;
        }
        if e["data"] == false && e["zero"] == true && start >= 256 * MIB {
            saw_hole_after = true;
        }
        if e["data"] == true {
            assert!(
                start < 256 * MIB,
                "data reported past what was written: {e}"
            );
        }
    }
    assert!(saw_data && saw_hole_after, "qemu-img map: {map}");
    let out = run_ok("nbdinfo", &["--map", &uri], 60);
    assert!(out.contains("hole"), "nbdinfo --map: {out}");
}

fn fio_job(uri: &str, extra: &[&str], secs: u64) -> std::process::Output {
    let mut args = vec![
        "--name=verify".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=randwrite".to_string(),
        "--bs=4k".to_string(),
        "--iodepth=16".to_string(),
        "--size=32M".to_string(),
        "--verify=crc32c".to_string(),
        "--verify_state_save=0".to_string(),
        "--verify_fatal=1".to_string(),
        "--output-format=json".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("fio", &refs, secs)
}

#[test]
fn fio_verified_random_writes_pass_with_three_replicas() {
    require("fio");
    let c = Cluster::start(3, 64 * MIB);
    let out = fio_job(&c.uri(), &[], 180);
    assert!(
        out.status.success(),
        "fio failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = common::fio_json(&out.stdout);
    assert_eq!(v["jobs"][0]["error"], 0);
    assert!(
        v["jobs"][0]["write"]["io_bytes"].as_u64().unwrap() >= 32 * MIB,
        "fio wrote less than asked"
    );
}

#[test]
fn losing_one_replica_is_invisible_and_losing_two_stops_writes_cleanly() {
    require("fio");
    require("qemu-io");
    let mut c = Cluster::start(3, 64 * MIB);
    let uri = c.uri();
    // fio writes and verifies while replica 0 is killed.
    let fio = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            fio_job(&uri, &["--time_based", "--runtime=8", "--do_verify=1"], 120)
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    c.replicas[0].kill9();
    let out = fio.join().unwrap();
    assert!(
        out.status.success(),
        "fio saw an error after one replica died:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Acknowledged, flushed writes with recognisable patterns.
    let mut acked = Vec::new();
    for i in 0..8u64 {
        let (off, pat) = (i * MIB, 0x40 + i);
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {pat} {off} 1M"),
                "-c",
                "flush",
                &uri,
            ],
            60,
        );
        acked.push((off, pat));
    }
    let status = run_ok(
        common::strata_bin().to_str().unwrap(),
        &[
            "volume",
            "status",
            "--json",
            "--controller",
            &c.control.to_string(),
        ],
        30,
    );
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["state"], "degraded", "{status}");
    assert_eq!(v["replicas"][0]["state"], "faulted", "{status}");
    // A healthy replica reports the memory of its index, which holds the
    // writes above.
    assert_eq!(v["replicas"][1]["state"], "healthy", "{status}");
    assert!(
        v["replicas"][1]["index_bytes"].as_u64().unwrap() > 0,
        "{status}"
    );
    // The second of three: writes must now fail, and nothing panics.
    c.replicas[1].kill9();
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xee 32M 1M",
            "-c",
            "flush",
            &uri,
        ],
        60,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("error") || text.contains("failed"),
        "a write below quorum succeeded: {text}"
    );
    assert!(
        c.controller.as_mut().unwrap().is_running(),
        "controller died"
    );
    let metrics = run_ok(
        "curl",
        &["-s", &format!("http://{}/metrics", c.metrics)],
        10,
    );
    assert!(
        metrics.contains("strata_volume_healthy_replicas{volume=\"vol\"} 1"),
        "{metrics}"
    );
    let index_bytes: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("strata_replica_index_bytes{volume=\"vol\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(index_bytes.len(), 3, "{metrics}");
    assert!(index_bytes.iter().any(|&b| b > 0), "{metrics}");
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(!log.contains("panicked"), "{log}");
    // Every acknowledged byte is in the surviving replica's files.
    c.controller.as_mut().unwrap().kill9();
    c.replicas[2].kill9();
    let store = c.open_store(2);
    let mut buf = vec![0u8; MIB as usize];
    for (off, pat) in acked {
        store.read(off, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b as u64 == pat),
            "acknowledged write at {off} lost"
        );
    }
}

#[test]
fn after_a_clean_shutdown_the_replicas_are_identical() {
    require("qemu-io");
    let mut c = Cluster::start(3, 16 * MIB);
    let uri = c.uri();
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 3M",
            "-c",
            "write -P 2 5M 64k",
            "-c",
            "discard 1M 1M",
            "-c",
            "write -z 9M 1M",
            "-c",
            "write -P 3 15M 1M",
            &uri,
        ],
        60,
    );
    c.stop_clean();
    let stores: Vec<_> = (0..3).map(|i| c.open_store(i)).collect();
    let mut first = vec![0u8; (16 * MIB) as usize];
    stores[0].read(0, &mut first).unwrap();
    assert!(first[..MIB as usize].iter().all(|&b| b == 1));
    for (i, s) in stores.iter().enumerate().skip(1) {
        let mut other = vec![0u8; (16 * MIB) as usize];
        s.read(0, &mut other).unwrap();
        assert!(other == first, "replica {i} differs from replica 0");
    }
}

#[test]
fn garbage_on_the_nbd_and_replica_ports_does_not_hurt_other_clients() {
    require("nbdinfo");
    let c = Cluster::start(3, 16 * MIB);
    let mut seed = 12345u64;
    for target in [c.nbd, c.replica_addrs[0]] {
        for round in 0..20 {
            let Ok(mut s) = TcpStream::connect(target) else {
                continue;
            };
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut junk = vec![0u8; 64 + round * 97];
            for b in junk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            if round % 3 == 0 {
                // A plausible NBD option header announcing a 4 GiB option.
                junk[..8].copy_from_slice(b"IHAVEOPT");
                junk[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
            }
            let _ = s.write_all(&junk);
            let mut sink = [0u8; 4096];
            let _ = s.read(&mut sink);
        }
    }
    // Still serving, with the data path intact.
    run_ok("nbdinfo", &[&c.uri()], 30);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 0 64k",
            "-c",
            "read -P 7 0 64k",
            &c.uri(),
        ],
        30,
    );
}
