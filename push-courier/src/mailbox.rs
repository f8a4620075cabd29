//! A device connection's command mailbox: one sender (the courier), one
//! receiver (the connection's task), bounded.
//!
//! tokio's bounded mpsc channel does this too, but allocates a block of 32
//! slots (~1.3 KiB) when it is created, for every connection, idle or not.
//! This one holds an empty queue until a command arrives.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Why a command was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    /// `cap` commands are waiting.
    Full,
    /// The connection's task is gone.
    Closed,
}

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    wake: Notify,
}

#[derive(Debug)]
struct State<T> {
    queue: VecDeque<T>,
    cap: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Each critical section is one push, pop or flag: a panic cannot
        // leave the state half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
pub struct Sender<T>(Arc<Shared<T>>);

#[derive(Debug)]
pub struct Receiver<T>(Arc<Shared<T>>);

/// A mailbox holding at most `cap` commands.
pub fn mailbox<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            cap,
            sender_gone: false,
            receiver_gone: false,
        }),
        wake: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        {
            let mut s = self.0.lock();
            if s.receiver_gone {
                return Err(TrySendError::Closed);
            }
            if s.queue.len() >= s.cap {
                return Err(TrySendError::Full);
            }
            s.queue.push_back(item);
        }
        // Stores a permit if the receiver is not waiting yet: no lost wake.
        self.0.wake.notify_one();
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.lock().sender_gone = true;
        self.0.wake.notify_one();
    }
}

impl<T> Receiver<T> {
    /// The next command; `None` once the queue is empty and the sender is
    /// gone. Cancel-safe: nothing is taken unless it is returned.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut s = self.0.lock();
                if let Some(item) = s.queue.pop_front() {
                    return Some(item);
                }
                if s.sender_gone {
                    return None;
                }
            }
            self.0.wake.notified().await;
        }
    }

    /// The next command if one is waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        self.0.lock().queue.pop_front()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.receiver_gone = true;
        s.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn delivers_in_order_up_to_the_cap_then_reports_the_end() {
        let (tx, mut rx) = mailbox(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), None);
        assert_eq!(tx.try_send(4), Ok(()));
        drop(tx);
        assert_eq!(rx.recv().await, Some(4), "what was sent before the end");
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_and_a_gone_one_refuses() {
        let (tx, mut rx) = mailbox(4);
        let waiter = tokio::spawn(async move {
            let got = rx.recv().await;
            (got, rx)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send("hello").unwrap();
        let (got, rx) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, Some("hello"));
        drop(rx);
        assert_eq!(tx.try_send("late"), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn a_recv_dropped_by_select_loses_nothing() {
        let (tx, mut rx) = mailbox(4);
        tokio::select! {
            _ = rx.recv() => panic!("nothing was sent"),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        tx.try_send(7).unwrap();
        assert_eq!(rx.recv().await, Some(7));
    }
}
