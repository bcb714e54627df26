//! Terminal progress bars for long CLI work (agent uploads and downloads, exports, jobs the CLI
//! waits for). Drawn on stderr at 4 Hz, and hidden when the output is not a terminal or the
//! user asked for quiet, so scripts and logs get no control sequences.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count bar with rate and ETA.
pub fn progress_bar(enabled: bool, total: u64, label: &str) -> ProgressBar {
    styled_bar(
        enabled,
        total,
        label,
        "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
}

/// Positions of a [`fraction_bar`]: set `(fraction * FRACTION_STEPS)`.
pub const FRACTION_STEPS: u64 = 1000;

/// A progress bar for work known only as a fraction done (a server job): a percentage, no
/// byte units or rates that would be about the scale, not the data.
pub fn fraction_bar(enabled: bool, label: &str) -> ProgressBar {
    styled_bar(
        enabled,
        FRACTION_STEPS,
        label,
        "{prefix:>10} [{bar:30}] {percent:>3}% {msg} ({elapsed})",
    )
}

fn styled_bar(enabled: bool, total: u64, label: &str, template: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}
