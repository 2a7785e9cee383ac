//! [`Pending`]: the outcome of a write that may still be waiting for its commit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::channel::oneshot;

use crate::write::WriteOutcome;
use crate::StoreError;

/// A write's outcome: ready at once (memory engine) or delivered by a committer thread.
///
/// Await it from async code, or [`wait`](Pending::wait) for it from a plain thread.
/// Dropping it does not cancel the write; only the outcome is lost.
#[must_use = "a write's outcome tells whether it happened"]
pub struct Pending<T> {
    state: State<T>,
}

enum State<T> {
    Ready(Option<Result<T, StoreError>>),
    Waiting(oneshot::Receiver<Result<T, StoreError>>),
    /// A write's outcome of one kind ([`Pending::map_write`]): no box.
    Write(
        oneshot::Receiver<Result<WriteOutcome, StoreError>>,
        fn(WriteOutcome) -> Result<T, StoreError>,
    ),
    Mapped(Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>),
}

/// The committer's end: completes one [`Pending`] (engines outside this crate make them
/// with [`Pending::channel`]).
pub struct Completer<T>(oneshot::Sender<Result<T, StoreError>>);

impl<T> Completer<T> {
    pub fn complete(self, outcome: Result<T, StoreError>) {
        // The waiter may be gone (its call hit its deadline); the write stands regardless.
        let _ = self.0.send(outcome);
    }
}

impl<T> Pending<T> {
    pub fn ready(outcome: Result<T, StoreError>) -> Self {
        Self {
            state: State::Ready(Some(outcome)),
        }
    }

    /// A pending outcome and the end that completes it.
    pub fn channel() -> (Completer<T>, Self) {
        let (tx, rx) = oneshot::channel();
        (
            Completer(tx),
            Self {
                state: State::Waiting(rx),
            },
        )
    }

    /// The outcome passed through `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> Result<U, StoreError> + Send + 'static) -> Pending<U>
    where
        T: Send + 'static,
    {
        match self.state {
            State::Ready(Some(r)) => Pending::ready(r.and_then(f)),
            _ => Pending {
                state: State::Mapped(Box::pin(async move { self.await.and_then(f) })),
            },
        }
    }

    /// The outcome if it is known already (a ready `Pending`), else the `Pending` back.
    pub fn now(self) -> Result<Result<T, StoreError>, Self> {
        match self.state {
            State::Ready(Some(outcome)) => Ok(outcome),
            state => Err(Self { state }),
        }
    }

    /// Blocks the current thread until the outcome is known. Not for async contexts.
    pub fn wait(self) -> Result<T, StoreError> {
        futures::executor::block_on(self)
    }
}

impl Pending<WriteOutcome> {
    /// [`map`](Pending::map) for a write's outcome taken out as its kind's (`Put` →
    /// `PutOutcome`, ...): a function, not a closure, so a waiting outcome needs no box.
    pub fn map_write<T>(self, f: fn(WriteOutcome) -> Result<T, StoreError>) -> Pending<T>
    where
        T: Send + 'static,
    {
        match self.state {
            State::Ready(Some(r)) => Pending::ready(r.and_then(f)),
            State::Waiting(rx) => Pending {
                state: State::Write(rx, f),
            },
            state => Pending { state }.map(f),
        }
    }
}

/// A completer's message, or what it means that none came.
fn received<T>(r: Result<Result<T, StoreError>, oneshot::Canceled>) -> Result<T, StoreError> {
    r.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(
            "storage closed before the write's outcome was known".into(),
        ))
    })
}

// No field is ever pinned structurally: the ready value is moved out, the receiver is Unpin.
impl<T> Unpin for Pending<T> {}

impl<T> Future for Pending<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Ready(outcome) => Poll::Ready(outcome.take().unwrap_or_else(|| {
                Err(StoreError::Internal(
                    "write outcome polled after completion".into(),
                ))
            })),
            State::Waiting(rx) => Pin::new(rx).poll(cx).map(received),
            State::Write(rx, f) => Pin::new(rx).poll(cx).map(|r| received(r).and_then(*f)),
            State::Mapped(f) => f.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.state {
            State::Ready(_) => "Pending::Ready",
            State::Waiting(_) => "Pending::Waiting",
            State::Write(..) => "Pending::Write",
            State::Mapped(_) => "Pending::Mapped",
        })
    }
}
