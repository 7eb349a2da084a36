//! Log into the host's structured log (tagged with the plugin's name). Natively (unit
//! tests) lines go to stderr.

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[cfg(target_arch = "wasm32")]
fn to_wit(level: Level) -> crate::__bindings::asya::plugin::log::Level {
    use crate::__bindings::asya::plugin::log::Level as L;
    match level {
        Level::Trace => L::Trace,
        Level::Debug => L::Debug,
        Level::Info => L::Info,
        Level::Warn => L::Warn,
        Level::Error => L::Error,
    }
}

/// Whether a line of this level would be recorded (skip building it when not).
pub fn enabled(level: Level) -> bool {
    #[cfg(target_arch = "wasm32")]
    {
        crate::__bindings::asya::plugin::log::enabled(to_wit(level))
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = level;
        true
    }
}

/// Record one line.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        crate::__bindings::asya::plugin::log::log(to_wit(level), message)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        eprintln!("[{level:?}] {message}")
    }
}

/// Record a debug line.
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// Record an info line.
pub fn info(message: &str) {
    log(Level::Info, message)
}

/// Record a warning.
pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// Record an error (something an operator must act on).
pub fn error(message: &str) {
    log(Level::Error, message)
}
