//! xen-dom0-tests: xen-vhost-mem on the real Xen drivers, run in dom0 by `ci/xen/run`.
//!
//! dom0 plays the guest: it grants its own pages to itself through gntalloc ([`guest`]), and
//! the library maps or copies them through the real gntdev (and its own frames through
//! privcmd, [`foreign`]); when `ci/xen/init` created a domU, [`domu`] runs the library against
//! that other domain's grants and frames. Each case prints `XVM-TEST xen-dom0-tests/<case> PASS|FAIL <detail>`;
//! the benchmark ([`bench`]) prints one `XVM-JSON {...}` line per row. A failing or panicking
//! case is a FAIL line, never the end of the run. Exit status 1 if any case failed.
//!
//! `xen-dom0-tests [--no-bench] [--only SUBSTRING]`

mod bench;
mod cases;
mod domu;
mod foreign;
mod guest;
mod lazy_foreign;
mod set_mem_table;
mod stats;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// The result of one case: details on success, the reason on failure.
pub type CaseResult = Result<String, String>;

/// Prints the XVM-TEST lines and counts failures.
pub struct Report {
    binary: String,
    only: Option<String>,
    failed: usize,
    passed: usize,
}

impl Report {
    fn new(only: Option<String>) -> Self {
        Report {
            binary: std::env::var("XVM_BINARY").unwrap_or_else(|_| "xen-dom0-tests".into()),
            only,
            failed: 0,
            passed: 0,
        }
    }

    /// Whether case `name` is selected by `--only`.
    pub fn wants(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|o| name.contains(o))
    }

    /// Runs one case, catching panics, and prints its line.
    pub fn case(&mut self, name: &str, f: impl FnOnce() -> CaseResult) {
        if !self.wants(name) {
            return;
        }
        self.force_case(name, f);
    }

    /// As [`Report::case`], whether or not `--only` selects it.
    pub fn force_case(&mut self, name: &str, f: impl FnOnce() -> CaseResult) {
        let t = Instant::now();
        let r = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => Err(format!("panicked: {}", panic_text(&*p))),
        };
        let ms = t.elapsed().as_millis();
        match r {
            Ok(d) => {
                self.passed += 1;
                println!("XVM-TEST {}/{name} PASS {d} ({ms} ms)", self.binary);
            }
            Err(d) => {
                self.failed += 1;
                println!("XVM-TEST {}/{name} FAIL {d} ({ms} ms)", self.binary);
            }
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

fn main() {
    // Panics become FAIL lines; keep the default hook's message off the console noise but
    // still visible (stderr goes to the serial log too).
    let args: Vec<String> = std::env::args().collect();
    let no_bench = args.iter().any(|a| a == "--no-bench");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let mut report = Report::new(only);
    let t = Instant::now();
    cases::run_all(&mut report);
    foreign::run_all(&mut report);
    domu::run_all(&mut report);
    if !no_bench {
        bench::run_all(&mut report);
        bench::device_share(&mut report);
        bench::buffer_sweep(&mut report);
        bench::grant_copy_cost(&mut report);
    }
    // After the other benchmarks, which it leaves as they were (the domU idles by then).
    lazy_foreign::run_all(&mut report, !no_bench);
    eprintln!(
        "xen-dom0-tests: {} passed, {} failed in {:.1} s",
        report.passed,
        report.failed,
        t.elapsed().as_secs_f64()
    );
    std::process::exit(i32::from(report.failed > 0));
}
