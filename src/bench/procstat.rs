//! Process CPU time and peak memory from Linux `/proc`.
//!
//! `/proc/PID/stat` is one line: `pid (comm) state ppid …`. `comm` is the executable name and
//! may contain spaces and parentheses, so fields are counted after the *last* `)`. Fields 14 and
//! 15 (1-based, in proc(5) numbering) are utime and stime of the process itself, 16 and 17 the
//! same for children it has waited for — which is how the CPU of `cp` and `restic` is measured
//! without a `wait4` binding. All four are in clock ticks (`getconf CLK_TCK`, 100 on Linux).
//!
//! `/proc/PID/status` holds `VmHWM:  123456 kB`, the peak resident set size.

use std::path::Path;

use super::BenchError;

/// CPU time read from one `/proc/PID/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    /// utime + stime of the process (all its threads).
    pub own: u64,
    /// cutime + cstime: children the process has waited for.
    pub children: u64,
}

/// Parses the CPU fields of a `/proc/PID/stat` line.
pub fn parse_stat(text: &str) -> Result<CpuTicks, BenchError> {
    let close = text
        .rfind(')')
        .ok_or_else(|| BenchError::Proc(format!("stat line without ')': {text:?}")))?;
    let rest = text.get(close + 1..).unwrap_or("");
    // After ")" come field 3 (state) onwards: utime is field 14, i.e. index 11 here.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, BenchError> {
        let idx = n - 3;
        let s = fields.get(idx).ok_or_else(|| {
            BenchError::Proc(format!(
                "stat line has {} fields after the command name; field {n} missing",
                fields.len()
            ))
        })?;
        s.parse::<u64>()
            .map_err(|_| BenchError::Proc(format!("stat field {n} is not a tick count: {s:?}")))
    };
    let (utime, stime, cutime, cstime) = (field(14)?, field(15)?, field(16)?, field(17)?);
    Ok(CpuTicks {
        own: utime.saturating_add(stime),
        children: cutime.saturating_add(cstime),
    })
}

/// Parses `VmHWM` (peak resident set size) from `/proc/PID/status`, in KiB.
pub fn parse_status_hwm_kib(text: &str) -> Result<u64, BenchError> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .ok_or_else(|| BenchError::Proc("status has no VmHWM line".into()))?;
    let mut parts = line.split_whitespace();
    let (num, unit) = (parts.next(), parts.next());
    match (num.map(str::parse::<u64>), unit) {
        (Some(Ok(n)), Some("kB")) => Ok(n),
        _ => Err(BenchError::Proc(format!(
            "VmHWM line {line:?}: expected '<number> kB'"
        ))),
    }
}

/// CPU ticks of a process (`"self"` for this one).
pub fn cpu_ticks(pid: &str) -> Result<CpuTicks, BenchError> {
    let p = Path::new("/proc").join(pid).join("stat");
    let text = std::fs::read_to_string(&p).map_err(super::io_err("reading", &p))?;
    parse_stat(&text)
}

/// Peak RSS of a process in KiB.
pub fn peak_rss_kib(pid: &str) -> Result<u64, BenchError> {
    let p = Path::new("/proc").join(pid).join("status");
    let text = std::fs::read_to_string(&p).map_err(super::io_err("reading", &p))?;
    parse_status_hwm_kib(&text)
}

/// Clock ticks per second (`getconf CLK_TCK`); 100, the Linux value, if getconf is missing.
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line (from a drvault server), with utime 1234, stime 56, cutime 7, cstime 8.
    const STAT: &str = "4242 (drvault) S 1 4242 4242 0 -1 4194560 12345 0 0 0 1234 56 7 8 20 0 \
                        9 0 123456 1234567890 4567 18446744073709551615 1 1 0 0 0 0 0 4096 \
                        1260 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_cpu_fields() {
        assert_eq!(
            parse_stat(STAT).unwrap(),
            CpuTicks {
                own: 1290,
                children: 15
            }
        );
    }

    #[test]
    fn stat_with_spaces_and_parens_in_the_command_name() {
        let line = STAT.replace("(drvault)", "(tokio (rt) 1)");
        assert_eq!(parse_stat(&line).unwrap().own, 1290);
    }

    #[test]
    fn bad_stat_lines_are_refused() {
        let err = |s: &str| match parse_stat(s) {
            Err(BenchError::Proc(m)) => m,
            other => panic!("expected a /proc error, got {other:?}"),
        };
        assert!(err("4242 drvault S 1").contains("without ')'"));
        assert!(err("4242 (drvault) S 1 2 3").contains("field 14 missing"));
        let bad = STAT.replace(" 1234 56 ", " 12x4 56 ");
        assert!(err(&bad).contains("field 14 is not a tick count"));
    }

    #[test]
    fn status_peak_rss() {
        let status =
            "Name:\tdrvault\nVmPeak:\t  999999 kB\nVmHWM:\t   81234 kB\nVmRSS:\t 70000 kB\n";
        assert_eq!(parse_status_hwm_kib(status).unwrap(), 81234);
    }

    #[test]
    fn bad_status_is_refused() {
        assert!(matches!(
            parse_status_hwm_kib("Name:\tx\nVmRSS:\t1 kB\n"),
            Err(BenchError::Proc(m)) if m.contains("no VmHWM")
        ));
        assert!(matches!(
            parse_status_hwm_kib("VmHWM:\t12 MB\n"),
            Err(BenchError::Proc(m)) if m.contains("expected")
        ));
        assert!(matches!(
            parse_status_hwm_kib("VmHWM:\tlots kB\n"),
            Err(BenchError::Proc(m)) if m.contains("expected")
        ));
    }

    #[test]
    fn this_process_is_readable() {
        // /proc is always there on the Linux machines this harness targets.
        assert!(cpu_ticks("self").is_ok());
        assert!(peak_rss_kib("self").unwrap() > 0);
        assert!(clock_ticks_per_second() > 0);
    }
}
