//! `strata csi --health-listen`: the `/healthz` the kubelet's liveness
//! probe reads (deploy/base/csi-node.yaml, csi-controller.yaml) answers
//! 200 while the process's CSI socket answers Probe, and 503 with the
//! reason once the socket is gone (as when the kubelet's plugin directory
//! is recreated under a running plugin), so the kubelet restarts it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{free_addr, wait_listening, Proc};

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn healthz_follows_the_csi_socket() {
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("csi.sock");
    let health = free_addr();
    let mut csi = Proc::spawn(
        "csi-node",
        &[
            "csi".into(),
            "--mode".into(),
            "node".into(),
            "--node-id".into(),
            "node-1".into(),
            "--endpoint".into(),
            format!("unix://{}", sock.display()),
            "--attach-state-dir".into(),
            work.path().join("attach").display().to_string(),
            "--health-listen".into(),
            health.to_string(),
        ],
        work.path(),
    );
    wait_listening(health, &mut csi, 30);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answer = get(health, "/healthz");
    while !answer.starts_with("HTTP/1.1 200") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        answer = get(health, "/healthz");
    }
    assert!(
        answer.starts_with("HTTP/1.1 200 OK"),
        "{answer}\n{}",
        csi.log_text()
    );
    assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    assert!(get(health, "/metrics").starts_with("HTTP/1.1 404"));

    // The socket gone: the probe fails, and says why.
    std::fs::remove_file(&sock).unwrap();
    let answer = get(health, "/healthz");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("cannot connect to the CSI endpoint"),
        "{answer}"
    );

    assert!(
        csi.terminate(10),
        "strata csi did not stop cleanly:\n{}",
        csi.log_text()
    );
}

#[test]
fn a_health_address_in_use_fails_the_start() {
    let work = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = std::process::Command::new(common::strata_bin())
        .args([
            "csi",
            "--mode",
            "node",
            "--node-id",
            "node-1",
            "--endpoint",
            &format!("unix://{}", work.path().join("csi.sock").display()),
            "--attach-state-dir",
            &work.path().join("attach").display().to_string(),
            "--health-listen",
            &taken.local_addr().unwrap().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen for /healthz on"), "{err}");
}
