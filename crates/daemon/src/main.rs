//! `flotillad`: flags, logging and signals around [`flotilla_daemon::Daemon`].

use anyhow::Context;
use clap::Parser;
use flotilla_daemon::config::{Command, LogFormat};
use flotilla_daemon::{Cli, Daemon, DaemonSettings};
use flotilla_telemetry::logging;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Health { url, timeout } => {
            return flotilla_daemon::health::probe(url, *timeout).with_context(|| format!("{url} is not healthy"));
        }
        Command::TraefikConfig(args) => {
            use std::io::Write as _;
            let yaml = serde_json::to_string_pretty(&args.render())?;
            writeln!(std::io::stdout(), "{yaml}")?;
            return Ok(());
        }
        _ => {}
    }
    let Some((roles, mut config)) = cli.command.into_parts() else { unreachable!("answered above") };
    config.read_secret_files()?;
    let format = match config.log_format {
        LogFormat::Text => logging::LogFormat::Text,
        LogFormat::Json => logging::LogFormat::Json,
    };
    logging::init("info,sqlx=warn", format);

    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    let daemon = Daemon::start(DaemonSettings::from_config(roles, &config), cancel.clone())
        .await
        .context("flotillad could not start")?;
    cancel.cancelled().await;
    daemon.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM starts a graceful shutdown.
async fn cancel_on_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received; shutting down");
    cancel.cancel();
}
