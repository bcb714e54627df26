//! The bandwidth throttle: a weekly schedule of MB/s limits and the token bucket that applies
//! the current limit to upload bodies.
//!
//! A schedule entry is `"DAYS HH:MM-HH:MM" = MB/s`, DAYS being a day (`Mon`), a range
//! (`Mon-Fri`, `Fri-Mon` wraps) or a comma list of either (`Mon,Wed,Sat-Sun`), in the host's
//! local time. A window whose end is not after its start runs past midnight into the next day
//! (`"Mon-Fri 22:00-06:00"`: Monday 22:00 to Tuesday 06:00, …); `24:00` ends a day. Where
//! windows overlap the lowest rate applies; outside every window the key `"default"` gives the
//! rate, and without it the rate is unlimited. 1 MB = 10^6 bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Datelike, Timelike};
use tokio::time::Instant;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_WEEK: u32 = 7 * 24 * 60;

/// One window: minutes of the week (Monday 00:00 = 0) from `start` for `len` minutes.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    start: u32,
    len: u32,
    mb_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BandwidthSchedule {
    windows: Vec<Window>,
    default_mb_s: Option<f64>,
}

impl BandwidthSchedule {
    /// From the config's `[bandwidth]` table; an error is (key, what is wrong).
    pub fn from_table(table: &BTreeMap<String, f64>) -> Result<Self, (String, String)> {
        let mut s = BandwidthSchedule::default();
        for (key, &rate) in table {
            if !(rate.is_finite() && rate > 0.0) {
                return Err((
                    key.clone(),
                    format!("rate {rate} MB/s: must be a positive number"),
                ));
            }
            if key == "default" {
                s.default_mb_s = Some(rate);
                continue;
            }
            let windows = parse_entry(key).map_err(|m| (key.clone(), m))?;
            s.windows
                .extend(windows.into_iter().map(|(start, len)| Window {
                    start,
                    len,
                    mb_s: rate,
                }));
        }
        Ok(s)
    }

    /// The limit in MB/s at this minute of the week (None: unlimited).
    pub fn rate_at(&self, minute_of_week: u32) -> Option<f64> {
        let m = minute_of_week % MINUTES_PER_WEEK;
        let hit = self
            .windows
            .iter()
            .filter(|w| (m + MINUTES_PER_WEEK - w.start) % MINUTES_PER_WEEK < w.len)
            .map(|w| w.mb_s)
            .fold(None, |acc: Option<f64>, r| {
                Some(acc.map_or(r, |a| a.min(r)))
            });
        hit.or(self.default_mb_s)
    }

    /// The limit now, in the host's local time.
    pub fn rate_now(&self) -> Option<f64> {
        if self.windows.is_empty() {
            return self.default_mb_s;
        }
        let now = chrono::Local::now();
        let minute =
            now.weekday().num_days_from_monday() * 24 * 60 + now.hour() * 60 + now.minute();
        self.rate_at(minute)
    }
}

/// `"Mon-Fri 08:00-18:00"` → one (start minute of week, length) per day.
fn parse_entry(key: &str) -> Result<Vec<(u32, u32)>, String> {
    let expected = "expected \"DAYS HH:MM-HH:MM\" such as \"Mon-Fri 08:00-18:00\"";
    let (days, times) = key
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| format!("{key:?}: {expected}"))?;
    let (from, to) = times
        .trim()
        .split_once('-')
        .ok_or_else(|| format!("{key:?}: {expected}"))?;
    let from = parse_time(from.trim(), false).map_err(|m| format!("{key:?}: {m}"))?;
    let to = parse_time(to.trim(), true).map_err(|m| format!("{key:?}: {m}"))?;
    let len = if to > from {
        to - from
    } else {
        to + 24 * 60 - from
    };
    let mut out = Vec::new();
    for part in days.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                day(a).map_err(|m| format!("{key:?}: {m}"))?,
                day(b).map_err(|m| format!("{key:?}: {m}"))?,
            ),
            None => {
                let d = day(part).map_err(|m| format!("{key:?}: {m}"))?;
                (d, d)
            }
        };
        let mut d = a;
        loop {
            out.push((d * 24 * 60 + from, len));
            if d == b {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(out)
}

fn day(s: &str) -> Result<u32, String> {
    let l = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|d| l == *d)
        .map(|i| i as u32)
        .ok_or_else(|| format!("{s:?} is not a day (Mon Tue Wed Thu Fri Sat Sun)"))
}

fn parse_time(s: &str, end: bool) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time HH:MM");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if end && h == 24 && m == 0 {
        return Ok(24 * 60);
    }
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// A token bucket over upload bodies. The rate is read at every take: the schedule's rate at
/// the current local time, lowered to the server's cap for this host when it sets one.
pub struct Throttle {
    schedule: BandwidthSchedule,
    cap_mb_s: std::sync::Mutex<Option<f64>>,
    // Held across the wait: uploads queue for the bandwidth in order instead of all waking at
    // once and overshooting.
    bucket: tokio::sync::Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(schedule: BandwidthSchedule) -> Throttle {
        Throttle {
            schedule,
            cap_mb_s: std::sync::Mutex::new(None),
            bucket: tokio::sync::Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// The server's cap (`HeartbeatAck.throttle_mb_s`); None lifts it.
    pub fn set_cap(&self, cap: Option<f64>) {
        let cap = cap.filter(|c| c.is_finite() && *c > 0.0);
        *self.cap_mb_s.lock().unwrap_or_else(|e| e.into_inner()) = cap;
    }

    /// Bytes per second now (None: unlimited).
    pub fn rate_bytes_s(&self) -> Option<f64> {
        let cap = *self.cap_mb_s.lock().unwrap_or_else(|e| e.into_inner());
        let r = match (self.schedule.rate_now(), cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        r.map(|mb| mb * 1e6)
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let Some(rate) = self.rate_bytes_s() else {
            return;
        };
        let mut b = self.bucket.lock().await;
        let now = Instant::now();
        // At most one second of burst builds up while nothing is sent.
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        b.tokens -= bytes as f64;
        if b.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-b.tokens / rate);
            tokio::time::sleep(wait).await;
            b.tokens = 0.0;
            b.last = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(entries: &[(&str, f64)]) -> Result<BandwidthSchedule, (String, String)> {
        BandwidthSchedule::from_table(&entries.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    const fn at(day: u32, h: u32, m: u32) -> u32 {
        day * 1440 + h * 60 + m
    }

    #[test]
    fn work_hours_are_limited_and_the_rest_is_unlimited() {
        let s = sched(&[("Mon-Fri 08:00-18:00", 20.0)]).unwrap();
        assert_eq!(s.rate_at(at(0, 8, 0)), Some(20.0));
        assert_eq!(s.rate_at(at(4, 17, 59)), Some(20.0));
        assert_eq!(s.rate_at(at(4, 18, 0)), None);
        assert_eq!(s.rate_at(at(0, 7, 59)), None);
        assert_eq!(s.rate_at(at(5, 12, 0)), None, "Saturday is unlimited");
    }

    #[test]
    fn windows_past_midnight_wrapping_days_overlaps_and_default() {
        let s = sched(&[
            ("Fri-Mon 22:00-06:00", 5.0),
            ("Sun 00:00-24:00", 8.0),
            ("default", 50.0),
        ])
        .unwrap();
        assert_eq!(s.rate_at(at(4, 23, 0)), Some(5.0), "Friday night");
        assert_eq!(
            s.rate_at(at(1, 5, 59)),
            Some(5.0),
            "Monday's window runs into Tuesday"
        );
        assert_eq!(s.rate_at(at(1, 6, 0)), Some(50.0));
        assert_eq!(s.rate_at(at(6, 12, 0)), Some(8.0));
        assert_eq!(
            s.rate_at(at(6, 23, 0)),
            Some(5.0),
            "the lowest of overlapping windows"
        );
        assert_eq!(
            s.rate_at(at(2, 12, 0)),
            Some(50.0),
            "default outside the windows"
        );
        let s = sched(&[("Mon,Wed 10:00-11:00", 1.0)]).unwrap();
        assert_eq!(s.rate_at(at(2, 10, 30)), Some(1.0));
        assert_eq!(s.rate_at(at(1, 10, 30)), None);
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        for (key, rate, want) in [
            ("Mon-Fry 08:00-18:00", 20.0, "\"Fry\" is not a day"),
            ("Mon-Fri 8:00-18:00", 20.0, "\"8:00\" is not a time"),
            ("Mon-Fri 08:00-25:00", 20.0, "\"25:00\" is not a time"),
            ("Mon-Fri", 20.0, "expected \"DAYS HH:MM-HH:MM\""),
            ("Mon-Fri 08:00", 20.0, "expected"),
            ("Mon 08:00-09:00", 0.0, "must be a positive number"),
            ("Mon 08:00-09:00", -3.0, "must be a positive number"),
        ] {
            let (k, m) = sched(&[(key, rate)]).expect_err(key);
            assert_eq!(k, key);
            assert!(m.contains(want), "{key}: {m}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_holds_uploads_to_the_rate_and_the_server_cap_lowers_it() {
        let t = Throttle::new(sched(&[("default", 1.0)]).unwrap());
        let start = Instant::now();
        for _ in 0..4 {
            t.take(500_000).await;
        }
        // 2 MB at 1 MB/s: about 2 s (the bucket starts empty).
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..2.2).contains(&took), "{took}");
        t.set_cap(Some(0.5));
        assert_eq!(t.rate_bytes_s(), Some(500_000.0));
        t.set_cap(Some(10.0));
        assert_eq!(t.rate_bytes_s(), Some(1_000_000.0), "the lower of the two");
        let unlimited = Throttle::new(BandwidthSchedule::default());
        assert_eq!(unlimited.rate_bytes_s(), None);
        unlimited.set_cap(Some(3.0));
        assert_eq!(unlimited.rate_bytes_s(), Some(3_000_000.0));
    }
}
