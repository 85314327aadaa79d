//! Progress on long work: a bar on a terminal, silence otherwise.
//!
//! Everything goes to stderr so that stdout stays machine-readable. When
//! stderr is not a terminal (CI, pipes, tests) nothing is drawn at all.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    visible: bool,
}

impl Progress {
    /// Visible only when stderr is a terminal and `quiet` is false.
    pub fn new(quiet: bool) -> Progress {
        Progress {
            visible: !quiet && std::io::stderr().is_terminal(),
        }
    }

    pub fn hidden() -> Progress {
        Progress { visible: false }
    }

    /// Announces a stage of work (terminal only).
    pub fn stage(&self, what: &str) {
        if self.visible {
            eprintln!("  {what}…");
        }
    }

    /// A bar over `total` units of `unit`.
    pub fn bar(&self, total: u64, unit: &str) -> ProgressBar {
        if !self.visible {
            return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        }
        let bar = ProgressBar::new(total);
        let template = format!(
            "  {{bar:40.cyan/blue}} {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, eta {{eta}})"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}
