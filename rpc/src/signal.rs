//! [`Signal`]: a stop flag one task of this thread waits on. [`WhenWoken`]: a future
//! polled only when something it waits on woke it, not at every wake-up of its task.
//!
//! Why not `tokio::sync::Notify`: a connection's loop polls its stop signals at every
//! wake-up, which at one call in flight is once per call, and polling a registered
//! `Notified` takes Notify's lock each time (a few percent of a server's CPU with 1,000
//! connections). A connection and what stops it live on one thread, so a flag and one
//! stored waker do.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Set once, from this thread; [`wait`](Signal::wait) resolves once it is set, whenever
/// the wait began. One waiter at a time: a second `wait` polled takes the waker over.
#[derive(Default)]
pub struct Signal {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

thread_local! {
    /// Signals set on this thread so far (see [`sets_on_this_thread`]).
    static SETS: Cell<u64> = const { Cell::new(0) };
}

/// How many signals this thread has set: a waiter that polls its signal at every wake-up
/// can first check this one hot counter, and skip its own signal (a cold cache line with
/// thousands of connections) while the count is the one it saw last and its task's waker
/// is the one it registered.
pub fn sets_on_this_thread() -> u64 {
    SETS.get()
}

impl Signal {
    /// Sets the signal and wakes its waiter.
    pub fn set(&self) {
        self.set.set(true);
        SETS.set(SETS.get().wrapping_add(1));
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

/// `inner`, polled only when a waker it registered fired (and at its first poll), however
/// often the task around it is woken for other reasons.
///
/// Why: a connection's task waits on its RPC loop and on conditions that end it (an
/// injected kill, the idle timeout, a slow reader). Its socket wakes it once per call, and
/// a `select!` polls every branch at each wake-up: with 1,000 connections, touching those
/// conditions' cold state (a timer entry among them) for every call cost ~5% of the
/// server's CPU. Wrapped, they cost one flag check per call.
pub struct WhenWoken<F> {
    inner: Pin<Box<F>>,
    flag: Arc<WokenFlag>,
}

/// Set when `inner`'s waker fires; wakes the task around it.
struct WokenFlag {
    woken: AtomicBool,
    /// The task's waker, stored when `inner` was last polled. (A `Mutex` for `Wake`'s
    /// `Sync` bound: it is taken only when `inner` is polled or woken, never per call.)
    task: std::sync::Mutex<Option<Waker>>,
}

impl Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = match self.task.lock() {
            Ok(mut t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(w) = task {
            w.wake();
        }
    }
}

impl<F: Future> WhenWoken<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner: Box::pin(inner),
            // The first poll polls `inner`, which registers its wakers.
            flag: Arc::new(WokenFlag {
                woken: AtomicBool::new(true),
                task: std::sync::Mutex::new(None),
            }),
        }
    }
}

impl<F> WhenWoken<F> {
    /// Where the flag each poll reads lives, for a prefetch (see [`crate::hint`]) ahead of
    /// the poll.
    pub fn flag_ptr(&self) -> *const u8 {
        Arc::as_ptr(&self.flag).cast()
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // A plain load first: the flag is almost always clear.
        if !self.flag.woken.load(Ordering::Relaxed)
            || !self.flag.woken.swap(false, Ordering::Acquire)
        {
            return Poll::Pending;
        }
        // Stored before `inner` runs: a wake from inside its poll finds the task.
        match self.flag.task.lock() {
            Ok(mut t) => *t = Some(cx.waker().clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(cx.waker().clone()),
        }
        let waker = Waker::from(Arc::clone(&self.flag));
        self.inner.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_set_on_a_thread_counts_there() {
        let before = sets_on_this_thread();
        let s = Signal::default();
        s.set();
        s.set();
        assert_eq!(sets_on_this_thread(), before.wrapping_add(2));
        let other = std::thread::spawn(sets_on_this_thread).join().unwrap();
        assert_eq!(other, 0, "another thread's count is its own");
    }

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

    /// The wrapped future runs at its first poll and after its own wake-ups only, and
    /// ends when it would have.
    #[tokio::test]
    async fn a_future_when_woken_is_polled_only_after_its_own_wake_ups() {
        let polls = Cell::new(0);
        let s = Signal::default();
        let mut f = std::pin::pin!(WhenWoken::new(async {
            std::future::poll_fn(|cx| {
                polls.set(polls.get() + 1);
                match std::pin::pin!(s.wait()).poll(cx) {
                    Poll::Ready(()) => Poll::Ready(7),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        }));
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        for _ in 0..5 {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 1, "polled again without a wake-up of its own");
        s.set();
        assert_eq!(f.as_mut().poll(&mut cx), Poll::Ready(7));
        assert_eq!(polls.get(), 2);
    }
}
