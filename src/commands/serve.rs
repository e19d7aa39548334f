//! `caf-worker serve`: the long-running worker (SPEC §8, §11).

use super::validate::intake_rules;
use super::{EXIT_OK, EXIT_USAGE};
use crate::config::Settings;
use crate::engine::{Engine, ResultSink};
use crate::server::{ExtraCheck, Health, HttpPort, Ingress, MetricsEndpoint};
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

/// A flag set by SIGTERM or SIGINT. A second signal of either kind ends the
/// process at once (exit 1), for an operator whose drain takes too long.
pub fn signal_flag() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
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
    let stop = match signal_flag() {
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
    let ports = start_ports(&settings, &engine, metrics, &ready, &checks);
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

    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stop intake first: /readyz then reports "draining", never "starting".
    // NATS first of all: JetStream hands unstarted steps back before the
    // pools could start them.
    if let Some(f) = &mut front {
        f.begin_drain();
    }
    engine.begin_shutdown();
    ready.store(false, Ordering::Release);
    let pending = engine.pending_count();
    log::info!(pending = pending; "shutdown requested: draining for up to {} ms", settings.shutdown_grace.as_millis());
    let report = engine.shutdown_with(settings.shutdown_grace, || {
        if let Some(f) = &front {
            f.grace_over();
        }
    });
    if let Some(f) = front {
        f.finish();
    }
    if let Some(f) = &results_file {
        if let Err(e) = f.sync() {
            log::error!(error = e.to_string(); "cannot sync the results file");
        }
    }
    ports.stop();
    log::info!(cancelled = report.cancelled, drained = report.drained; "caf-worker stopped");
    EXIT_OK
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
    metrics: Option<Arc<crate::telemetry::Metrics>>,
    ready: &Arc<AtomicBool>,
    checks: &[ExtraCheck],
) -> Result<Ports, crate::server::BindError> {
    let ingress = match settings.ingress_addr {
        None => None,
        Some(addr) => {
            let ingress = Ingress::new(
                engine.clone(),
                intake_rules(settings),
                settings.api_token.clone(),
                INGRESS_THREADS,
            );
            Some(HttpPort::start(
                "WORKER_INGRESS_ADDR",
                addr,
                INGRESS_THREADS,
                Arc::new(ingress),
            )?)
        }
    };
    let health = HttpPort::start(
        "WORKER_HEALTH_ADDR",
        settings.health_addr,
        HEALTH_THREADS,
        Arc::new(Health::with_checks(
            engine.clone(),
            ready.clone(),
            checks.to_vec(),
        )),
    )?;
    let metrics = match metrics {
        None => None,
        Some(m) => Some(HttpPort::start(
            "WORKER_METRICS_ADDR",
            settings.metrics_addr,
            METRICS_THREADS,
            Arc::new(MetricsEndpoint::with_checks(
                engine.clone(),
                m,
                checks.to_vec(),
            )),
        )?),
    };
    Ok(Ports {
        ingress,
        health,
        metrics,
    })
}
