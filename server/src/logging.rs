//! Log and trace setup for kv-server: the config's `[log]` and `[telemetry]` sections
//! handed to capkv-telemetry (JSON lines by default, human text on a terminal, level from
//! config unless `RUST_LOG` is set, OTLP export when configured). Logs go to stderr so
//! that stdout stays free for `--print-config`.

use capkv_telemetry::{LogStyle, Settings, Telemetry, TelemetryError};

use crate::config::{Config, LogFormat};

/// Installs the global subscriber; the returned guard flushes spans at shutdown. Calling it
/// twice (tests) keeps the first subscriber.
pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
    capkv_telemetry::init(&Settings {
        log_filter: &config.log.level,
        log_style: match config.log.format {
            LogFormat::Json => LogStyle::Json,
            LogFormat::Text => LogStyle::Text,
            LogFormat::Auto => LogStyle::Auto,
        },
        trace: &config.telemetry,
        default_service_name: "kv-server",
    })
}
