//! The targets under test and their processes: `Kind` (qemu-nbd,
//! nbd-server, strata with N replicas), `Server` (children killed on drop, or
//! a daemon pid), the launchers `start_qemu_nbd`, `start_nbd_server` and
//! `start_strata`, the spawn/listen/log-tail helpers, and the warnings a slow
//! or unclean stop leaves for the report.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::opts::Opts;
use crate::sampler::{alive, descendants, parent_map, Watch};

const EXPORT: &str = "bench";

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    QemuNbd,
    NbdServer,
    Strata(usize),
}

impl Kind {
    pub(crate) fn label(self) -> String {
        match self {
            Kind::QemuNbd => "qemu-nbd".into(),
            Kind::NbdServer => "nbd-server".into(),
            Kind::Strata(1) => "strata-1".into(),
            Kind::Strata(n) => format!("strata-{n}"),
        }
    }
}

/// A loopback port below the kernel's ephemeral range: a port from
/// `bind(":0")` could be taken by any outgoing connection between our
/// check and the server binding it.
fn free_addr() -> Result<SocketAddr> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    for _ in 0..1000 {
        let port = 31_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 1000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free loopback port in 31000-31999")
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this benchmark started.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub(crate) fn tail(path: &Path) -> String {
    tail_n(path, 15)
}

/// The last `n` lines of a log, without terminal colour codes.
fn tail_n(path: &Path, n: usize) -> String {
    let raw = fs::read_to_string(path).unwrap_or_default();
    let mut s = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            s.push(c);
        }
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running target: its child processes (killed on drop) or a daemon pid.
pub(crate) struct Server {
    label: String,
    pub(crate) uri: String,
    pub(crate) watch: Vec<Watch>,
    children: Vec<(String, Child, PathBuf)>,
    daemon: Option<i32>,
}

impl Server {
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for (name, child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}):\n{}", tail(log));
            }
        }
        if let Some(pid) = self.daemon {
            if !alive(pid) {
                bail!("{} (pid {pid}) is gone", self.label);
            }
        }
        Ok(())
    }

    pub(crate) fn stop(&mut self) {
        // The controller first (it flushes to its replicas), then the rest.
        for (name, child, log) in &mut self.children {
            if let Ok(Some(_)) = child.try_wait() {
                continue; // already gone: check_alive reports that
            }
            let t = Instant::now();
            kill(child.id() as i32, libc::SIGTERM);
            let deadline = t + STOP_TIMEOUT;
            let mut status = None;
            while Instant::now() < deadline {
                if let Ok(Some(st)) = child.try_wait() {
                    status = Some(st);
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let secs = t.elapsed().as_secs_f64();
            match status {
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    warn(format!(
                        "{} {name}: no exit within {} s of SIGTERM, killed",
                        self.label,
                        STOP_TIMEOUT.as_secs()
                    ));
                }
                Some(st) if !st.success() && st.code().is_some() => warn(format!(
                    "{} {name}: exited {st} after SIGTERM; log tail: {}",
                    self.label,
                    tail_n(log, 3).replace('\n', " / ")
                )),
                Some(_) if secs > 5.0 => warn(format!(
                    "{} {name}: took {secs:.1} s to stop after SIGTERM",
                    self.label
                )),
                Some(_) => {}
            }
        }
        self.children.clear();
        if let Some(pid) = self.daemon.take() {
            let pids = descendants(pid, &parent_map());
            for &p in pids.iter().rev() {
                kill(p, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
                thread::sleep(Duration::from_millis(20));
            }
            for &p in &pids {
                if alive(p) {
                    kill(p, libc::SIGKILL);
                }
            }
        }
    }
}

/// A server process that had to be killed, or stopped slowly: reported, not
/// a failure.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn warn(msg: String) {
    say!("!! warning: {msg}");
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
}

pub(crate) fn warnings() -> Vec<String> {
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_logged(prog: &Path, args: &[String], log: &Path) -> Result<Child> {
    let f = fs::File::create(log)?;
    Command::new(prog)
        .args(args)
        .env("STRATA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("cannot start {}", prog.display()))
}

fn wait_listening(addr: SocketAddr, server: &mut Server, secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        server.check_alive()?;
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not listen on {addr} within {secs} s", server.label)
}

fn raw_file(dir: &Path, size: u64) -> Result<PathBuf> {
    let path = dir.join("disk.raw");
    fs::File::create(&path)?.set_len(size)?;
    Ok(path)
}

fn start_qemu_nbd(dir: &Path, size: u64) -> Result<Server> {
    let file = raw_file(dir, size)?;
    let addr = free_addr()?;
    let args: Vec<String> = [
        "--cache=writeback",
        "-f",
        "raw",
        "--persistent",
        "--shared=8",
        "-x",
        EXPORT,
        "-b",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        &file.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join("qemu-nbd.log");
    let child = spawn_logged(Path::new("qemu-nbd"), &args, &log)?;
    let pid = child.id() as i32;
    let mut s = Server {
        label: "qemu-nbd".into(),
        uri: format!("nbd://{addr}/{EXPORT}"),
        watch: vec![Watch {
            name: "qemu-nbd".into(),
            pid,
            tree: false,
        }],
        children: vec![("qemu-nbd".into(), child, log)],
        daemon: None,
    };
    wait_listening(addr, &mut s, 20)?;
    Ok(s)
}

fn start_nbd_server(dir: &Path, size: u64) -> Result<Server> {
    let file = raw_file(dir, size)?;
    let addr = free_addr()?;
    let config = dir.join("nbd-server.conf");
    let pidfile = dir.join("nbd-server.pid");
    fs::write(
        &config,
        format!(
            "[generic]\nlistenaddr = 127.0.0.1\nport = {}\n\n[{EXPORT}]\nexportname = {}\n",
            addr.port(),
            file.display()
        ),
    )?;
    // nbd-server daemonizes (its -d serves one connection only): the
    // launcher exits, the daemon writes its pid file.
    let log = dir.join("nbd-server.log");
    let out = Command::new("nbd-server")
        .arg("-C")
        .arg(&config)
        .arg("-p")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(dir.join("nbd-server.err"))?)
        .status()
        .context("cannot run nbd-server")?;
    if !out.success() {
        bail!(
            "nbd-server exited {out}:\n{}",
            tail(&dir.join("nbd-server.err"))
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break pid;
        }
        if Instant::now() > deadline {
            bail!("nbd-server wrote no pid file");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut s = Server {
        label: "nbd-server".into(),
        uri: format!("nbd://{addr}/{EXPORT}"),
        watch: vec![Watch {
            name: "nbd-server".into(),
            pid,
            tree: true,
        }],
        children: Vec::new(),
        daemon: Some(pid),
    };
    wait_listening(addr, &mut s, 20)?;
    Ok(s)
}

fn start_strata(bin: &Path, dir: &Path, size: u64, replicas: usize) -> Result<Server> {
    let mut s = Server {
        label: format!("strata-{replicas}"),
        uri: String::new(),
        watch: Vec::new(),
        children: Vec::new(),
        daemon: None,
    };
    let mut replica_addrs = Vec::new();
    let mut replica_children = Vec::new();
    for i in 0..replicas {
        let addr = free_addr()?;
        let name = format!("replica-{i}");
        let log = dir.join(format!("{name}.log"));
        let args = vec![
            "replica".to_string(),
            "serve".into(),
            "--dir".into(),
            dir.join(&name).display().to_string(),
            "--listen".into(),
            addr.to_string(),
        ];
        let child = spawn_logged(bin, &args, &log)?;
        s.watch.push(Watch {
            name: name.clone(),
            pid: child.id() as i32,
            tree: false,
        });
        s.children.push((name, child, log));
        wait_listening(addr, &mut s, 20)?;
        replica_addrs.push(addr);
    }
    // Stop order: controller first.
    replica_children.append(&mut s.children);
    let (nbd, control, metrics) = (free_addr()?, free_addr()?, free_addr()?);
    let mut args: Vec<String> = vec![
        "controller".into(),
        "serve".into(),
        "--volume".into(),
        EXPORT.into(),
        "--nbd".into(),
        nbd.to_string(),
        "--control".into(),
        control.to_string(),
        "--metrics".into(),
        metrics.to_string(),
        "--create-size".into(),
        size.to_string(),
    ];
    for a in &replica_addrs {
        args.push("--replica".into());
        args.push(a.to_string());
    }
    let log = dir.join("controller.log");
    let child = spawn_logged(bin, &args, &log)?;
    s.watch.insert(
        0,
        Watch {
            name: "controller".into(),
            pid: child.id() as i32,
            tree: false,
        },
    );
    s.children.push(("controller".into(), child, log));
    s.children.append(&mut replica_children);
    s.uri = format!("nbd://{nbd}/{EXPORT}");
    wait_listening(nbd, &mut s, 60)?;
    Ok(s)
}

pub(crate) fn start(kind: Kind, opts: &Opts, dir: &Path, size: u64) -> Result<Server> {
    fs::create_dir_all(dir)?;
    match kind {
        Kind::QemuNbd => start_qemu_nbd(dir, size),
        Kind::NbdServer => start_nbd_server(dir, size),
        Kind::Strata(n) => start_strata(&opts.strata, dir, size, n),
    }
}
