//! The rule for what the tests need from the machine (tests/common/machine.rs), issue 21: a
//! missing component fails a run that must test everything with one line naming the package to
//! install, and any other run skips the test with one line saying so. Each case runs this test
//! binary again, in a child process with a chosen environment, on an ignored test whose
//! component no machine has.

mod common;

use std::process::{Command, Output};

use common::*;

const NOWHERE: &str = "a component no machine has";
const NO_PACKAGE: &str = "syncgate-no-such-package";

#[test]
#[ignore = "run by the other tests here, in a child process with a chosen environment"]
fn needs_a_component_no_machine_has() {
    let Some(()) = require(NOWHERE, NO_PACKAGE, None) else {
        return;
    };
    panic!("the test went on without its component");
}

/// Runs `needs_a_component_no_machine_has` alone with `env` on top of an environment that
/// promises nothing (no `CI`, no `SYNCGATE_REQUIRE_ALL`).
fn run_needy_test(env: &[(&str, &str)]) -> (Output, String) {
    let exe = std::env::current_exe().expect("the test binary's own path");
    let mut cmd = Command::new(exe);
    cmd.args(["--ignored", "--exact", "needs_a_component_no_machine_has"])
        .env_remove("CI")
        .env_remove("SYNCGATE_REQUIRE_ALL")
        .envs(env.iter().copied());
    let out = cmd.output().expect("run the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

#[test]
fn a_missing_component_skips_the_test_with_one_line_when_not_in_ci() {
    let (out, text) = run_needy_test(&[]);
    assert!(out.status.success(), "expected a pass (skipped):\n{text}");
    let skipped: Vec<&str> = text.lines().filter(|l| l.starts_with("skipped ")).collect();
    assert_eq!(
        skipped,
        [format!(
            "skipped needs_a_component_no_machine_has: {NOWHERE} is not installed \
             (apt-get install {NO_PACKAGE}); ./scripts/test sets up everything the tests need"
        )],
        "expected one skip line naming the test, the package and the set-up command:\n{text}"
    );
    assert!(text.contains("1 passed"), "{text}");
}

#[test]
fn a_missing_component_fails_the_test_in_ci() {
    for env in [("CI", "true"), ("SYNCGATE_REQUIRE_ALL", "1")] {
        let (out, text) = run_needy_test(&[env]);
        assert!(
            !out.status.success(),
            "expected a failure with {env:?}:\n{text}"
        );
        let want = format!("{NOWHERE} is missing: install it with `apt-get install {NO_PACKAGE}`");
        assert_eq!(
            text.lines().filter(|l| l.starts_with(&want)).count(),
            1,
            "expected one line naming the package with {env:?}:\n{text}"
        );
        assert!(!text.contains("went on without"), "{text}");
        assert!(!text.contains("skipped "), "{text}");
    }
}

#[test]
fn ci_false_promises_nothing() {
    let (out, text) = run_needy_test(&[("CI", "false")]);
    assert!(
        out.status.success(),
        "CI=false must not demand every component:\n{text}"
    );
}

#[test]
fn a_component_that_is_there_is_handed_back() {
    assert_eq!(require(NOWHERE, NO_PACKAGE, Some(7)), Some(7));
    assert!(
        find_program("sh", &[]).is_some(),
        "every machine has a sh on PATH"
    );
    assert_eq!(find_program("syncgate-no-such-program", &[]), None);
}
