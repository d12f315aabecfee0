//! How long a step may take before the cluster is declared broken.
//!
//! A fixed deadline is either too short for a long prefill on a slow host or too long to notice a
//! hung worker quickly. So by default it follows the cluster's own recent step times: a generous
//! multiple of what a step of this size has taken lately, never below a floor of a few seconds
//! (scheduling hiccups, a busy host), and generous before anything has been timed (the first
//! steps warm caches and allocators). `step_timeout_ms` replaces all of it with a fixed value.

use std::collections::VecDeque;
use std::time::Duration;

/// Never less: a loaded host or a garbage-collecting neighbour can stall a step this long.
pub const FLOOR: Duration = Duration::from_secs(3);
/// Before the first step has been timed.
pub const UNTIMED: Duration = Duration::from_secs(60);
/// A step may take this many times what a step of its size has taken lately.
pub const FACTOR: u32 = 8;
/// Recent steps remembered.
const WINDOW: usize = 64;

#[derive(Debug, Clone)]
pub struct StepDeadline {
    fixed: Option<Duration>,
    /// (tokens, duration) of recent steps.
    recent: VecDeque<(usize, Duration)>,
}

impl StepDeadline {
    /// Derived from step times, or `fixed` when the operator set one.
    pub fn new(fixed: Option<Duration>) -> Self {
        Self {
            fixed,
            recent: VecDeque::with_capacity(WINDOW),
        }
    }

    /// The deadline of a step of `tokens` tokens.
    pub fn for_tokens(&self, tokens: usize) -> Duration {
        if let Some(fixed) = self.fixed {
            return fixed;
        }
        // The slowest recent step, scaled up to this step's size when it is larger: a prefill
        // chunk after decode steps costs about its token count times a decode token.
        let expected = self
            .recent
            .iter()
            .map(|&(n, took)| {
                let scale = tokens.max(1) as f64 / n.max(1) as f64;
                took.mul_f64(scale.max(1.0))
            })
            .max();
        match expected {
            None => UNTIMED,
            Some(e) => (e * FACTOR).max(FLOOR),
        }
    }

    /// A step that answered in time.
    pub fn record(&mut self, tokens: usize, took: Duration) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((tokens, took));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_recent_steps_above_a_floor() {
        let mut d = StepDeadline::new(None);
        assert_eq!(d.for_tokens(1), UNTIMED, "generous before any step");
        d.record(1, Duration::from_millis(20));
        assert_eq!(
            d.for_tokens(1),
            FLOOR,
            "a fast cluster still gets the floor"
        );
        d.record(4, Duration::from_secs(1));
        assert_eq!(d.for_tokens(4), Duration::from_secs(8));
        // A chunk 100x larger than the slowest step's: that step's time scaled up.
        assert_eq!(d.for_tokens(400), Duration::from_secs(800));
        for _ in 0..WINDOW {
            d.record(1, Duration::from_millis(10));
        }
        assert_eq!(d.for_tokens(4), FLOOR, "the slow step left the window");
        let fixed = StepDeadline::new(Some(Duration::from_millis(500)));
        assert_eq!(fixed.for_tokens(10_000), Duration::from_millis(500));
    }
}
