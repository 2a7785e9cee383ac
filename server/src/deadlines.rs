//! One timer per worker thread for the deadlines of writes that wait for their commit
//! ([`crate::chain::WaitingWrite`]).
//!
//! Why: a timer of its own per waiting write (a tokio `Sleep`) cost a heap allocation, a
//! lock of the time driver to insert it and another to take it out, and, whenever its
//! deadline was the driver's earliest, a write to the runtime's eventfd so that the driver
//! would wake sooner (a syscall, then an extra turn of the event loop): about one put in
//! five under 50 durable writers, measured with `perf` on the worker thread. Almost every
//! write is answered long before its deadline, so almost none of that work was ever used.
//!
//! How: a worker starts [`run`] beside its connections. A waiting write [`watch`]es its
//! deadline: an entry at the back of the worker's queue, with the waker to call once the
//! deadline passes, cancelled ([`Watch`]'s drop) when the write's outcome comes first.
//! Deadlines of one method and budget arrive in order, so the queue is ordered by deadline
//! and the one timer waits for its front. A deadline earlier than the queue's last, or a
//! write polled on a thread that runs no sweeper (tests, the capnp-rpc reference), gets
//! `None` and times itself as before. The queue holds the writes watched since its oldest
//! live entry (a write leaves it by its outcome or its deadline; cancelled ones wait for
//! those in front of them), at most [`MAX_QUEUED`]: past that, writes time themselves too
//! (one write stuck for its whole budget while others complete cannot grow it further).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// The worker's queue of deadlines and its sweeper's waker.
struct Sweeper {
    /// Watched deadlines, non-decreasing, each with the waker to call when it passes
    /// (`None` once cancelled or called).
    queue: VecDeque<(Instant, Option<Waker>)>,
    /// The number of entries ever popped from the front: the position of `queue[0]`.
    popped: u64,
    /// The sweeper task, woken when the queue gains a front its timer does not wait for.
    task: Option<Waker>,
    /// The deadline the timer is set for (`None`: not set).
    armed: Option<Instant>,
}

/// Entries a worker's queue holds at most (32 bytes each).
pub const MAX_QUEUED: usize = 1 << 16;

thread_local! {
    static SWEEPER: RefCell<Option<Sweeper>> = const { RefCell::new(None) };
}

/// A watched deadline; dropping it cancels the watch.
#[derive(Debug)]
pub struct Watch {
    position: u64,
}

/// Watches `deadline` on this worker: `waker` is woken once it passes (the write then sees
/// `Instant::now() >= deadline`). `None` when this thread runs no sweeper or `deadline`
/// would break the queue's order; the caller then needs a timer of its own.
pub fn watch(deadline: Instant, waker: &Waker) -> Option<Watch> {
    SWEEPER.with(|s| {
        let mut guard = s.borrow_mut();
        let s = guard.as_mut()?;
        if s.queue.len() >= MAX_QUEUED || s.queue.back().is_some_and(|(last, _)| deadline < *last) {
            return None;
        }
        s.queue.push_back((deadline, Some(waker.clone())));
        let position = s.popped + (s.queue.len() as u64 - 1);
        // A timer that is not set (the queue was empty, or its front was called) must be
        // set for this one, and so must one set for a later deadline (a far front that was
        // cancelled leaves the timer set for it: the next write, watched into the emptied
        // queue, would have waited that long); one set for an earlier deadline reaches it
        // in turn. The sweeper's waker is taken: one wake until its next turn gives it back.
        let wake = s
            .armed
            .is_none_or(|armed| deadline < armed)
            .then(|| s.task.take())
            .flatten();
        drop(guard);
        if let Some(task) = wake {
            task.wake();
        }
        Some(Watch { position })
    })
}

impl Watch {
    /// Replaces the waker to call (a write polled from another task than before).
    pub fn set_waker(&self, waker: &Waker) {
        SWEEPER.with(|s| {
            if let Some(s) = s.borrow_mut().as_mut() {
                if let Some(entry) = s.entry(self.position) {
                    if !entry.as_ref().is_some_and(|w| w.will_wake(waker)) {
                        *entry = Some(waker.clone());
                    }
                }
            }
        });
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The waker leaves outside the borrow: dropping one may run code that watches.
        let _gone = SWEEPER.with(|s| {
            let mut guard = s.borrow_mut();
            let s = guard.as_mut()?;
            let gone = s.entry(self.position)?.take();
            // Cancelled entries at the front leave now; the timer may stay set for an
            // earlier deadline than the new front's, and then finds nothing due.
            while s.queue.front().is_some_and(|(_, w)| w.is_none()) {
                s.queue.pop_front();
                s.popped += 1;
            }
            gone
        });
    }
}

impl Sweeper {
    fn entry(&mut self, position: u64) -> Option<&mut Option<Waker>> {
        let index = usize::try_from(position.checked_sub(self.popped)?).ok()?;
        self.queue.get_mut(index).map(|(_, w)| w)
    }
}

/// Wakers handed out in one turn of the sweeper at most (the rest in the next turn, which
/// it asks for at once): a turn's borrow and its work stay bounded.
const WAKES_PER_TURN: usize = 1024;

/// The sweeper of this thread's deadlines: runs until the worker's tasks are dropped.
/// Watches made on this thread before it starts, or after it ends, get `None`.
pub async fn run() {
    SWEEPER.with(|s| {
        *s.borrow_mut() = Some(Sweeper {
            queue: VecDeque::new(),
            popped: 0,
            task: None,
            armed: None,
        })
    });
    let _uninstall = Uninstall;
    // Made once; `reset` re-arms it.
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(Instant::now()));
    let mut due: Vec<Waker> = Vec::new();
    poll_fn(|cx| {
        turn(&mut timer, &mut due, cx);
        // Called outside the borrow.
        for waker in due.drain(..) {
            waker.wake();
        }
        Poll::<()>::Pending
    })
    .await
}

/// One turn: hands out the wakers of passed deadlines and sets the timer for the front.
fn turn(timer: &mut Pin<Box<Sleep>>, due: &mut Vec<Waker>, cx: &mut Context<'_>) {
    SWEEPER.with(|s| {
        let mut guard = s.borrow_mut();
        let Some(s) = guard.as_mut() else {
            return;
        };
        if !s.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            s.task = Some(cx.waker().clone());
        }
        let now = Instant::now();
        // Cancelled entries and passed deadlines leave the front.
        while let Some((deadline, waker)) = s.queue.front_mut() {
            if waker.is_some() {
                if *deadline > now {
                    break;
                }
                if due.len() == WAKES_PER_TURN {
                    cx.waker().wake_by_ref();
                    return;
                }
                due.extend(waker.take());
            }
            s.queue.pop_front();
            s.popped += 1;
        }
        match s.queue.front() {
            None => s.armed = None,
            Some((front, _)) => {
                if s.armed != Some(*front) {
                    timer.as_mut().reset(*front);
                    s.armed = Some(*front);
                }
                // Registers the waker; a deadline passed meanwhile is handled next turn.
                if timer.as_mut().poll(cx).is_ready() {
                    s.armed = None;
                    cx.waker().wake_by_ref();
                }
            }
        }
    });
}

/// Ends the thread's watches when the sweeper ends: later watches time themselves.
struct Uninstall;

impl Drop for Uninstall {
    fn drop(&mut self) {
        // Wakers leave outside the borrow.
        let _gone = SWEEPER.with(|s| s.borrow_mut().take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&c), Waker::from(c))
    }

    /// Runs `f` on a `LocalSet` whose clock is paused (it jumps to the next timer).
    fn on_paused_local_set<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    fn queued() -> usize {
        SWEEPER.with(|s| s.borrow().as_ref().map_or(0, |s| s.queue.len()))
    }

    /// Without a sweeper on the thread, and for a deadline out of order, a write is told
    /// to time itself; a deadline that passes wakes its watcher once, a cancelled one never;
    /// cancelled entries leave the queue from its front.
    #[test]
    fn deadlines_wake_their_watchers_once_unless_cancelled() {
        on_paused_local_set(async {
            let (_, w) = counter();
            assert!(watch(Instant::now(), &w).is_none(), "no sweeper yet");
            let sweeper = tokio::task::spawn_local(run());
            tokio::task::yield_now().await;
            let start = Instant::now();
            let (first, w1) = counter();
            let (second, w2) = counter();
            let (third, w3) = counter();
            let a = watch(start + Duration::from_millis(10), &w1).expect("watched");
            let b = watch(start + Duration::from_millis(20), &w2).expect("watched");
            assert!(
                watch(start + Duration::from_millis(15), &w3).is_none(),
                "out of order: its own timer"
            );
            let c = watch(start + Duration::from_millis(30), &w3).expect("watched");
            // Cancelled behind an uncancelled front: stays until the front leaves.
            drop(b);
            assert_eq!(queued(), 3);
            tokio::time::sleep(Duration::from_millis(12)).await;
            assert_eq!(first.0.load(Ordering::SeqCst), 1, "its deadline passed");
            assert_eq!(queued(), 1, "the called front and the cancelled one left");
            drop(a);
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(second.0.load(Ordering::SeqCst), 0, "cancelled: never woken");
            assert_eq!(third.0.load(Ordering::SeqCst), 1);
            assert_eq!(first.0.load(Ordering::SeqCst), 1, "woken once");
            drop(c);
            assert_eq!(queued(), 0);
            // After an empty spell the timer is set again for a new front.
            let (fourth, w4) = counter();
            let d = watch(Instant::now() + Duration::from_millis(5), &w4).expect("watched");
            tokio::time::sleep(Duration::from_millis(6)).await;
            assert_eq!(fourth.0.load(Ordering::SeqCst), 1);
            drop(d);
            // A full queue (its front live, the rest cancelled) takes no more.
            let far = Instant::now() + Duration::from_secs(60);
            let (_, w5) = counter();
            let front = watch(far, &w5).expect("watched");
            for _ in 1..MAX_QUEUED {
                drop(watch(far, &w5).expect("watched"));
            }
            assert_eq!(queued(), MAX_QUEUED);
            assert!(watch(far, &w5).is_none(), "full: its own timer");
            drop(front);
            assert_eq!(queued(), 0, "the front gone, the cancelled rest with it");
            sweeper.abort();
            let _ = sweeper.await;
            assert!(watch(Instant::now(), &w4).is_none(), "the sweeper ended");
        });
    }

    /// A deadline nearer than the one the timer is set for, watched once the queue has
    /// emptied (its far front cancelled), is called at its own time, not at the far one's.
    #[test]
    fn a_nearer_deadline_after_a_cancelled_far_one_is_called_in_time() {
        on_paused_local_set(async {
            let sweeper = tokio::task::spawn_local(run());
            tokio::task::yield_now().await;
            let (_, wf) = counter();
            let far = watch(Instant::now() + Duration::from_secs(60), &wf).expect("watched");
            // The sweeper's turn sets its timer for the far deadline.
            tokio::task::yield_now().await;
            drop(far);
            assert_eq!(queued(), 0);
            let (near, wn) = counter();
            let _near = watch(Instant::now() + Duration::from_millis(5), &wn).expect("watched");
            tokio::time::sleep(Duration::from_millis(6)).await;
            assert_eq!(
                near.0.load(Ordering::SeqCst),
                1,
                "called at its own deadline"
            );
            sweeper.abort();
            let _ = sweeper.await;
        });
    }
}
