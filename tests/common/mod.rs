//! Test harness for end-to-end tests: real `strata` processes on loopback
//! ports, real clients (nbdinfo, qemu-io, nbdcopy, fio) run with deadlines.
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing running.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The strata binary: `STRATA_BIN` (the release build, set by
/// scripts/test-all.sh) or the one cargo built for these tests.
pub fn strata_bin() -> PathBuf {
    std::env::var_os("STRATA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_strata")))
}

pub fn free_addr() -> SocketAddr {
    strata_replica::testing::spare_loopback_addr()
}

/// Fails loudly when a client the tests need is not installed.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run scripts/test-all.sh, which installs the test clients"
    );
}

/// Runs `prog args` with a deadline; returns its output.
pub fn run(prog: &str, args: &[&str], timeout_secs: u64) -> Output {
    Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(timeout_secs.to_string())
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// The libiscsi URL of LUN 0 of `volume`'s target at `addr`. When this
/// process's environment gives a cluster key (`STRATA_CLUSTER_KEY_FILE`,
/// as `.ci/run`'s keyed pass of the process tests does), the controllers
/// the test starts inherit it and require CHAP from it: the URL then
/// carries the credentials `strata key chap` derives.
pub fn iscsi_url(addr: SocketAddr, volume: &str) -> String {
    let iqn = format!("iqn.2026-11.io.strata:{volume}");
    if std::env::var_os("STRATA_CLUSTER_KEY_FILE").is_none() {
        return format!("iscsi://{addr}/{iqn}/0");
    }
    let text = run_ok(
        strata_bin().to_str().unwrap(),
        &["key", "chap", "--volume", volume],
        30,
    );
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("no {name} in `strata key chap`: {text}"))
            .to_string()
    };
    format!(
        "iscsi://{}%{}@{addr}/{iqn}/0",
        field("username"),
        field("secret")
    )
}

/// Runs and asserts success, returning stdout.
pub fn run_ok(prog: &str, args: &[&str], timeout_secs: u64) -> String {
    let out = run(prog, args, timeout_secs);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], log_dir: &Path) -> Proc {
        Proc::spawn_with(name, &[], args, log_dir)
    }

    /// Like [`Proc::spawn`], with `prefix` (e.g. `ip netns exec NS`) before
    /// the strata binary.
    pub fn spawn_with(name: &str, prefix: &[&str], args: &[String], log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = match prefix.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(strata_bin());
                c
            }
            None => Command::new(strata_bin()),
        };
        let child = cmd
            .args(args)
            // STRATA_TEST_LOG=debug (say) for more detail in the logs that
            // failing tests print.
            .env(
                "STRATA_LOG",
                std::env::var("STRATA_TEST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start strata {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `secs` for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, secs: u64) -> bool {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        false
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts connections (or the process dies).
pub fn wait_listening(addr: SocketAddr, proc_: &mut Proc, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if !proc_.is_running() {
            panic!(
                "{} exited before listening on {addr}:\n{}",
                proc_.name,
                proc_.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{} did not listen on {addr} within {secs}s:\n{}",
        proc_.name,
        proc_.log_text()
    );
}

/// Replica servers and a controller, as separate processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub volume: String,
    pub replicas: Vec<Proc>,
    pub replica_addrs: Vec<SocketAddr>,
    pub controller: Option<Proc>,
    pub nbd: SocketAddr,
    pub control: SocketAddr,
    pub metrics: SocketAddr,
    pub size: u64,
    /// Extra `controller serve` arguments.
    pub controller_args: Vec<String>,
}

impl Cluster {
    pub fn start(replicas: usize, size: u64) -> Cluster {
        let mut c = Cluster::without_processes(size);
        for i in 0..replicas {
            let addr = free_addr();
            c.replica_addrs.push(addr);
            c.replicas.push(c.spawn_replica(i, addr));
        }
        c.start_controller();
        c
    }

    /// A cluster description with no process started yet.
    pub fn without_processes(size: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        Cluster {
            volume: "vol".into(),
            replicas: Vec::new(),
            replica_addrs: Vec::new(),
            controller: None,
            nbd: free_addr(),
            control: free_addr(),
            metrics: free_addr(),
            size,
            dir,
            controller_args: Vec::new(),
        }
    }

    pub fn replica_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{i}"))
    }

    pub fn spawn_replica(&self, i: usize, addr: SocketAddr) -> Proc {
        self.spawn_replica_with(i, addr, &[])
    }

    /// [`Cluster::spawn_replica`] with `extra` on its `replica serve` line.
    pub fn spawn_replica_with(&self, i: usize, addr: SocketAddr, extra: &[String]) -> Proc {
        let mut args: Vec<String> = vec![
            "replica".into(),
            "serve".into(),
            "--dir".into(),
            self.replica_dir(i).display().to_string(),
            "--listen".into(),
            addr.to_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut p = Proc::spawn(&format!("replica-{i}"), &args, self.dir.path());
        wait_listening(addr, &mut p, 20);
        p
    }

    pub fn start_controller(&mut self) {
        let mut args: Vec<String> = vec![
            "controller".into(),
            "serve".into(),
            "--volume".into(),
            self.volume.clone(),
            "--nbd".into(),
            self.nbd.to_string(),
            "--control".into(),
            self.control.to_string(),
            "--metrics".into(),
            self.metrics.to_string(),
            "--create-size".into(),
            self.size.to_string(),
            "--io-timeout-secs".into(),
            "5".into(),
        ];
        for a in &self.replica_addrs {
            args.push("--replica".into());
            args.push(a.to_string());
        }
        args.extend(self.controller_args.iter().cloned());
        let mut p = Proc::spawn("controller", &args, self.dir.path());
        wait_listening(self.nbd, &mut p, 30);
        self.controller = Some(p);
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.nbd, self.volume)
    }

    /// Stops the controller and replicas with SIGTERM (clean shutdown).
    pub fn stop_clean(&mut self) {
        if let Some(mut c) = self.controller.take() {
            assert!(
                c.terminate(30),
                "controller did not stop cleanly:\n{}",
                c.log_text()
            );
        }
        for r in &mut self.replicas {
            if r.is_running() {
                assert!(
                    r.terminate(30),
                    "{} did not stop cleanly:\n{}",
                    r.name,
                    r.log_text()
                );
            }
        }
    }

    /// Opens replica `i`'s store directly (its server must be stopped).
    /// A store this process just closed may still be locked for a moment:
    /// a process another test is spawning holds a copy of the lock's file
    /// descriptor between its fork and its exec (CI saw this once).
    pub fn open_store(&self, i: usize) -> strata_replica::Store {
        let dir = self.replica_dir(i).join(&self.volume);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match strata_replica::Store::open(
                &dir,
                std::sync::Arc::new(strata_replica::engine::PortableEngine),
            ) {
                Ok((store, _)) => return store,
                Err(strata_replica::StoreError::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot open replica {i} at {}: {e}", dir.display()),
            }
        }
    }
}

/// Runs qemu-io on a raw NBD URI or image file with `cmds` (each a `-c`),
/// failing the test if it fails or a pattern check does; returns its output.
pub fn qemu_io<S: AsRef<str>>(target: &str, cmds: &[S]) -> String {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c.as_ref());
    }
    args.push(target);
    let out = run_ok("qemu-io", &args, 120);
    assert!(!out.contains("verification failed"), "{out}");
    out
}

/// fio's JSON output if it wrote one (it may not after an error).
pub fn fio_json_opt(stdout: &[u8]) -> Option<serde_json::Value> {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(&text[text.find('{')?..]).ok()
}

/// fio's JSON output, skipping the lines its nbd engine prints first.
pub fn fio_json(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output: {text}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("bad fio JSON ({e}): {text}"))
}

impl Cluster {
    /// `strata volume status --json` of this cluster's controller.
    pub fn status(&self) -> serde_json::Value {
        let out = run(
            strata_bin().to_str().unwrap(),
            &[
                "volume",
                "status",
                "--json",
                "--controller",
                &self.control.to_string(),
            ],
            30,
        );
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until every replica is healthy; returns the last status.
    pub fn wait_all_healthy(&self, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if s["state"] == "healthy" {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "volume not healthy after {secs}s: {s}\ncontroller log:\n{}",
                    self.controller
                        .as_ref()
                        .map(|c| c.log_text())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The arguments of a second `controller serve` for this cluster's
    /// replicas, listening for NBD on `nbd` (management and metrics on free
    /// ports).
    pub fn controller_command(&self, nbd: SocketAddr) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "controller".into(),
            "serve".into(),
            "--volume".into(),
            self.volume.clone(),
            "--nbd".into(),
            nbd.to_string(),
            "--control".into(),
            free_addr().to_string(),
            "--metrics".into(),
            free_addr().to_string(),
        ];
        for a in &self.replica_addrs {
            args.push("--replica".into());
            args.push(a.to_string());
        }
        args
    }

    /// Restarts replica `i` on its old address and directory.
    pub fn restart_replica(&mut self, i: usize) {
        let p = self.spawn_replica(i, self.replica_addrs[i]);
        self.replicas[i] = p;
    }

    /// Stops everything cleanly and asserts that every replica reads the
    /// same over the whole volume.
    pub fn stop_and_compare(&mut self) {
        self.stop_clean();
        let n = self.replicas.len();
        let stores: Vec<_> = (0..n).map(|i| self.open_store(i)).collect();
        let size = stores[0].size();
        for (i, s) in stores.iter().enumerate().skip(1) {
            assert_eq!(
                s.size(),
                size,
                "replica {i}'s size differs from replica 0's"
            );
        }
        let chunk = 16 << 20;
        let mut a = vec![0u8; chunk];
        let mut b = vec![0u8; chunk];
        let mut off = 0;
        while off < size {
            let len = chunk.min((size - off) as usize);
            stores[0].read(off, &mut a[..len]).unwrap();
            for (i, s) in stores.iter().enumerate().skip(1) {
                s.read(off, &mut b[..len]).unwrap();
                assert!(
                    a[..len] == b[..len],
                    "replica {i} differs from replica 0 in the 16 MiB at {off}"
                );
            }
            off += len as u64;
        }
        // The same snapshot chain everywhere, each snapshot reading the same.
        let chain = stores[0].snapshot_names();
        for (i, s) in stores.iter().enumerate().skip(1) {
            assert_eq!(
                s.snapshot_names(),
                chain,
                "replica {i}'s snapshots differ from replica 0's"
            );
        }
        for snap in &chain {
            let view = strata_replica::View::Snapshot(snap);
            let snap_size = stores[0].view_size(view).unwrap();
            for (i, s) in stores.iter().enumerate().skip(1) {
                assert_eq!(
                    s.view_size(view).unwrap(),
                    snap_size,
                    "snapshot {snap} of replica {i}"
                );
            }
            let mut off = 0;
            while off < snap_size {
                let len = chunk.min((snap_size - off) as usize);
                stores[0].read_view(view, off, &mut a[..len]).unwrap();
                for (i, s) in stores.iter().enumerate().skip(1) {
                    s.read_view(view, off, &mut b[..len]).unwrap();
                    assert!(
                        a[..len] == b[..len],
                        "snapshot {snap} of replica {i} differs from replica 0's in the 16 MiB at {off}"
                    );
                }
                off += len as u64;
            }
        }
    }
}

/// Runs the strata binary with `args` (bounded in time).
pub fn strata(args: &[&str]) -> Output {
    run(strata_bin().to_str().unwrap(), args, 300)
}

/// [`strata`], failing the test if it fails; returns its stdout.
pub fn strata_ok(args: &[&str]) -> String {
    let out = strata(args);
    assert!(
        out.status.success(),
        "strata {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`strata_ok`] of a `--json` command, parsed.
pub fn strata_json(args: &[&str]) -> serde_json::Value {
    let out = strata_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("strata {args:?}: not JSON ({e}): {out}"))
}

impl Cluster {
    /// [`Cluster::start`] with the controller also serving iSCSI; returns
    /// the iSCSI address.
    pub fn start_with_iscsi(replicas: usize, size: u64) -> (Cluster, SocketAddr) {
        let mut c = Cluster::without_processes(size);
        let iscsi = free_addr();
        c.controller_args = vec!["--iscsi".into(), iscsi.to_string()];
        for i in 0..replicas {
            let addr = free_addr();
            c.replica_addrs.push(addr);
            c.replicas.push(c.spawn_replica(i, addr));
        }
        c.start_controller();
        wait_listening(iscsi, c.controller.as_mut().unwrap(), 30);
        (c, iscsi)
    }
}

impl Cluster {
    /// A cluster whose replicas and controller all hold a new cluster key
    /// (`strata key init`, `--cluster-key-file`); `controller_args` go to
    /// `controller serve` after the key. Returns the key file.
    pub fn start_keyed(
        replicas: usize,
        size: u64,
        controller_args: &[String],
    ) -> (Cluster, PathBuf) {
        let mut c = Cluster::without_processes(size);
        let key = c.dir.path().join("cluster.key");
        let key_arg = ["--cluster-key-file".to_string(), key.display().to_string()];
        strata_ok(&["key", "init", "--out", &key_arg[1]]);
        c.controller_args = key_arg.to_vec();
        c.controller_args.extend(controller_args.iter().cloned());
        for i in 0..replicas {
            let addr = free_addr();
            c.replica_addrs.push(addr);
            c.replicas.push(c.spawn_replica_with(i, addr, &key_arg));
        }
        c.start_controller();
        (c, key)
    }
}

/// A one-connection TCP relay to `target` that records what the client
/// sent; joined, it returns those bytes.
pub fn recording_proxy(target: SocketAddr) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut server = std::net::TcpStream::connect(target).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Write);
        });
        let mut recorded = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    recorded.extend_from_slice(&buf[..n]);
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
        recorded
    });
    (addr, handle)
}

/// Sends `bytes` on a new connection to `addr`; returns what came back
/// before the server closed (or 5 s passed).
pub fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    back
}
