//! The `reprise` binary: parse flags, load the config, start logging, bind,
//! and hand over to `reprise_relay::run`. Signals start the shutdown.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use reprise_relay::config::{redact_url, RouteConfig, Secret};
use reprise_relay::Config;
use tokio_util::sync::CancellationToken;

/// Resumable-stream relay for LLM Server-Sent Events.
#[derive(Parser, Debug)]
#[command(name = "reprise", version, about, long_about = None)]
struct Cli {
    /// Upstream base URL; alone it defines one route "/" (replacing the file's routes).
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,

    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Redis URL (fred syntax). Falls back to $REPRISE_REDIS_URL, the config
    /// file, then $REDIS_URL; none of them selects the embedded store.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// TOML configuration file (see config/reprise.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Validate the configuration, print it (secrets masked) and exit.
    #[arg(long)]
    check_config: bool,

    /// Log output format.
    #[arg(long, value_enum, default_value = "plain")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("reprise: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("configuration OK");
        println!("listen = {}", config.listen);
        match &config.store.redis_url {
            Some(u) => println!("store = redis ({})", redact_url(u.expose())),
            None => println!("store = embedded in-memory"),
        }
        for r in &config.routes {
            println!("route {} -> {} (record: {}, key: {:?}, resume: {:?})", r.path, r.upstream, r.record, r.key, r.resume);
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reprise: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "reprise stopped");
            eprintln!("reprise: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// File, then env, then flags (see `Cli::redis` for the Redis URL order).
fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(&path.to_string_lossy())?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let redis = cli
        .redis
        .clone()
        .or_else(|| env("REPRISE_REDIS_URL"))
        .map(Secret::new)
        .or(config.store.redis_url.take())
        .or_else(|| env("REDIS_URL").map(Secret::new));
    config.store.redis_url = redis;
    if let Some(upstream) = &cli.upstream {
        config.routes = vec![RouteConfig {
            path: "/".into(),
            upstream: upstream.clone(),
            key: None,
            resume: None,
            record: true,
        }];
    }
    config.validate()?;
    Ok(config)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    reprise_relay::run(config, listener, shutdown).await?;
    Ok(())
}

/// SIGTERM (systemd, Kubernetes) or SIGINT starts a graceful shutdown; a
/// second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    // Give the log line a moment to reach the output.
    tokio::time::sleep(Duration::from_millis(10)).await;
    std::process::exit(130);
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("REPRISE_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}
