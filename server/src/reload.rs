//! Live reload: SIGHUP and `Admin.reloadConfig` read the configuration again and put in
//! force what can change without a restart.
//!
//! - Reloadable: `auth.token` and `admin.token` (a replaced token stays valid for
//!   `auth.rotation_overlap_s`), `limits` (new connections get new decoder limits),
//!   `deadlines`, `idempotency`, `shutdown`, `log.level` (unless `RUST_LOG` is set).
//! - Not reloadable (listeners, engine, data dir, storage, workers, telemetry, the fault
//!   plan at start, `log.format`, `rpc_engine`, `io_loop`, `limits.frame_budget_bytes`, `limits.accept_queue`, `limits.unsent_reply_budget_bytes`): a change is logged as needing a restart and otherwise ignored.
//! - A config that does not load or validate, or whose log filter does not parse, is
//!   refused whole: the running one stays, and a log line says why.
//!
//! Reloads are serialized (one lock around load-compare-apply); calls are never paused:
//! the settings are one value swapped whole, so no call ever sees a half-applied reload.

use crate::chain::Shared;
use crate::config::{Config, ConfigError};
use crate::metrics as m;
use crate::tunables::{Loader, Tunables};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this server has no configuration source to reload from")]
    NoSource,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("invalid configuration: log.level: {0}")]
    LogFilter(String),
}

impl Shared {
    /// Where reloads read the configuration from; set once (the binary: file + env + flags).
    pub fn set_config_loader(&self, loader: Loader) {
        if self.reload.loader.set(loader).is_err() {
            tracing::warn!("configuration loader already set; keeping the first");
        }
    }

    /// Reads the configuration again and applies it; see the module docs.
    pub fn reload(&self) -> Result<String, ReloadError> {
        let loaded = match self.reload.loader.get() {
            None => Err(ReloadError::NoSource),
            Some(load) => load().map_err(ReloadError::from),
        };
        match loaded {
            Ok(config) => self.apply_config(config),
            Err(e) => Err(refused(e)),
        }
    }

    /// Applies `new` as a reload would (tests and embedders without a loader).
    pub fn apply_config(&self, new: Config) -> Result<String, ReloadError> {
        let mut current = self
            .reload
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Err(e) = new.validate() {
            return Err(refused(e.into()));
        }
        let log_level_changed = new.log.level != current.log.level;
        if log_level_changed {
            if let Err(e) = capkv_telemetry::check_log_filter(&new.log.level) {
                return Err(refused(ReloadError::LogFilter(e.to_string())));
            }
        }
        let old = &*current;
        for (name, changed) in [
            ("listen", new.listen != old.listen),
            ("metrics_listen", new.metrics_listen != old.metrics_listen),
            ("engine", new.engine != old.engine),
            ("data_dir", new.data_dir != old.data_dir),
            ("storage", new.storage != old.storage),
            ("workers", new.workers != old.workers),
            ("telemetry", new.telemetry != old.telemetry),
            ("faults", new.faults != old.faults),
            ("admin.dev_open", new.admin.dev_open != old.admin.dev_open),
            ("log.format", new.log.format != old.log.format),
            ("tls", new.tls != old.tls),
            ("rpc_engine", new.rpc_engine != old.rpc_engine),
            ("io_loop", new.io_loop != old.io_loop),
            (
                "limits.frame_budget_bytes",
                new.limits.frame_budget_bytes != old.limits.frame_budget_bytes,
            ),
            (
                "limits.accept_queue",
                new.limits.accept_queue != old.limits.accept_queue,
            ),
            (
                "limits.unsent_reply_budget_bytes",
                new.limits.unsent_reply_budget_bytes != old.limits.unsent_reply_budget_bytes,
            ),
        ] {
            if changed {
                tracing::warn!(
                    setting = name,
                    "config reload: this setting changes only on restart; ignored"
                );
            }
        }
        let mut changes = Vec::new();
        // Limits compared without their restart-only fields.
        let mut new_limits = new.limits.clone();
        new_limits.frame_budget_bytes = old.limits.frame_budget_bytes;
        new_limits.accept_queue = old.limits.accept_queue;
        new_limits.unsent_reply_budget_bytes = old.limits.unsent_reply_budget_bytes;
        let limits_changed = new_limits != old.limits;
        if new.auth.token != old.auth.token {
            changes.push("auth.token rotated".to_string());
        }
        if new.admin.token != old.admin.token {
            changes.push("admin.token rotated".to_string());
        }
        for (name, changed) in [
            (
                "auth.rotation_overlap_s",
                new.auth.rotation_overlap_s != old.auth.rotation_overlap_s,
            ),
            ("limits", limits_changed),
            ("deadlines", new.deadlines != old.deadlines),
            ("idempotency", new.idempotency != old.idempotency),
            ("shutdown", new.shutdown != old.shutdown),
            ("log.level", log_level_changed),
        ] {
            if changed {
                changes.push(format!("{name} changed"));
            }
        }
        let old_tunables = self.tunables();
        // Keep the settings that need a restart as they are, so the next reload compares
        // against what actually runs.
        let mut applied = new;
        applied.listen = old.listen;
        applied.metrics_listen = old.metrics_listen;
        applied.engine = old.engine;
        applied.data_dir = old.data_dir.clone();
        applied.storage = old.storage.clone();
        applied.workers = old.workers;
        applied.telemetry = old.telemetry.clone();
        applied.faults = old.faults.clone();
        applied.admin.dev_open = old.admin.dev_open;
        applied.log.format = old.log.format;
        applied.tls = old.tls.clone();
        applied.limits.frame_budget_bytes = old.limits.frame_budget_bytes;
        applied.limits.accept_queue = old.limits.accept_queue;
        applied.limits.unsent_reply_budget_bytes = old.limits.unsent_reply_budget_bytes;
        // Checked again with the restart-only values kept: new limits must fit the budget
        // that actually runs.
        if let Err(e) = applied.validate() {
            return Err(refused(e.into()));
        }
        self.set_tunables(Tunables::new(&applied, Some(&old_tunables)));
        if log_level_changed {
            match capkv_telemetry::set_log_filter(&applied.log.level) {
                Ok(true) => {}
                Ok(false) => tracing::info!("log.level reloaded but RUST_LOG is set and wins"),
                Err(e) => tracing::warn!(error = %e, "log level not changed"),
            }
        }
        *current = applied;
        let summary = if changes.is_empty() {
            "nothing changed".to_string()
        } else {
            changes.join("; ")
        };
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
        tracing::info!(changes = %summary, "configuration reloaded");
        Ok(summary)
    }
}

fn refused(e: ReloadError) -> ReloadError {
    metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "refused").increment(1);
    tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
    e
}
