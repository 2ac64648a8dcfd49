//! Progress of long operations (`dlq redrive`, `replay`) on stderr: a bar
//! with count / total, rate and ETA when stderr is a terminal; otherwise
//! quiet, with one line every [`LOG_EVERY`] for long runs (logs of a Job,
//! CI) and the summary the command prints when it is done.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// How often a run whose stderr is not a terminal says how far it is.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// Progress of one run.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    verb: &'static str,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// Progress of `total` (an estimate; see [`Progress::set_total`])
    /// operations, `verb` being e.g. `replayed`.
    pub fn new(verb: &'static str, total: u64) -> Self {
        let style = ProgressStyle::with_template(
            "{msg} [{wide_bar}] {pos}/{len} ({percent}%) {rate} eta {eta}",
        )
        .expect("a valid progress template")
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", s.per_sec());
        })
        .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
            .with_style(style)
            .with_message(verb);
        let now = Instant::now();
        Self {
            bar,
            verb,
            started: now,
            last_log: now,
        }
    }

    /// Correct the total once more is known.
    pub fn set_total(&self, total: u64) {
        let total = total.max(self.bar.position());
        if self.bar.length() != Some(total) {
            self.bar.set_length(total);
        }
    }

    /// One more done.
    pub fn inc(&mut self) {
        self.bar.inc(1);
        if self.bar.is_hidden() && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            eprintln!(
                "{}",
                line(
                    self.verb,
                    self.bar.position(),
                    self.bar.length().unwrap_or(0),
                    self.started.elapsed()
                )
            );
        }
    }

    /// Print a note on stderr without garbling the bar.
    pub fn note(&self, msg: &str) {
        self.bar.suspend(|| eprintln!("{msg}"));
    }

    /// Stop: clear the bar (the command's closing line has the count and
    /// rate) and return how long the run took.
    pub fn finish(&self) -> Summary {
        let count = self.bar.position();
        self.bar.finish_and_clear();
        Summary {
            count,
            elapsed: self.started.elapsed(),
        }
    }

    /// Stop after an error: the bar stays where it was, on its own line.
    pub fn abandon(&self) {
        self.bar.abandon();
        if !self.bar.is_hidden() {
            eprintln!();
        }
    }
}

/// How a run went, for the closing line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Operations done.
    pub count: u64,
    /// How long they took.
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "in {:.1}s ({}/s)",
            self.elapsed.as_secs_f64(),
            rate(self.count, self.elapsed)
        )
    }
}

fn rate(count: u64, elapsed: Duration) -> u64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        return count;
    }
    (count as f64 / s).round() as u64
}

/// The periodic line of a run whose stderr is not a terminal.
pub fn line(verb: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    format!(
        "{verb} {done}/{total} ({pct}%), {}/s, {:.0}s so far",
        rate(done, elapsed),
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_summaries() {
        assert_eq!(
            line("replayed", 120, 480, Duration::from_secs(4)),
            "replayed 120/480 (25%), 30/s, 4s so far"
        );
        assert_eq!(
            line("redriven", 0, 0, Duration::ZERO),
            "redriven 0/0 (100%), 0/s, 0s so far"
        );
        let s = Summary {
            count: 50,
            elapsed: Duration::from_millis(2500),
        };
        assert_eq!(s.to_string(), "in 2.5s (20/s)");
    }

    #[test]
    fn hidden_when_stderr_is_not_a_terminal_and_counts_anyway() {
        // In CI stderr is a pipe or a file; run from a terminal, there is
        // nothing to check here (the pty integration tests cover that side).
        use std::io::IsTerminal as _;
        if std::io::stderr().is_terminal() {
            return;
        }
        let mut p = Progress::new("replayed", 10);
        assert!(p.bar.is_hidden());
        for _ in 0..3 {
            p.inc();
        }
        p.set_total(2); // never below what is done
        assert_eq!(p.bar.length(), Some(3));
        p.set_total(7);
        assert_eq!(p.bar.length(), Some(7));
        assert_eq!(p.finish().count, 3);
    }
}
