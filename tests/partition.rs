//! A replica cut off from the network and let back, while fio writes and
//! verifies: the replica lives in a network namespace this test creates
//! (veth pair, addresses on a private /30 that exists only inside this
//! machine); the link is taken down for a few seconds and brought back.
//! Needs root (CI runs as root) and iproute2.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{free_addr, require, wait_listening, Cluster, Proc};

const MIB: u64 = 1 << 20;

/// The namespace and veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed (this test needs root and iproute2): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Netns {
        let id = std::process::id() % 200 + 20;
        let n = Netns {
            name: format!("strata-part-{id}"),
            host_if: format!("stp{id}h"),
        };
        let _ = Command::new("ip").args(["netns", "del", &n.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &n.host_if])
            .output();
        let ns_if = format!("stp{id}n");
        ip(&["netns", "add", &n.name]);
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &n.name]);
        ip(&[
            "addr",
            "add",
            &format!("10.251.{id}.1/30"),
            "dev",
            &n.host_if,
        ]);
        ip(&["link", "set", &n.host_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &n.name,
            "ip",
            "addr",
            "add",
            &format!("10.251.{id}.2/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["netns", "exec", &n.name, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &n.name, "ip", "link", "set", "lo", "up"]);
        n
    }

    fn inner_addr(&self, port: u16) -> SocketAddr {
        let id = self.host_if.trim_start_matches("stp").trim_end_matches('h');
        format!("10.251.{id}.2:{port}").parse().unwrap()
    }

    fn set_link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn a_replica_cut_off_and_let_back_is_resynced_while_fio_verifies() {
    require("fio");
    require("ip");
    let ns = Netns::create();
    let mut c = Cluster::without_processes(128 * MIB);
    for i in 0..2 {
        let addr = free_addr();
        c.replica_addrs.push(addr);
        c.replicas.push(c.spawn_replica(i, addr));
    }
    let inner = ns.inner_addr(free_addr().port());
    c.replica_addrs.push(inner);
    let args: Vec<String> = vec![
        "replica".into(),
        "serve".into(),
        "--dir".into(),
        c.replica_dir(2).display().to_string(),
        "--listen".into(),
        inner.to_string(),
    ];
    let mut isolated = Proc::spawn_with(
        "replica-2",
        &["ip", "netns", "exec", &ns.name],
        &args,
        c.dir.path(),
    );
    wait_listening(inner, &mut isolated, 20);
    c.replicas.push(isolated);
    c.start_controller();
    let uri = c.uri();
    let fio = std::thread::spawn(move || {
        common::run(
            "fio",
            &[
                "--name=partition",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--size=64M",
                "--time_based",
                "--runtime=16",
                "--fsync=64",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_backlog=256",
                "--verify_state_save=0",
                "--output-format=json",
            ],
            120,
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    ns.set_link(false);
    // Requests to it fail after the controller's 5 s IO timeout: a write
    // passes its deadline, or (when only flushes, allowed 30 s, are
    // pending) the replica's host has acknowledged nothing for that long.
    std::thread::sleep(Duration::from_secs(7));
    let during = c.status();
    assert_eq!(
        during["replicas"][2]["state"],
        "faulted",
        "the cut-off replica is still in: {during}\ncontroller log:\n{}",
        c.controller
            .as_ref()
            .map(|c| c.log_text())
            .unwrap_or_default()
    );
    ns.set_link(true);
    c.wait_all_healthy(60);
    let out = fio.join().unwrap();
    assert!(
        out.status.success(),
        "fio failed: {}\n{}\ncontroller:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.controller.as_ref().unwrap().log_text()
    );
    let job = &common::fio_json(&out.stdout)["jobs"][0];
    assert_eq!(job["error"], 0);
    // Inside its namespace the replica cannot reach its peers' loopback
    // addresses: its PULLs failed and the controller relayed the copy.
    let log = c.controller.as_ref().unwrap().log_text();
    assert!(
        log.contains("the controller relays its copies from now on"),
        "the resync did not fall back to relaying:\n{log}"
    );
    // Faulted as lagging once its peers answered, not after the IO timeout
    // (issue 21).
    let longest = job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e9;
    eprintln!("a replica cut off: fio's longest write {longest:.3} s");
    assert!(
        longest < 2.0,
        "a write waited {longest:.3} s for a cut-off replica"
    );

    // A FLUSH alone, sent after the link is cut: it may take 30 s on a
    // busy replica, but a silent host is dropped within the 5 s timeout
    // (and a tick or two), and the flush succeeds on the other two.
    ns.set_link(false);
    let started = std::time::Instant::now();
    let out = common::run("qemu-io", &["-f", "raw", "-c", "flush", &c.uri()], 60);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "flush failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let during = c.status();
    assert_eq!(during["replicas"][2]["state"], "faulted", "{during}");
    assert!(
        took < Duration::from_secs(15),
        "a flush waited {took:?} for a silent replica"
    );
    eprintln!("flush with a silent replica took {took:?}");
    ns.set_link(true);
    c.wait_all_healthy(60);
    c.stop_and_compare();
}
