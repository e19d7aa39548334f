//! `caf-worker serve`: the long-running worker (SPEC §8, §11).

use super::validate::intake_rules;
use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::config::Settings;
use crate::engine::{Engine, ResultSink, ShutdownReport};
use crate::server::{
    Auth, ExtraCheck, Health, HttpPort, Ingress, MetricsEndpoint, PROBE_RESERVE, PortLimits,
};
use crate::sinks::JsonLinesFile;
use crate::telemetry::{NoopTransportObserver, TransportObserver};
use crate::transport::front::Front;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Handler threads of the ingress port (long-polls may use all but two).
pub const INGRESS_THREADS: usize = 16;
const HEALTH_THREADS: usize = 2;
const METRICS_THREADS: usize = 2;

/// SIGINT/SIGTERM as a good CLI handles Ctrl-C: the first asks for a
/// drain, the second for stopping now (pending steps end `cancelled`), a
/// third ends the process at once in case stopping itself is stuck.
#[derive(Debug, Clone)]
pub struct Interrupts {
    /// Set by the first signal.
    pub drain: Arc<AtomicBool>,
    /// Set by the second signal.
    pub stop_now: Arc<AtomicBool>,
    /// The thread that installed the handlers: unparked at each signal, so
    /// it can wait in [`Interrupts::wait_for_drain`] without polling.
    waiter: std::thread::Thread,
}

impl Interrupts {
    /// Installs the handlers: a thread reads the signals (signal-hook's
    /// self-pipe), so nothing but a flag store happens in signal context.
    pub fn install() -> std::io::Result<Interrupts> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let me = Interrupts {
            drain: Arc::new(AtomicBool::new(false)),
            stop_now: Arc::new(AtomicBool::new(false)),
            waiter: std::thread::current(),
        };
        let flags = me.clone();
        std::thread::Builder::new()
            .name("caf-signals".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                for _ in signals.forever() {
                    if !flags.drain.swap(true, Ordering::AcqRel) {
                        flags.waiter.unpark();
                        continue;
                    }
                    if flags.stop_now.swap(true, Ordering::AcqRel) {
                        eprintln!("caf-worker: third signal: exiting at once");
                        std::process::exit(EXIT_FAILED);
                    }
                }
            })?;
        Ok(me)
    }

    /// Blocks the installing thread until the first signal (parked, not
    /// polling: an idle worker should not wake for nothing). The signal
    /// thread sets the flag before it unparks, so no wake-up is lost; a
    /// spurious one only re-checks the flag.
    pub fn wait_for_drain(&self) {
        debug_assert_eq!(std::thread::current().id(), self.waiter.id());
        while !self.drain.load(Ordering::Acquire) {
            std::thread::park();
        }
    }

    /// Logs the one line of the first signal: what drains, for how long,
    /// and how to stop at once.
    /// WARN when steps are in flight (they may be cut off), else INFO.
    pub fn announce_drain(pending: usize, grace: Duration) {
        let level = if pending > 0 {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        log::log!(level, pending = pending, grace_ms = grace.as_millis() as u64;
            "shutdown requested: draining {pending} step(s) for up to {} s; press Ctrl-C again (or send a second SIGTERM) to stop now and end them cancelled",
            grace.as_secs_f64());
    }

    /// Logs how a drain ended that did not finish every step: cut short by
    /// a second signal, or out of grace. `results` says where the
    /// `cancelled` results went.
    pub fn report_unfinished(&self, report: &ShutdownReport, grace: Duration, results: &str) {
        if report.cancelled == 0 {
            return;
        }
        if self.stop_now.load(Ordering::Acquire) {
            log::warn!(cancelled = report.cancelled;
                "second signal: stopped now; {} unfinished step(s) ended cancelled; {results}",
                report.cancelled);
        } else {
            log::warn!(cancelled = report.cancelled, grace_ms = grace.as_millis() as u64;
                "the drain ran out of grace ({} ms, WORKER_SHUTDOWN_GRACE_MS): {} unfinished step(s) ended cancelled; {results}",
                grace.as_millis(), report.cancelled);
        }
    }
}

/// Opens `WORKER_RESULTS_FILE` if set; an unopenable file is a configuration error.
pub fn open_results_file(settings: &Settings) -> Result<Option<Arc<JsonLinesFile>>, i32> {
    match &settings.results_file {
        None => Ok(None),
        Some(path) => JsonLinesFile::open(path)
            .map(|f| Some(Arc::new(f)))
            .map_err(|e| {
                eprintln!(
                    "caf-worker: invalid WORKER_RESULTS_FILE={}: {e}",
                    path.display()
                );
                EXIT_USAGE
            }),
    }
}

/// Runs until SIGTERM/SIGINT, then drains and exits 0.
pub fn serve(settings: Settings) -> i32 {
    let interrupts = match Interrupts::install() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("caf-worker: cannot install signal handlers: {e}");
            return EXIT_USAGE;
        }
    };
    let results_file = match open_results_file(&settings) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let metrics = crate::telemetry::metrics_for(&settings);
    let observer: Arc<dyn crate::engine::Observer> = match &metrics {
        Some(m) => m.clone(),
        None => Arc::new(crate::engine::NoopObserver),
    };
    let mut sinks: Vec<Arc<dyn ResultSink>> = results_file
        .iter()
        .map(|f| f.clone() as Arc<dyn ResultSink>)
        .collect();
    // The NATS client connects in the background (an unreachable server is
    // not fatal); its sink must exist before the engine starts.
    let front_sink = match &settings.nats {
        None => None,
        Some(n) => {
            let observer: Arc<dyn TransportObserver> = match &metrics {
                Some(m) => m.clone(),
                None => Arc::new(NoopTransportObserver),
            };
            match Front::connect(&settings, n, observer) {
                Ok(sink) => Some(Arc::new(sink)),
                Err(e) => {
                    eprintln!("caf-worker: invalid WORKER_NATS_URL: {e}");
                    return EXIT_USAGE;
                }
            }
        }
    };
    if let Some(sink) = &front_sink {
        sinks.push(sink.clone());
    }
    let engine = match Engine::start(&settings, observer, sinks) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("caf-worker: {e}");
            return EXIT_USAGE;
        }
    };
    let auth = match Auth::load(
        settings.api_token.as_deref(),
        settings.api_tokens_file.as_deref(),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("caf-worker: {e}");
            engine.shutdown(Duration::ZERO);
            return EXIT_USAGE;
        }
    };
    // The ingress is a decision channel: with it, human.approval steps may
    // park (the NATS front is another: Front::start enables them too;
    // without either they are answered INVALID_INPUT, as in `run`).
    if settings.ingress_addr.is_some() {
        engine.enable_approvals();
    }
    let mut front = match &front_sink {
        None => None,
        Some(sink) => match Front::start(sink, engine.clone()) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("caf-worker: cannot start the NATS front: {e}");
                engine.shutdown(Duration::ZERO);
                return EXIT_USAGE;
            }
        },
    };
    let checks: Vec<ExtraCheck> = front.iter().map(Front::health_check).collect();
    let ready = Arc::new(AtomicBool::new(false));
    let ports = start_ports(&settings, &engine, auth, metrics, &ready, &checks);
    let ports = match ports {
        Ok(p) => p,
        Err(e) => {
            eprintln!("caf-worker: {e}");
            engine.shutdown(Duration::ZERO);
            return EXIT_USAGE;
        }
    };
    log::info!(config:serde = settings.effective_json(); "effective configuration");
    // Ready before the "listening" line: whoever waits for that line may
    // probe /readyz at once.
    ready.store(true, Ordering::Release);
    log::info!(
        worker_id = settings.worker_id.as_str(),
        ingress = ports.ingress.as_ref().map_or_else(|| "off".to_owned(), |p| p.addr().to_string()),
        health = ports.health.addr().to_string(),
        metrics = ports.metrics.as_ref().map(|p| p.addr().to_string()),
        nats = settings.nats.as_ref().map(|n| n.mode.as_str());
        "caf-worker {} listening", env!("CARGO_PKG_VERSION")
    );

    interrupts.wait_for_drain();
    // Stop intake first: /readyz then reports "draining", never "starting".
    // NATS first of all: JetStream hands unstarted steps back before the
    // pools could start them.
    if let Some(f) = &mut front {
        f.begin_drain();
    }
    engine.begin_shutdown();
    ready.store(false, Ordering::Release);
    Interrupts::announce_drain(engine.pending_count(), settings.shutdown_grace);
    let report = engine.shutdown_with(settings.shutdown_grace, &interrupts.stop_now, || {
        if let Some(f) = &front {
            f.grace_over();
        }
    });
    if let Some(f) = front {
        f.finish();
    }
    let whereto = match &settings.results_file {
        Some(p) => format!("their results are in {}", p.display()),
        None => "their results were only kept in memory and are lost at exit (set WORKER_RESULTS_FILE to keep every result)".to_owned(),
    };
    interrupts.report_unfinished(&report, settings.shutdown_grace, &whereto);
    if let Some(f) = &results_file {
        if let Err(e) = f.sync() {
            log::error!(error = e.to_string(); "cannot sync the results file");
        }
    }
    ports.stop();
    log::info!(cancelled = report.cancelled, drained = report.drained; "caf-worker stopped");
    if interrupts.stop_now.load(Ordering::Acquire) {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

/// Health and metrics take no bodies worth reading; they keep a reserve of
/// connections so probes answer while idle connections fill the port.
fn probe_limits(settings: &Settings) -> PortLimits {
    PortLimits {
        max_connections: settings.max_connections,
        reserve: PROBE_RESERVE,
        max_body: 64 * 1024,
    }
}

/// The open ports; the ingress is absent with `WORKER_INGRESS_ADDR=off`.
struct Ports {
    ingress: Option<HttpPort>,
    health: HttpPort,
    metrics: Option<HttpPort>,
}

impl Ports {
    fn stop(self) {
        for port in [self.ingress, Some(self.health), self.metrics]
            .into_iter()
            .flatten()
        {
            port.stop();
        }
    }
}

fn start_ports(
    settings: &Settings,
    engine: &Engine,
    auth: Auth,
    metrics: Option<Arc<crate::telemetry::Metrics>>,
    ready: &Arc<AtomicBool>,
    checks: &[ExtraCheck],
) -> Result<Ports, crate::server::BindError> {
    // Every port is added to the egress policy as soon as it is bound: a
    // step must not call the worker's own API (or probes) through HTTP.
    let deny_own = |port: HttpPort| {
        engine.blocks().deny_own_listener(port.addr());
        port
    };
    let ingress = match settings.ingress_addr {
        None => None,
        Some(addr) => {
            let ingress = Ingress::new(
                engine.clone(),
                intake_rules(settings),
                auth,
                INGRESS_THREADS,
            )
            .with_max_long_polls(settings.max_long_polls);
            Some(deny_own(HttpPort::start(
                "WORKER_INGRESS_ADDR",
                addr,
                INGRESS_THREADS,
                PortLimits {
                    max_connections: settings.max_connections,
                    reserve: 0,
                    max_body: settings.max_body_bytes,
                },
                Arc::new(ingress),
            )?))
        }
    };
    let health = deny_own(HttpPort::start(
        "WORKER_HEALTH_ADDR",
        settings.health_addr,
        HEALTH_THREADS,
        probe_limits(settings),
        Arc::new(Health::with_checks(
            engine.clone(),
            ready.clone(),
            checks.to_vec(),
        )),
    )?);
    let metrics = match metrics {
        None => None,
        Some(m) => Some(deny_own(HttpPort::start(
            "WORKER_METRICS_ADDR",
            settings.metrics_addr,
            METRICS_THREADS,
            probe_limits(settings),
            Arc::new(MetricsEndpoint::with_checks(
                engine.clone(),
                m,
                checks.to_vec(),
            )),
        )?)),
    };
    Ok(Ports {
        ingress,
        health,
        metrics,
    })
}
