//! `GET /healthz` for the kubelet's liveness probe, as the kubernetes-csi
//! `livenessprobe` sidecar served it, from the driver process itself (one
//! Go process fewer in each of the controller and node pods): each request
//! connects to this process's own CSI endpoint, the socket the kubelet and
//! the provisioner use, and calls Identity `Probe`. 200 `ok` when it
//! answers ready within 3 s; 503 with the reason otherwise (the socket
//! gone from the host path, a wedged server), which after the probe's
//! failureThreshold restarts the container.

use std::time::Duration;

use strata_net::http::Reply;
use strata_proto::csi::identity_client::IdentityClient;
use strata_proto::csi::ProbeRequest;
use tonic::transport::Channel;

use crate::endpoint::Endpoint;

/// How long one probe waits for the CSI endpoint.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves `/healthz` on `listen` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let limits = strata_net::Limits {
        name: "healthz",
        max_connections: 4,
        grace: Duration::from_secs(1),
    };
    strata_net::http::serve_get(listener, limits, shutdown, move |path: String| {
        let endpoint = endpoint.clone();
        async move {
            if path != "/healthz" && !path.starts_with("/healthz?") {
                return Reply::text("404 Not Found", "try /healthz\n");
            }
            match tokio::time::timeout(PROBE_TIMEOUT, probe(&endpoint)).await {
                Ok(Ok(())) => Reply::text("200 OK", "ok\n"),
                Ok(Err(why)) => {
                    tracing::warn!(%why, "liveness probe failed");
                    Reply::text("503 Service Unavailable", format!("{why}\n"))
                }
                Err(_) => {
                    tracing::warn!("liveness probe: the CSI endpoint did not answer in 3 s");
                    Reply::text(
                        "503 Service Unavailable",
                        "the CSI endpoint did not answer Probe within 3 s\n",
                    )
                }
            }
        }
    })
    .await
}

/// Calls Identity `Probe` on `endpoint`, as the kubelet's CSI client would.
pub async fn probe(endpoint: &Endpoint) -> Result<(), String> {
    let channel = connect(endpoint)
        .await
        .map_err(|e| format!("cannot connect to the CSI endpoint {endpoint:?}: {e}"))?;
    let reply = IdentityClient::new(channel)
        .probe(ProbeRequest {})
        .await
        .map_err(|s| format!("Probe failed: {}", s.message()))?
        .into_inner();
    match reply.ready {
        Some(false) => Err("Probe answered not ready".into()),
        _ => Ok(()),
    }
}

async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
        }
        Endpoint::Unix(path) => {
            let path = path.clone();
            let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let sock = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(sock))
                }
            });
            tonic::transport::Endpoint::from_static("http://csi.sock")
                .connect_with_connector(connector)
                .await
        }
    }
}
