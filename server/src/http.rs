//! The operator HTTP listener (`metrics_listen`): `/metrics` for Prometheus, `/healthz`
//! (liveness: the process serves) and `/readyz` (readiness: 503 while draining or while
//! the disk is too full to take writes), so that
//! probes need no RPC client. hyper serves HTTP/1.1; every connection is bounded by a
//! header-read timeout, and the listener stops with the server.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::chain::{NotReady, Shared};

/// A slow or idle probe connection is dropped after this long without a full request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(path: &str, handle: &PrometheusHandle, shared: &Shared) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            shared.publish_gauges();
            reply(StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match shared.not_ready() {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(NotReady::Draining) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".into(),
            ),
            // Like etcd's NOSPACE alarm: reads are served, but the node cannot do its job.
            Some(NotReady::WritesRefused(why)) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}; reads are served\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Serves until the task is dropped (the server aborts it at shutdown).
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (handle, shared) = (handle.clone(), Arc::clone(&shared));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = route(req.uri().path(), &handle, &shared);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_and_readiness_follows_the_drain() {
        let shared = Shared::new(
            &crate::Config::local_ephemeral(),
            Arc::new(capkv_store::MemoryStore::new()),
        );
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        assert_eq!(route("/healthz", &handle, &shared).status(), StatusCode::OK);
        assert_eq!(route("/readyz", &handle, &shared).status(), StatusCode::OK);
        assert_eq!(route("/metrics", &handle, &shared).status(), StatusCode::OK);
        assert_eq!(
            route("/x", &handle, &shared).status(),
            StatusCode::NOT_FOUND
        );
        shared.start_draining();
        assert_eq!(
            route("/readyz", &handle, &shared).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            route("/healthz", &handle, &shared).status(),
            StatusCode::OK,
            "still live"
        );
    }
}
