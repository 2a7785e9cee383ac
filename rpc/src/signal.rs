//! [`Signal`]: a stop flag one task of this thread waits on.
//!
//! Why not `tokio::sync::Notify`: a connection's loop polls its stop signals at every
//! wake-up, which at one call in flight is once per call, and polling a registered
//! `Notified` takes Notify's lock each time (a few percent of a server's CPU with 1,000
//! connections). A connection and what stops it live on one thread, so a flag and one
//! stored waker do.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::task::{Poll, Waker};

/// Set once, from this thread; [`wait`](Signal::wait) resolves once it is set, whenever
/// the wait began. One waiter at a time: a second `wait` polled takes the waker over.
#[derive(Default)]
pub struct Signal {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    /// Sets the signal and wakes its waiter.
    pub fn set(&self) {
        self.set.set(true);
        // Taken out first: the wake may poll the waiter, which would borrow the cell.
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Resolves once the signal is set (at once if it already is).
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.get() {
                return Poll::Ready(());
            }
            let mut stored = self.waker.borrow_mut();
            if !stored.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *stored = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_ends_when_set_before_or_while_waiting() {
        let early = Signal::default();
        early.set();
        early.wait().await;

        let s = std::rc::Rc::new(Signal::default());
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let setter = std::rc::Rc::clone(&s);
                let waiter = tokio::task::spawn_local(async move { s.wait().await });
                // The waiter registers, then the set wakes it.
                tokio::task::yield_now().await;
                assert!(!waiter.is_finished());
                setter.set();
                waiter.await.expect("the waiter ends");
                assert!(setter.is_set());
            })
            .await;
    }
}
