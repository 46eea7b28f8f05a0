//! Log lines from crates that use the `log` facade (cryptoki, rustls, tokio-postgres), routed
//! into the broker's `tracing` output at the broker's levels.
//!
//! cryptoki logs at ERROR when it meets a value it has no name for — `Mechanism type N is not
//! supported` for every mechanism number in a token's list that the crate does not know (21 of
//! them on openCryptoki 3.8.1), and the same for attribute, key and object types — and when a
//! session it drops cannot be closed (the broker has already classified that fault, and evicts
//! such sessions itself). None of these is an error of the broker: the probe reports the
//! mechanisms it uses by name (`keybroker check-config`), and unknown numbers change nothing.
//! They go to DEBUG; any other cryptoki ERROR becomes a WARN (the failed call's own error is
//! what the broker reports). Lines from every other crate keep their level. This replaces the
//! plain `log` → `tracing` bridge (`tracing_log::LogTracer`), whose only choice for such lines
//! was to show them as errors or to hide everything cryptoki says.

use tracing_log::AsTrace;

/// The `log` logger that forwards records to `tracing`, re-levelled as the module docs say.
#[derive(Debug, Default)]
pub struct LogBridge;

/// The level a record from `target` at `level` saying `message` is shown at.
pub fn level_for(target: &str, level: log::Level, message: &str) -> log::Level {
    if level != log::Level::Error || !(target == "cryptoki" || target.starts_with("cryptoki::")) {
        return level;
    }
    const NOISE: [&str; 3] = [
        "is not supported",
        "is not one of the valid values",
        "Failed to close session",
    ];
    if NOISE.iter().any(|n| message.contains(n)) {
        log::Level::Debug
    } else {
        log::Level::Warn
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        tracing::dispatcher::get_default(|d| d.enabled(&metadata.as_trace()))
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = if record.level() == log::Level::Error {
            level_for(record.target(), record.level(), &record.args().to_string())
        } else {
            record.level()
        };
        let routed = log::Record::builder()
            .args(*record.args())
            .level(level)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.enabled(routed.metadata()) {
            // Only fails when no subscriber takes the event: nothing to report it to.
            let _ = tracing_log::format_trace(&routed);
        }
    }

    fn flush(&self) {}
}

/// Installs [`LogBridge`] as the `log` logger, passing records up to `max` (the tracing
/// subscriber's most verbose level). Fails if another logger is installed already.
pub fn install(max: tracing::level_filters::LevelFilter) -> Result<(), log::SetLoggerError> {
    log::set_boxed_logger(Box::new(LogBridge))?;
    // cryptoki's ERROR lines must reach `log` to be re-levelled, whatever the filter says.
    let max = match max {
        tracing::level_filters::LevelFilter::OFF => log::LevelFilter::Error,
        tracing::level_filters::LevelFilter::ERROR => log::LevelFilter::Error,
        tracing::level_filters::LevelFilter::WARN => log::LevelFilter::Warn,
        tracing::level_filters::LevelFilter::INFO => log::LevelFilter::Info,
        tracing::level_filters::LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    log::set_max_level(max);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level::{Debug, Error, Info, Warn};

    #[test]
    fn cryptoki_names_it_lacks_are_debug_its_other_errors_warnings_and_other_crates_keep_theirs() {
        let m = "cryptoki::mechanism";
        assert_eq!(
            level_for(m, Error, "Mechanism type 2147483920 is not supported."),
            Debug
        );
        // "not supported" without "is": another cryptoki error, a warning.
        assert_eq!(
            level_for(
                "cryptoki::object",
                Error,
                "Attribute type 2147483650 not supported."
            ),
            Warn
        );
        assert_eq!(
            level_for("cryptoki::object", Error, "Key type 77 is not supported."),
            Debug
        );
        assert_eq!(
            level_for(
                "cryptoki::session::session_management",
                Error,
                "Failed to close session: x"
            ),
            Debug
        );
        assert_eq!(
            level_for("cryptoki::session", Error, "C_FindObjectsFinal() failed"),
            Warn
        );
        assert_eq!(level_for(m, Info, "anything"), Info);
        assert_eq!(level_for("rustls::conn", Error, "is not supported"), Error);
        assert_eq!(level_for("cryptokiX", Error, "is not supported"), Error);
    }
}
