//! The standard `process_*` metrics, read from `/proc/self` on every scrape.
//!
//! Replaces the prometheus crate's process collector, which reports
//! `process_cpu_seconds_total` in whole seconds (it truncates the tick count),
//! so a quiet worker's CPU rate reads 0 and then jumps by 1. Here CPU time is
//! user + system clock ticks divided by the tick rate: fractions of a second.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, Opts};

/// Clock ticks per second of `/proc/<pid>/stat` (`sysconf(_SC_CLK_TCK)`).
/// 100 on every Linux architecture we build for (USER_HZ is fixed by the
/// kernel ABI), so no libc call is needed.
const TICKS_PER_SEC: f64 = 100.0;

/// Collects `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_threads` and `process_start_time_seconds`.
pub struct ProcessCollector {
    cpu: Counter,
    rss: Gauge,
    vsize: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
    start_time: Gauge,
    descs: Vec<Desc>,
}

impl std::fmt::Debug for ProcessCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessCollector").finish_non_exhaustive()
    }
}

impl ProcessCollector {
    /// A collector of this process.
    pub fn new() -> Result<ProcessCollector, prometheus::Error> {
        let cpu = Counter::with_opts(Opts::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        ))?;
        let gauge = |name: &str, help: &str| Gauge::with_opts(Opts::new(name, help));
        let rss = gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        )?;
        let vsize = gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        )?;
        let open_fds = gauge("process_open_fds", "Number of open file descriptors.")?;
        let max_fds = gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
        )?;
        let threads = gauge("process_threads", "Number of OS threads in the process.")?;
        let start_time = gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        )?;
        let mut descs = Vec::new();
        for c in [&rss, &vsize, &open_fds, &max_fds, &threads, &start_time] {
            descs.extend(c.desc().into_iter().cloned());
        }
        descs.extend(cpu.desc().into_iter().cloned());
        Ok(ProcessCollector {
            cpu,
            rss,
            vsize,
            open_fds,
            max_fds,
            threads,
            start_time,
            descs,
        })
    }

    fn refresh(&self) {
        if let Some(stat) = read_stat() {
            // A counter only goes up; ticks never decrease for one process.
            let cpu = (stat.utime + stat.stime) as f64 / TICKS_PER_SEC;
            let delta = cpu - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            self.vsize.set(stat.vsize as f64);
            self.threads.set(stat.threads as f64);
            if let Some(boot) = boot_time() {
                self.start_time
                    .set(boot + stat.starttime as f64 / TICKS_PER_SEC);
            }
        }
        if let Some(kb) = status_kb("VmRSS:") {
            self.rss.set(kb * 1024.0);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            self.open_fds.set(dir.count().saturating_sub(1) as f64);
        }
        if let Some(max) = max_fds() {
            self.max_fds.set(max);
        }
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        let mut out = self.cpu.collect();
        for g in [
            &self.rss,
            &self.vsize,
            &self.open_fds,
            &self.max_fds,
            &self.threads,
            &self.start_time,
        ] {
            out.extend(g.collect());
        }
        out
    }
}

struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    starttime: u64,
    vsize: u64,
}

/// Fields of `/proc/self/stat` (proc(5)); the command name may contain
/// spaces and parentheses, so fields are counted after the last `)`.
fn read_stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest starts at field 3 (state): index i here is field i + 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: num(14)?,
        stime: num(15)?,
        threads: num(20)?,
        starttime: num(22)?,
        vsize: num(23)?,
    })
}

/// A `kB` line of `/proc/self/status` (exact, unlike stat's page count,
/// which would need the page size).
fn status_kb(key: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

fn max_fds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 123 45 0 0 20 0 7 0 9876 1234567 890 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            (s.utime, s.stime, s.threads, s.starttime),
            (123, 45, 7, 9876)
        );
        assert_eq!(s.vsize, 1_234_567);
        assert!(read_stat().is_some());
        assert!(status_kb("VmRSS:").is_some_and(|kb| kb > 0.0));
    }
}
