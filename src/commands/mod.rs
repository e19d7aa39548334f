//! The commands (SPEC §1, plus `submit` for NATS) and the command line that selects them.
//! `main.rs` only parses arguments and calls [`main`].

mod input;
mod progress;
mod run;
mod serve;
mod submit;
mod validate;

use crate::config::{self, Sources};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Exit code: everything succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit code: some step did not succeed or some input was rejected.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: usage, configuration or unreadable input; nothing ran.
pub const EXIT_USAGE: i32 = 2;

/// caf-worker: runs Beamline workflow steps (HTTP calls, file blobs, debug
/// steps) with retries and timeouts, and answers each with exactly one result.
#[derive(Debug, Parser)]
#[command(
    name = "caf-worker",
    version,
    after_help = "Every option also has an environment variable and a config-file key; \
precedence is command line > environment > config file > default. \
README.md, Configuration, lists them all (`--set KEY=VALUE` sets any of them).\n\n\
Exit codes: 0 all steps succeeded; 1 a step failed or an input was rejected; \
2 usage/configuration error or unreadable input (nothing ran)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the long-lived worker: ingress (assignment API), health and metrics ports.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        profile: ProfileArgs,
        #[command(flatten)]
        exec: ExecArgs,
        #[command(flatten)]
        ports: PortArgs,
    },
    /// Execute a batch of assignments (JSON Lines, a JSON array, or
    /// concatenated objects) and print one ExecResult per line on stdout as
    /// each finishes; logs go to stderr.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        profile: ProfileArgs,
        #[command(flatten)]
        exec: ExecArgs,
        /// Input file, or `-` for standard input.
        #[arg(value_name = "FILE|-")]
        input: String,
    },
    /// Publish a JSON Lines file of assignments on NATS and print each answer
    /// (ExecResult, or a rejected Ack) on stdout as it arrives.
    ///
    /// Subscribes to the result and ack subjects first, then publishes every
    /// line on the assign subject (JetStream: with `Nats-Msg-Id` and waiting
    /// for PubAcks; the streams are created when missing). Exits 0 when every
    /// line is answered, 1 when `--timeout-ms` passes without any answer.
    /// Subjects and stream names follow the WORKER_NATS_* settings.
    #[command(
        after_help = "Example:\n  nats-server -js &\n  caf-worker serve --set nats_url=nats://127.0.0.1:4222 &\n  \
caf-worker submit --nats nats://127.0.0.1:4222 examples/quickstart.jsonl"
    )]
    Submit {
        #[command(flatten)]
        config: ConfigArgs,
        /// NATS server URL(s), comma-separated [env: WORKER_NATS_URL].
        #[arg(long, value_name = "URL")]
        nats: Option<String>,
        /// `core` or `jetstream` [env: WORKER_NATS_MODE; default: jetstream].
        #[arg(long, value_name = "MODE")]
        mode: Option<String>,
        /// Give up after this many milliseconds without any answer.
        #[arg(long, value_name = "MS", default_value_t = 30_000)]
        timeout_ms: u64,
        /// Print only the summary line (stderr), not every answer.
        #[arg(long)]
        quiet: bool,
        /// JSON Lines file of assignments, or `-` for standard input.
        #[arg(value_name = "FILE|-")]
        input: String,
    },
    /// Check assignments and their payloads without executing anything: one
    /// line per assignment, `ok` or what is wrong.
    Validate {
        #[command(flatten)]
        config: ConfigArgs,
        /// Input file, or `-` for standard input.
        #[arg(value_name = "FILE|-")]
        input: String,
    },
}

/// Options every command reads; each maps to a settings key.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML config file (keys as in README.md, Configuration; e.g. `io_pool_size = 8`).
    #[arg(long, value_name = "FILE", env = "WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Set any setting by key, e.g. `--set retry_jitter=full` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// `json` or `text` [env: WORKER_LOG_FORMAT; default: json].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Log filter, env_logger syntax [env: RUST_LOG; default: info].
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

/// `--profile`, for the commands that execute steps.
#[derive(Debug, Args)]
struct ProfileArgs {
    /// `cp1` (baseline) or `cp2` (all four CP2_* flags on; a flag set explicitly
    /// still wins) [env: WORKER_PROFILE; default: cp1].
    #[arg(long, value_name = "PROFILE")]
    profile: Option<String>,
}

/// Options of the commands that execute steps (`serve`, `run`).
#[derive(Debug, Args)]
struct ExecArgs {
    /// Worker id in acks, results and logs [env: WORKER_ID; default: <hostname>-<pid>].
    #[arg(long)]
    worker_id: Option<String>,
    /// Root directory of every fs.* path [env: WORKER_FS_ROOT; default: ./data].
    #[arg(long, value_name = "DIR")]
    fs_root: Option<String>,
    /// Threads of the cpu pool [env: WORKER_CPU_POOL_SIZE; default: 4].
    #[arg(long, value_name = "N")]
    cpu_pool_size: Option<String>,
    /// Threads of the io pool [env: WORKER_IO_POOL_SIZE; default: 8].
    #[arg(long, value_name = "N")]
    io_pool_size: Option<String>,
    /// Threads of the gpu pool [env: WORKER_GPU_POOL_SIZE; default: 1].
    #[arg(long, value_name = "N")]
    gpu_pool_size: Option<String>,
    /// Per-pool queue bound with queue management on [env: WORKER_MAX_QUEUE_SIZE; default: 1000].
    #[arg(long, value_name = "N")]
    max_queue_size: Option<String>,
    /// Append every result as a JSON line to FILE [env: WORKER_RESULTS_FILE].
    #[arg(long, value_name = "FILE")]
    results_file: Option<String>,
}

/// The ports of `serve`.
#[derive(Debug, Args)]
struct PortArgs {
    /// Assignment API address [env: WORKER_INGRESS_ADDR; default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    ingress_addr: Option<String>,
    /// Health address [env: WORKER_HEALTH_ADDR; default: 0.0.0.0:9091].
    #[arg(long, value_name = "ADDR")]
    health_addr: Option<String>,
    /// Metrics address [env: WORKER_METRICS_ADDR; default: 0.0.0.0:9092].
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
}

type Pairs<'a> = Vec<(&'static str, &'a Option<String>)>;

impl ProfileArgs {
    fn pairs(&self) -> Pairs<'_> {
        vec![("profile", &self.profile)]
    }
}

impl ExecArgs {
    fn pairs(&self) -> Pairs<'_> {
        vec![
            ("worker_id", &self.worker_id),
            ("fs_root", &self.fs_root),
            ("cpu_pool_size", &self.cpu_pool_size),
            ("io_pool_size", &self.io_pool_size),
            ("gpu_pool_size", &self.gpu_pool_size),
            ("max_queue_size", &self.max_queue_size),
            ("results_file", &self.results_file),
        ]
    }
}

impl PortArgs {
    fn pairs(&self) -> Pairs<'_> {
        vec![
            ("ingress_addr", &self.ingress_addr),
            ("health_addr", &self.health_addr),
            ("metrics_addr", &self.metrics_addr),
        ]
    }
}

impl ConfigArgs {
    /// The sources, with the command's own options (`extra`) on the command line.
    fn sources(&self, extra: Pairs<'_>) -> Result<Sources, config::ConfigError> {
        let mut cli = Vec::new();
        let own = [("log_format", &self.log_format), ("log", &self.log)];
        for (key, value) in extra.into_iter().chain(own) {
            if let Some(v) = value {
                cli.push((key.to_owned(), v.clone()));
            }
        }
        for kv in &self.set {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(config::ConfigError::UnknownKey(format!(
                    "{kv} (--set takes KEY=VALUE)"
                )));
            };
            cli.push((k.trim().to_owned(), v.to_owned()));
        }
        Ok(Sources::from_process_env(cli, self.config.clone()))
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    let sources = match &cli.command {
        Command::Serve {
            config,
            profile,
            exec,
            ports,
        } => {
            let mut extra = profile.pairs();
            extra.extend(exec.pairs());
            extra.extend(ports.pairs());
            config.sources(extra)
        }
        Command::Run {
            config,
            profile,
            exec,
            ..
        } => {
            let mut extra = profile.pairs();
            extra.extend(exec.pairs());
            config.sources(extra)
        }
        Command::Validate { config, .. } => config.sources(Vec::new()),
        Command::Submit {
            config, nats, mode, ..
        } => config.sources(vec![("nats_url", nats), ("nats_mode", mode)]),
    };
    let command = &cli.command;
    let settings = match sources.and_then(|s| config::load(&s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("caf-worker: {e}");
            return EXIT_USAGE;
        }
    };
    // `submit` is an interactive tool: only warnings unless RUST_LOG says otherwise.
    let quiet_default = matches!(command, Command::Submit { .. })
        && settings
            .effective
            .get("log")
            .is_some_and(|(_, origin)| *origin == config::Origin::Default);
    let filter = if quiet_default {
        "warn"
    } else {
        &settings.log_filter
    };
    crate::telemetry::logging::init(filter, settings.log_format);
    crate::telemetry::logging::install_panic_hook();
    for w in &settings.warnings {
        log::warn!("{w}");
    }
    match command {
        Command::Serve { .. } => serve::serve(settings),
        Command::Run { input, .. } => run::run(settings, input),
        Command::Validate { input, .. } => validate::validate(&settings, input),
        Command::Submit {
            input,
            timeout_ms,
            quiet,
            ..
        } => submit::submit(
            &settings,
            &submit::SubmitArgs {
                input: input.clone(),
                idle_timeout: std::time::Duration::from_millis(*timeout_ms),
                quiet: *quiet,
            },
        ),
    }
}
