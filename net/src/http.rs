//! [`serve_get`]: the smallest HTTP/1.1 server that answers `GET` with a
//! text body and closes. Enough for Prometheus scraping `/metrics` and a
//! kubelet probing `/healthz`; nothing else speaks to these ports.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Limits;

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read; a longer one is answered 431.
const MAX_HEAD: usize = 4096;

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status line text after the version, e.g. `200 OK`.
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// The path of a `GET` request head (query string included), or `None`
/// for anything else.
pub fn get_path(head: &str) -> Option<&str> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    if parts.next()? != "GET" {
        return None;
    }
    let path = parts.next()?;
    parts.next()?.starts_with("HTTP/").then_some(path)
}

/// Serves `GET` requests on `listener` with `answer(path)` until
/// `shutdown`. A request that is not a `GET` gets 405; a head that does
/// not arrive within 5 s, or is over 4 KiB, gets nothing or 431.
pub async fn serve_get<H, F>(
    listener: TcpListener,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    answer: H,
) where
    H: Fn(String) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send,
{
    crate::serve(listener, limits, shutdown, move |mut sock, _| {
        let answer = answer.clone();
        async move {
            let mut buf = vec![0u8; MAX_HEAD];
            let mut n = 0;
            let read = tokio::time::timeout(HEAD_TIMEOUT, async {
                while n < buf.len() {
                    let m = sock.read(&mut buf[n..]).await?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return Ok(true);
                    }
                }
                Ok::<_, std::io::Error>(false)
            })
            .await;
            let reply = match read {
                Ok(Ok(true)) => match get_path(&String::from_utf8_lossy(&buf[..n])) {
                    Some(path) => answer(path.to_string()).await,
                    None => Reply::text("405 Method Not Allowed", "only GET\n"),
                },
                Ok(Ok(false)) if n == buf.len() => {
                    Reply::text("431 Request Header Fields Too Large", "")
                }
                _ => return,
            };
            let head = format!(
                "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                reply.status,
                reply.content_type,
                reply.body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(reply.body.as_bytes()).await;
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_get_requests() {
        assert_eq!(
            get_path("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(
            get_path("GET /healthz?x=1 HTTP/1.0\r\n\r\n"),
            Some("/healthz?x=1")
        );
        assert_eq!(get_path("POST /metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(get_path("GET /metrics\r\n\r\n"), None);
        assert_eq!(get_path(""), None);
    }

    #[tokio::test]
    async fn answers_gets_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let limits = Limits {
            name: "test",
            max_connections: 4,
            grace: Duration::from_millis(100),
        };
        let server = tokio::spawn(serve_get(listener, limits, rx, |path: String| async move {
            if path == "/healthz" {
                Reply::text("200 OK", "ok\n")
            } else {
                Reply::text("404 Not Found", "no\n")
            }
        }));
        let ask = |req: &'static [u8]| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = ask(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        assert!(ok.contains("Content-Length: 3\r\n"), "{ok}");
        let missing = ask(b"GET /x HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = ask(b"POST /healthz HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let long = ask(&[b'A'; 4096]).await;
        assert!(long.starts_with("HTTP/1.1 431"), "{long}");
        tx.send(true).unwrap();
        server.await.unwrap();
    }
}
