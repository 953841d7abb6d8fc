//! A minimal HTTP client for the agent's endpoints, and a Prometheus text parser.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// GET `path`; returns the status code and the body. HTTP/1.0: the server
/// closes the connection after the response, so the body is whatever follows
/// the headers.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n")?;
    let mut buf = Vec::with_capacity(16 << 10);
    s.read_to_end(&mut buf).with_context(|| format!("reading {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("malformed HTTP response from {addr}{path}") };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in the response from {addr}{path}"))?;
    Ok((code, body.to_string()))
}

pub struct Metrics(pub String);

impl Metrics {
    pub fn fetch(addr: SocketAddr) -> Result<Metrics> {
        let (code, body) = get(addr, "/metrics", Duration::from_secs(5))?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(Metrics(body))
    }

    /// Samples of `name`: (label text, value).
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter_map(move |l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, v) = r.split_once('}')?;
                (labels, v)
            } else if rest.starts_with(' ') {
                ("", rest)
            } else {
                return None;
            };
            let v = value.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((labels, v))
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples(name).next().is_some()
    }

    /// Sum of the samples of `name` whose labels contain every `filters` entry (`k="v"`).
    pub fn sum(&self, name: &str, filters: &[&str]) -> f64 {
        self.samples(name).filter(|(l, _)| filters.iter().all(|f| l.contains(f))).map(|(_, v)| v).sum()
    }

    /// Cumulative buckets (le, count) of a histogram, filtered like `sum`.
    pub fn buckets(&self, name: &str, filters: &[&str]) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<(f64, f64)> = Vec::new();
        for (labels, v) in self.samples(&bucket) {
            if !filters.iter().all(|f| labels.contains(f)) {
                continue;
            }
            let Some(le) = labels.split(',').find_map(|kv| kv.trim().strip_prefix("le=\"")) else { continue };
            let le = le.trim_end_matches('"');
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
            match out.iter_mut().find(|(l, _)| *l == le) {
                Some(e) => e.1 += v,
                None => out.push((le, v)),
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// Quantile from cumulative histogram buckets (linear within a bucket, as
/// Prometheus' histogram_quantile does).
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = c - prev.1;
            let frac = if span > 0.0 { (rank - prev.1) / span } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x\n\
        sigwake_wakeup_writes_dropped_total{actor=\"a\",signal=\"SIGUSR1\",errno=\"EAGAIN\"} 3\n\
        sigwake_wakeup_writes_dropped_total{actor=\"b\",signal=\"SIGINT\",errno=\"EAGAIN\"} 4\n\
        sigwake_kernel_lost_events_total 7\n\
        sigwake_kernel_lost_events_total_x 1\n\
        lat_bucket{stage=\"event\",le=\"0.001\"} 5\n\
        lat_bucket{stage=\"event\",le=\"0.01\"} 10\n\
        lat_bucket{stage=\"event\",le=\"+Inf\"} 10\n\
        lat_bucket{stage=\"action\",le=\"+Inf\"} 0\n";

    #[test]
    fn sums_and_filters() {
        let m = Metrics(TEXT.into());
        assert_eq!(m.sum("sigwake_wakeup_writes_dropped_total", &[]), 7.0);
        assert_eq!(m.sum("sigwake_wakeup_writes_dropped_total", &["signal=\"SIGUSR1\""]), 3.0);
        assert_eq!(m.sum("sigwake_kernel_lost_events_total", &[]), 7.0);
        let b = m.buckets("lat", &["stage=\"event\""]);
        assert_eq!(b.len(), 3);
        let p50 = bucket_quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        assert!(bucket_quantile(&m.buckets("lat", &["stage=\"action\""]), 0.5).is_none());
    }
}
