//! The NBD tests' server: a `MemBackend` served on 127.0.0.1:0 from a tokio
//! runtime on its own thread, stopped and joined when dropped.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use strata_controller::frontend::mem::MemBackend;
use strata_controller::frontend::nbd::serve;
use tokio::sync::watch;

pub struct Server {
    pub addr: SocketAddr,
    pub backend: Arc<MemBackend>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves a `size`-byte in-memory export named "test".
    pub fn start(size: u64) -> Server {
        let backend = Arc::new(MemBackend::new("test", size));
        let (stop, rx) = watch::channel(false);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let b = backend.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                serve(l, b, None, rx).await.unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Server {
            addr,
            backend,
            stop,
            thread: Some(thread),
        }
    }

    /// A blocking connection with 10 s timeouts, so a hang fails the test.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/test", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
