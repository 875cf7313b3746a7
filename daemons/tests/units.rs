//! The systemd units in `systemd/` start the programs this crate builds with flags they
//! have, and `docs/deploy.md` shows them as they are (`.ci/run` also runs `systemd-analyze
//! verify` on them against the installed programs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn units() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .expect("systemd/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("unit");
            (p, text)
        })
        .collect();
    v.sort();
    assert!(v.len() >= 3, "{v:?}");
    v
}

/// The value of every `Key=` line of `unit`.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let key = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(key.as_str()))
        .collect()
}

fn help(bin: &str) -> String {
    let out = Command::new(bin).arg("--help").output().expect("--help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_flag_a_unit_passes_is_one_the_daemon_has() {
    for (path, unit) in units() {
        let exec = values(&unit, "ExecStart");
        assert_eq!(exec.len(), 1, "{}", path.display());
        let mut words = exec[0].split_whitespace();
        let program = words.next().expect("a program");
        let bin = match Path::new(program).file_name().and_then(|n| n.to_str()) {
            Some("vhost-user-blk") => env!("CARGO_BIN_EXE_vhost-user-blk"),
            Some("vhost-user-rng") => env!("CARGO_BIN_EXE_vhost-user-rng"),
            other => panic!("{}: unknown program {other:?}", path.display()),
        };
        assert!(program.starts_with("/usr/local/bin/"), "{program}");
        // The flags of ExecStart, and of the Environment= values it expands ($BLK_ARGS).
        let env = values(&unit, "Environment");
        let flags: BTreeSet<&str> = words
            .chain(env.iter().flat_map(|e| e.split_whitespace()))
            .filter_map(|w| w.split('=').next())
            .filter(|w| w.starts_with("--"))
            .collect();
        assert!(flags.contains("--socket-path"), "{}", path.display());
        let help = help(bin);
        for f in flags {
            assert!(
                help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")),
                "{}: {program} has no {f}",
                path.display()
            );
        }
        // Listening is what the unit waits for, on the socket it passes.
        let sock = exec[0]
            .split("--socket-path ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("a socket path");
        assert!(
            values(&unit, "ExecStartPost")
                .iter()
                .any(|p| p.contains(&format!("-S {sock} "))),
            "{}: ExecStartPost waits for {sock}",
            path.display()
        );
        assert_eq!(
            values(&unit, "Restart"),
            ["on-failure"],
            "{}",
            path.display()
        );
    }
}

#[test]
fn the_deployment_guide_shows_each_unit_as_it_is() {
    let guide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md");
    let Ok(guide) = std::fs::read_to_string(&guide) else {
        // A packaged crate has no docs/ beside it: nothing to compare.
        return;
    };
    for (path, unit) in units() {
        assert!(
            guide.contains(&unit),
            "docs/deploy.md lacks {} verbatim",
            path.display()
        );
    }
}
