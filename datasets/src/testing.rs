//! For tests that need a server (the S3 and Azure emulators `.ci/run` starts): the server's URL
//! from its environment variable, or a decision about its absence. Locally a missing server
//! means the test says it did not run and passes; with `MOSAIC_REQUIRE_SERVERS=1` (set by
//! `.ci/run`) a missing server fails the test, so a CI run that lost its emulator is red.

/// The variable that turns a missing test server into a failure.
pub const REQUIRE_SERVERS: &str = "MOSAIC_REQUIRE_SERVERS";

/// Whether missing test servers must fail the tests.
pub fn servers_required() -> bool {
    std::env::var(REQUIRE_SERVERS).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The value of `var` (exported by the ci/ script `script`, which starts the server). Without
/// it: None after saying the test did not run, or a panic when servers are required.
pub fn server_env(var: &str, script: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if servers_required() => panic!(
            "{var} is not set but {REQUIRE_SERVERS} is: the test server ({script}) is missing"
        ),
        _ => {
            eprintln!("not run: {var} is not set ({script} starts a test server)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_is_skipped_or_fails_as_required() {
        // One test owns the variables it changes (tests run on threads of one process).
        std::env::remove_var("MOSAIC_TEST_NO_SUCH_SERVER");
        std::env::remove_var(REQUIRE_SERVERS);
        assert_eq!(server_env("MOSAIC_TEST_NO_SUCH_SERVER", "ci/x.sh"), None);
        std::env::set_var(REQUIRE_SERVERS, "1");
        let r = std::panic::catch_unwind(|| server_env("MOSAIC_TEST_NO_SUCH_SERVER", "ci/x.sh"));
        std::env::remove_var(REQUIRE_SERVERS);
        let msg = r.expect_err("must panic when servers are required");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("MOSAIC_TEST_NO_SUCH_SERVER") && msg.contains("ci/x.sh"),
            "{msg}"
        );
        std::env::set_var("MOSAIC_TEST_NO_SUCH_SERVER", "s3://b/p");
        assert_eq!(
            server_env("MOSAIC_TEST_NO_SUCH_SERVER", "ci/x.sh").as_deref(),
            Some("s3://b/p")
        );
        std::env::remove_var("MOSAIC_TEST_NO_SUCH_SERVER");
    }
}
