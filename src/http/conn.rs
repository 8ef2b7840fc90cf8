//! The connections: recd serves HTTP/1.1 with hyper itself, rather than
//! through `axum::serve`, for what a public service needs from its sockets:
//!
//! - a header read timeout: a connection that has not sent a whole request
//!   head within `header_read_timeout` of opening, or of its previous
//!   answer, is closed (idle and trickling clients do not hold descriptors);
//! - a lingering close: when recd answers before reading a body (401, 413)
//!   the connection ends, and closing a socket with unread bytes would reset
//!   it, so the client could lose the answer while it is still sending. recd
//!   shuts its side down and reads what is still coming for a bounded time
//!   first;
//! - the peer's address in each request ([`ConnectInfo`]), for the rate
//!   limit of clients without an API key;
//! - graceful shutdown: on stop, no new connection is accepted, idle ones
//!   close and busy ones finish their request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// After its answer, a connection reads (and drops) what the client still
/// sends for at most this long...
const LINGER_TIME: Duration = Duration::from_secs(2);
/// ...or this many bytes, before it closes.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// Accepts connections on `listener` and serves `router` on each until
/// `stop` turns true; then stops accepting, asks every connection to finish
/// and waits for them (the caller bounds the wait).
pub async fn serve(listener: TcpListener, router: Router, header_read_timeout: Duration, stop: watch::Receiver<bool>) {
    let connections = TaskTracker::new();
    let mut stopping = stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors or a connection that died in the
                // backlog: the next accept may work; don't spin meanwhile.
                metrics::counter!("recd_http_accept_errors_total").increment(1);
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            router.clone(),
            header_read_timeout,
            stop.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    metrics::counter!("recd_http_connections_total").increment(1);
    let open = metrics::gauge!("recd_http_connections_open");
    open.increment(1.0);
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        // Boxed: hyper needs a future it can move.
        Box::pin(async move { Ok::<_, Infallible>(router.oneshot(request).await.unwrap_or_else(|e| match e {})) })
    });
    let mut connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut asked_to_stop = false;
    let ended = loop {
        tokio::select! {
            ended = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => break ended,
            _ = stop.wait_for(|stop| *stop), if !asked_to_stop => {
                asked_to_stop = true;
                std::pin::Pin::new(&mut connection).graceful_shutdown();
            }
        }
    };
    match ended {
        // The exchange ended cleanly: the client closed, or recd answered
        // and closes (keep-alive off, or a body left unread).
        Ok(()) => linger(connection.into_parts().io.into_inner()).await,
        Err(e) => {
            let kind = if e.is_timeout() { "header_timeout" } else { "error" };
            metrics::counter!("recd_http_connections_closed_total", "reason" => kind).increment(1);
            tracing::debug!(error = %e, %peer, "connection ended");
        }
    }
    open.decrement(1.0);
}

/// Closes our side, then reads what the peer still sends (for a bounded
/// time and amount) so the close does not reset the connection and take
/// the answer with it.
async fn linger(mut stream: TcpStream) {
    let _ = stream.flush().await;
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buffer = vec![0u8; 16 * 1024];
    let mut drained = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while drained < LINGER_BYTES {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}
