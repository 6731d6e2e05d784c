//! The `reprise` binary: parse flags, load the config, start logging, bind,
//! and hand over to `reprise_relay::server::run_listeners`. Signals start the
//! shutdown; systemd hears about both ends (`READY=1`, `STOPPING=1`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use reprise_relay::config::{mask_credentials, redact_url, ConfigError, LoadedTls, Overrides};
use reprise_relay::Config;
use sd_notify::NotifyState;
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

    /// Serve /_reprise/metrics, healthz and readyz on this address only
    /// (plain HTTP). Falls back to $REPRISE_ADMIN_LISTEN, then the config
    /// file's `admin_listen`.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,

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

    /// Threads serving connections, each with its own runtime and listener
    /// (0: one per core). Falls back to $REPRISE_THREADS, then the config
    /// file's `threads`.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

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
    let loaded = load_config(&cli).and_then(|config| Ok((config.validate()?, config)));
    let (tls, config) = match loaded {
        Ok(c) => c,
        Err(e) => {
            // A TOML error quotes the offending line, which may hold a password.
            eprintln!("reprise: {}", mask_credentials(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("configuration OK");
        println!("listen = {}", config.listen);
        match config.admin_listen {
            Some(a) => println!("admin_listen = {a} (metrics, healthz, readyz only there)"),
            None => println!("admin_listen = (not set: metrics, healthz, readyz on listen)"),
        }
        match &config.store.redis_url {
            Some(u) => println!("store = redis ({})", redact_url(u.expose())),
            None => println!("store = embedded in-memory"),
        }
        match &config.auth.secret {
            Some(_) => println!("auth.secret = *** (set)"),
            None => println!(
                "auth.secret = (not set: a built-in key; set one, the same on every instance)"
            ),
        }
        let proxies: Vec<String> = config
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        println!("trusted_proxies = [{}]", proxies.join(", "));
        let l = &config.limits;
        println!(
            "limits per caller: max_streams_per_caller = {}, max_starts_per_caller_per_minute = {} (0: unlimited)",
            l.max_streams_per_caller, l.max_starts_per_caller_per_minute
        );
        for r in &config.routes {
            println!(
                "route {} -> {} (record: {}, key: {:?}, resume: {:?}, limits: {:?})",
                r.path,
                mask_credentials(&r.upstream),
                r.record,
                r.key,
                r.resume,
                r.limits
            );
        }
        println!("threads = {}", config.serving_threads());
        return ExitCode::SUCCESS;
    }
    // This thread's runtime serves one listener (and runs the store's
    // connections, the admin listener and the signal handlers); the server
    // starts one more thread, with a runtime of its own, per sibling
    // listener (see `serve`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reprise: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = mask_credentials(&format!("{e:#}"));
            tracing::error!(error = %e, "reprise stopped");
            eprintln!("reprise: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The file, then env vars and flags ([`Config::load`]).
fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    let over = Overrides {
        file: cli.config.clone(),
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        redis: cli.redis.clone(),
        upstream: cli.upstream.clone(),
        threads: cli.threads,
    };
    Config::load(&over, |name| std::env::var(name).ok())
}

async fn serve(config: Config, tls: LoadedTls) -> anyhow::Result<()> {
    let threads = config.serving_threads();
    // One listener per serving thread, all on `listen` (`SO_REUSEPORT`; the
    // kernel spreads connections over them).
    let reuse_port = threads > 1;
    let listener = listen(config.listen, reuse_port)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let bound = listener.local_addr()?;
    let siblings = (1..threads)
        .map(|_| listen(bound, true).and_then(|l| l.into_std()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("cannot listen on {bound} again (SO_REUSEPORT): {e}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    start_watchdog();
    let addr = listener.local_addr().unwrap_or(config.listen);
    let store = if config.store.redis_url.is_some() {
        "redis"
    } else {
        "memory"
    };
    notify_systemd(&[NotifyState::Status(&format!(
        "listening on {addr}, store: {store}, waiting for it"
    ))]);
    // Called once the store answered: only then may systemd start the units
    // ordered after this one.
    let ready = move || {
        let status = format!("listening on {addr}, store: {store}");
        notify_systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
    };
    let admin = match config.admin_listen {
        Some(addr) => Some(
            listen(addr, false)
                .map_err(|e| anyhow::anyhow!("cannot listen on admin_listen {addr}: {e}"))?,
        ),
        None => None,
    };
    let listeners = reprise_relay::Listeners {
        public: listener,
        admin,
        siblings,
    };
    reprise_relay::server::run_listeners(config, &tls, listeners, shutdown, ready).await?;
    Ok(())
}

/// Tells the service manager about a state change. Without `$NOTIFY_SOCKET`
/// (not started by systemd with `Type=notify`) this does nothing.
fn notify_systemd(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(cause = %e, "cannot notify systemd");
    }
}

/// With `WatchdogSec=` set, systemd passes `$WATCHDOG_USEC` and restarts the
/// service if no `WATCHDOG=1` arrives within it. Pinging from a runtime task
/// proves the runtime still schedules work; pings go on through shutdown,
/// which `TimeoutStopSec=` bounds instead.
fn start_watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    // Half the timeout, as sd_watchdog_enabled(3) advises.
    let period = (timeout / 2).max(Duration::from_millis(10));
    tracing::debug!(?timeout, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notify_systemd(&[NotifyState::Watchdog]);
        }
    });
}

/// Binds the listener with a deep accept queue (4096; tokio's default of
/// 128 drops connections when a thousand clients reconnect at once), with
/// `SO_REUSEPORT` if `reuse_port` (one listener per serving thread).
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// SIGTERM (systemd, Kubernetes) or SIGINT starts a graceful shutdown; a
/// second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    // Before the shutdown starts, so that systemd never sees a draining
    // instance as running.
    notify_systemd(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight streams"),
    ]);
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
    // No colour codes when stderr is the journal or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
