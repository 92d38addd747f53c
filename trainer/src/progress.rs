//! Progress on the terminal: a live bar (step, loss, learning rate, tokens/s, ETA) when
//! stdout is a terminal, plain log lines every `log_every` steps when it is not. The bar is
//! drawn from the first step on, so that what a recipe prints before training (its start line)
//! is not left below an empty bar.

use indicatif::{ProgressBar, ProgressStyle};
use std::cell::OnceCell;
use std::io::IsTerminal;

pub struct Progress {
    /// `Some` on a terminal; the bar itself is made at the first step.
    bar: Option<OnceCell<ProgressBar>>,
    label: String,
    total: u64,
    /// The step the bar starts at (non-zero after a resume).
    position: u64,
    log_every: u64,
}

impl Progress {
    /// A bar for `total` steps starting at `position` (non-zero after a resume).
    pub fn new(label: &str, total: u64, position: u64, log_every: u64) -> Self {
        Self {
            bar: std::io::stdout().is_terminal().then(OnceCell::new),
            label: label.to_string(),
            total,
            position,
            log_every,
        }
    }

    /// Shows nothing (the non-leading peers of a data-parallel run).
    pub fn silent(label: &str, total: u64) -> Self {
        Self {
            bar: None,
            label: label.to_string(),
            total,
            position: 0,
            log_every: 0,
        }
    }

    /// The bar, made and first drawn now if it was not yet.
    fn bar(&self) -> Option<&ProgressBar> {
        self.bar.as_ref().map(|cell| {
            cell.get_or_init(|| {
                let bar = ProgressBar::new(self.total).with_position(self.position);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} {bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]",
                    )
                    .expect("valid template"),
                );
                bar.set_prefix(self.label.clone());
                bar.reset_eta();
                bar
            })
        })
    }

    /// Shows the numbers of `step`: always on the bar, every `log_every` steps as a line.
    pub fn update(&self, step: u64, scalars: &[(&str, f64)]) {
        let text = format_scalars(scalars);
        match self.bar() {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(text);
            }
            None => {
                if self.log_every > 0 && (step.is_multiple_of(self.log_every) || step == self.total)
                {
                    println!("{} step {step}/{} {text}", self.label, self.total);
                }
            }
        }
    }

    /// Prints a line above the bar (or plainly).
    pub fn println(&self, line: &str) {
        match self.bar.as_ref().and_then(OnceCell::get) {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = self.bar.as_ref().and_then(OnceCell::get) {
            bar.finish();
        }
    }
}

/// `loss 1.2345 lr 3.0e-4 ...`: the usual names first, in a fixed order.
pub fn format_scalars(scalars: &[(&str, f64)]) -> String {
    scalars
        .iter()
        .map(|(name, value)| {
            if name.ends_with("per_s") {
                format!("{name} {value:.0}")
            } else if *name == "lr" {
                format!("lr {value:.2e}")
            } else {
                format!("{name} {value:.4}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
