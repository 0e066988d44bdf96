//! Whether a live API connection is at work: a tower layer counts each
//! connection's requests in flight (a request is in flight until its
//! response body is dropped, so an open Watch or Exec stream counts), and
//! the front door closes connections that are idle when room is needed or
//! once [`super::ConnectionLimits::idle_timeout`] has passed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::task::AtomicWaker;
use tonic::transport::server::TcpConnectInfo;

use super::admission::Live;

/// One live connection's state, shared by its [`super::Conn`], the
/// accounting and the requests it carries.
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
    /// The connection's reader, woken to see `closed`.
    reader: AtomicWaker,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        })
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Called by the connection's reader: `true` once it should end (its
    /// reads then return end of file, and hyper closes the connection).
    pub(crate) fn poll_closed(&self, cx: &Context<'_>) -> bool {
        self.reader.register(cx.waker());
        self.closed.load(Ordering::SeqCst)
    }
}

impl Live for Arc<Activity> {
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| {
            *self
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        })
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.reader.wake();
    }
}

/// One request in flight; the connection is idle again from its drop.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut since = self
            .0
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = Instant::now();
        }
    }
}

/// Live connections by peer address (unique among open connections), for
/// the layer to find a request's connection from its connect info.
#[derive(Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<HashMap<SocketAddr, Arc<Activity>>>>);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Activity>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, peer: SocketAddr, a: Arc<Activity>) {
        self.lock().insert(peer, a);
    }

    pub(crate) fn remove(&self, peer: SocketAddr) {
        self.lock().remove(&peer);
    }

    fn get(&self, peer: SocketAddr) -> Option<Arc<Activity>> {
        self.lock().get(&peer).cloned()
    }
}

/// The tower layer that marks requests in flight on their connection.
#[derive(Clone)]
pub(crate) struct TrackRequests(pub(crate) Registry);

impl<S> tower::Layer<S> for TrackRequests {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked {
            inner,
            registry: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    registry: Registry,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Counted<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let busy = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|i| i.remote_addr)
            .and_then(|peer| self.registry.get(peer))
            .map(|a| a.begin());
        let response = self.inner.call(req);
        Box::pin(async move {
            let r = response.await?;
            Ok(r.map(|inner| Counted { inner, _busy: busy }))
        })
    }
}

/// A response body that keeps its request in flight until dropped.
pub(crate) struct Counted<B> {
    inner: B,
    _busy: Option<Busy>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
