//! What a daemon did so far, as one line of JSON for its log: the daemons write it on
//! SIGUSR1 and every `--stats-interval` seconds. Built from the counters the runtime keeps
//! anyway ([`DaemonStats`], the Xen handle's [`Counters`]); reading them is a few relaxed
//! loads, so a report can be taken at any time from any thread.
//!
//! [`Counters`]: crate::device::counters::Counters

use std::fmt;
use std::sync::Arc;

use super::worker::{DaemonStats, StatsSnapshot};
use crate::device::{CounterSnapshot, XenHandle};

/// Reads a daemon's counters: cheap to clone, `Send + Sync`, and independent of the daemon
/// (a signal thread holds one while the main thread serves). From
/// [`super::VhostUserDaemon::reporter`].
#[derive(Clone, Debug)]
pub struct StatsReporter {
    stats: Arc<DaemonStats>,
    xen: Option<XenHandle>,
}

impl StatsReporter {
    pub(super) fn new(stats: Arc<DaemonStats>, xen: Option<XenHandle>) -> Self {
        StatsReporter { stats, xen }
    }

    /// The counters now.
    pub fn report(&self) -> StatsReport {
        StatsReport {
            daemon: self.stats.snapshot(),
            xen: self.xen.as_ref().map(|x| XenReport {
                calls: x.counters().snapshot(),
                lazy_buckets_mapped: x.lazy_buckets_mapped() as u64,
                lazy_bucket_limit: match x.lazy_bucket_limit() {
                    usize::MAX => None,
                    n => Some(n as u64),
                },
                lazy_evictions: x.lazy_evictions(),
            }),
        }
    }
}

/// A daemon's counters at one moment. `Display` writes them as one JSON object on one line:
///
/// ```text
/// {"requests":512,"batches":70,"kicks":70,"calls":70,"scope_errors":0,"connections":1,
///  "resubmitted":0,"xen":{"syscalls":4,"ioctls":2,"grant_copies":2,"copy_segments":1024,
///  "mmaps":1,"munmaps":1,"pages_mapped":3,"errors":0,"plain_table_refusals":0,"live_mappings":0,
///  "lazy_buckets_mapped":0,"lazy_bucket_limit":null,"lazy_evictions":0}}
/// ```
///
/// (one line in the log). `"xen"` is `null` for a daemon without a Xen handle (UNIX memory
/// only); `"lazy_bucket_limit"` is `null` when lazy FOREIGN buckets are unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsReport {
    /// What the workers did: requests, batches, kicks, calls, scope errors, connections,
    /// requests resubmitted from the in-flight region.
    pub daemon: StatsSnapshot,
    /// The Xen handle's counters, when the daemon has one.
    pub xen: Option<XenReport>,
}

/// The Xen part of a [`StatsReport`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XenReport {
    /// Xen system calls by kind (ioctls, of which grant copies; mmaps; munmaps), pages
    /// mapped, failed calls and the mappings live now.
    pub calls: CounterSnapshot,
    /// Lazy FOREIGN buckets mapped now.
    pub lazy_buckets_mapped: u64,
    /// Their bound (`None`: unbounded).
    pub lazy_bucket_limit: Option<u64>,
    /// Buckets unmapped to make room so far.
    pub lazy_evictions: u64,
}

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.daemon;
        write!(
            f,
            "{{\"requests\":{},\"batches\":{},\"kicks\":{},\"calls\":{},\"scope_errors\":{},\
             \"connections\":{},\"resubmitted\":{},\"xen\":",
            d.requests, d.batches, d.kicks, d.calls, d.scope_errors, d.connections, d.resubmitted
        )?;
        match &self.xen {
            None => f.write_str("null")?,
            Some(x) => {
                let c = &x.calls;
                write!(
                    f,
                    "{{\"syscalls\":{},\"ioctls\":{},\"grant_copies\":{},\"copy_segments\":{},\
                     \"mmaps\":{},\"munmaps\":{},\"pages_mapped\":{},\"errors\":{},\
                     \"plain_table_refusals\":{},\"live_mappings\":{},\
                     \"lazy_buckets_mapped\":{},\"lazy_bucket_limit\":",
                    c.syscalls(),
                    c.ioctls,
                    c.grant_copies,
                    c.copy_segments,
                    c.mmaps,
                    c.munmaps,
                    c.pages_mapped,
                    c.errors,
                    c.plain_table_refusals,
                    c.live_mappings,
                    x.lazy_buckets_mapped
                )?;
                match x.lazy_bucket_limit {
                    None => f.write_str("null")?,
                    Some(n) => write!(f, "{n}")?,
                }
                write!(f, ",\"lazy_evictions\":{}}}", x.lazy_evictions)?;
            }
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_without_xen_is_one_json_line_with_every_daemon_counter() {
        let r = StatsReport {
            daemon: StatsSnapshot {
                requests: 1,
                batches: 2,
                kicks: 3,
                calls: 4,
                scope_errors: 5,
                connections: 6,
                resubmitted: 7,
            },
            xen: None,
        };
        assert_eq!(
            r.to_string(),
            "{\"requests\":1,\"batches\":2,\"kicks\":3,\"calls\":4,\"scope_errors\":5,\
             \"connections\":6,\"resubmitted\":7,\"xen\":null}"
        );
    }

    #[test]
    fn a_report_with_xen_names_each_call_kind_and_the_lazy_buckets() {
        let r = StatsReport {
            daemon: StatsSnapshot::default(),
            xen: Some(XenReport {
                calls: CounterSnapshot {
                    ioctls: 7,
                    mmaps: 3,
                    munmaps: 2,
                    grant_copies: 5,
                    copy_segments: 40,
                    pages_mapped: 9,
                    errors: 1,
                    plain_table_refusals: 6,
                    live_mappings: -1,
                },
                lazy_buckets_mapped: 4,
                lazy_bucket_limit: Some(8),
                lazy_evictions: 11,
            }),
        };
        let s = r.to_string();
        assert!(!s.contains('\n'));
        assert!(s.ends_with(
            "\"xen\":{\"syscalls\":12,\"ioctls\":7,\"grant_copies\":5,\"copy_segments\":40,\
             \"mmaps\":3,\"munmaps\":2,\"pages_mapped\":9,\"errors\":1,\
             \"plain_table_refusals\":6,\"live_mappings\":-1,\"lazy_buckets_mapped\":4,\"lazy_bucket_limit\":8,\"lazy_evictions\":11}}"
        ));
        let unbounded = StatsReport {
            xen: Some(XenReport {
                lazy_bucket_limit: None,
                ..XenReport::default()
            }),
            ..r
        };
        assert!(unbounded
            .to_string()
            .contains("\"lazy_bucket_limit\":null,"));
    }
}
