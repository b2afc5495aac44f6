//! Warnings that a peer can trigger at will (a refused connection, a failing accept),
//! said at most once per interval with how many were held back since, so that a flood of
//! them neither fills the log nor costs the server its time.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One kind of warning, rate-limited.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    /// When it was last said, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    /// A warning said at most once per `every`.
    pub const fn new(every: Duration) -> RateLimited {
        RateLimited { every, state: Mutex::new((None, 0)) }
    }

    /// Logs `msg` as a warning unless one was said within the interval; returns whether it
    /// was said (with the count of those held back appended).
    pub fn warn(&self, msg: impl FnOnce() -> String) -> bool {
        let held = {
            let mut st = self.state.lock();
            let now = Instant::now();
            if st.0.is_some_and(|t| now.duration_since(t) < self.every) {
                st.1 += 1;
                return false;
            }
            st.0 = Some(now);
            std::mem::take(&mut st.1)
        };
        if held > 0 {
            log::warn!("{} ({held} more like it held back)", msg());
        } else {
            log::warn!("{}", msg());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_one_per_interval_and_counts_the_rest() {
        let r = RateLimited::new(Duration::from_millis(200));
        assert!(r.warn(|| "a".into()));
        assert!(!r.warn(|| unreachable!("not formatted when held back")));
        assert!(!r.warn(|| "c".into()));
        assert_eq!(r.state.lock().1, 2);
        std::thread::sleep(Duration::from_millis(250));
        assert!(r.warn(|| "d".into()));
        assert_eq!(r.state.lock().1, 0);
    }
}
