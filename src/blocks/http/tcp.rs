//! The HTTP block's TCP transport (SPEC §12.15): ureq's `TcpConnector` and
//! `TcpTransport` with the same connect, timeout and pooling semantics, and
//! fewer system calls per request on a pooled keep-alive connection.
//!
//! ureq's transport costs, per request on a pooled connection, two
//! `setsockopt` calls (`SO_SNDTIMEO`, `SO_RCVTIMEO`: the remaining time of
//! the call shrinks, so its cached value never matches) and two liveness
//! probes of three calls each (non-blocking on, `read`, non-blocking off):
//! once when the connection goes back to the pool and once when it is taken
//! out. Here:
//! - a socket timeout is only ever set to at most the time left, so a
//!   blocked read or write still ends by the call's deadline, but it is kept
//!   while it stays between half and all of the time left (a fresh call with
//!   the same budget reuses it); when it fires early, the time left is set
//!   and the I/O retried, so a timeout is reported at the deadline as before;
//! - a request is first written with `MSG_DONTWAIT` (it nearly always fits
//!   the socket buffer), so the write timeout is only set when the socket
//!   would block;
//! - the liveness probe is one `recv(MSG_PEEK | MSG_DONTWAIT)`, made only
//!   when the pool hands out an idle connection (`call.rs` does not probe
//!   one going back to the pool right after its response).
//!
//! Connecting is ureq's: every resolved address in turn, the connect budget
//! shared between them (half to the first, a quarter to the second, …; at
//! least 10 ms each), `TCP_NODELAY` as configured, and the socket's
//! shutdown handle registered as the connector contract asks (a no-op
//! here: nothing shuts the block's sockets down from another thread).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use ureq::Timeout;
use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};

/// The smallest connect budget one address gets (ureq's value).
const MIN_PER_ADDRESS: Duration = Duration::from_millis(10);

/// Below this much time left a socket timeout is set to exactly the time
/// left (above it, to 7/8 of it, so the next calls can keep it).
const EXACT_BELOW: Duration = Duration::from_millis(8);

/// Opens plain TCP connections (`Either::B`); passes a transport an earlier
/// connector in the chain made (a proxy's) through unchanged.
#[derive(Debug, Default)]
pub(super) struct TcpConnector;

impl<In: Transport> Connector<In> for TcpConnector {
    type Out = Either<In, TcpTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if let Some(t) = chained {
            return Ok(Some(Either::A(t)));
        }
        let stream = connect_any(details.addrs.iter().copied(), details.timeout)?;
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        let transport = TcpTransport {
            stream: Arc::new(stream),
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            read_timeout: None,
            write_timeout: None,
        };
        let handle: Weak<dyn ShutdownHandle> =
            Arc::downgrade(&transport.stream) as Weak<dyn ShutdownHandle>;
        (details.register_shutdown)(handle)?;
        Ok(Some(Either::B(transport)))
    }
}

/// The deadline of a timeout that starts now (`None`: no timeout, or one
/// too far away to represent).
fn deadline(timeout: &NextTimeout) -> Option<Instant> {
    match timeout.after {
        UreqDuration::Exact(d) => Instant::now().checked_add(d),
        UreqDuration::NotHappening => None,
    }
}

/// Time left until `deadline` (`None`: no deadline).
fn left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// Tries each address in turn within the connect timeout (ureq's order,
/// budget split and error choice).
fn connect_any(
    addrs: impl ExactSizeIterator<Item = SocketAddr>,
    timeout: NextTimeout,
) -> Result<TcpStream, ureq::Error> {
    let end = deadline(&timeout);
    let n = addrs.len();
    // Weights 1, 1/2, 1/4, … sum to this; each address gets its share.
    let total_weight = 2.0 * (1.0 - 0.5_f64.powi(n as i32));
    let mut weight = 1.0_f64;
    let mut last_err = None;
    for addr in addrs {
        let per_addr = match timeout.after {
            UreqDuration::NotHappening => None,
            // ureq's `not_zero`: an exhausted budget still gets one second.
            UreqDuration::Exact(t) if t.is_zero() => Some(Duration::from_secs(1)),
            UreqDuration::Exact(t) => Some(
                Duration::try_from_secs_f64(t.as_secs_f64() * weight / total_weight)
                    .unwrap_or(t)
                    .max(MIN_PER_ADDRESS),
            ),
        };
        let attempt = match per_addr {
            Some(d) => TcpStream::connect_timeout(&addr, d),
            None => TcpStream::connect(addr),
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if is_timeout(&e) => {
                if end.is_some_and(|end| Instant::now() > end) {
                    return Err(ureq::Error::Timeout(timeout.reason));
                }
                last_err = Some(ureq::Error::Timeout(Timeout::Connect));
            }
            Err(e) if is_addr_specific(&e) => last_err = Some(e.into()),
            Err(e) => return Err(e.into()),
        }
        weight /= 2.0;
    }
    Err(last_err.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::ConnectionRefused, "Connection refused").into()
    }))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// A failed connect that concerns only the address tried (ureq's list).
fn is_addr_specific(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::AddrNotAvailable
    )
}

/// One TCP connection. All I/O goes through `&TcpStream`, so the agent's
/// shutdown handle (a weak reference) can shut the socket down meanwhile.
pub(super) struct TcpTransport {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    /// `SO_RCVTIMEO` as last set (`None`: none, the socket's default).
    read_timeout: Option<Duration>,
    /// `SO_SNDTIMEO` as last set.
    write_timeout: Option<Duration>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

/// Which socket timeout to keep or set for I/O that must end within `left`:
/// `Ok(None)` keeps `current`, `Ok(Some(t))` sets `t`; never more than
/// `left`, so a blocked call returns by the deadline.
fn timeout_to_set(current: Option<Duration>, left: Option<Duration>) -> Option<Option<Duration>> {
    match (current, left) {
        // No deadline: block without a socket timeout.
        (None, None) => None,
        (Some(_), None) => Some(None),
        (Some(c), Some(l)) if c <= l && c >= l / 2 => None,
        // Zero is "no timeout" to the kernel: at least a microsecond.
        (_, Some(l)) if l < EXACT_BELOW => Some(Some(l.max(Duration::from_micros(1)))),
        (_, Some(l)) => Some(Some(l - l / 8)),
    }
}

impl TcpTransport {
    fn set_read_timeout(&mut self, left: Option<Duration>) -> io::Result<()> {
        if let Some(t) = timeout_to_set(self.read_timeout, left) {
            self.stream.set_read_timeout(t)?;
            self.read_timeout = t;
        }
        Ok(())
    }

    fn set_write_timeout(&mut self, left: Option<Duration>) -> io::Result<()> {
        if let Some(t) = timeout_to_set(self.write_timeout, left) {
            self.stream.set_write_timeout(t)?;
            self.write_timeout = t;
        }
        Ok(())
    }

    /// Writes `buf[sent..amount]` with blocking writes that end by `end`.
    fn write_blocking(
        &mut self,
        amount: usize,
        mut sent: usize,
        end: Option<Instant>,
        reason: Timeout,
    ) -> Result<(), ureq::Error> {
        while sent < amount {
            let left = left(end);
            if left.is_some_and(|l| l.is_zero()) {
                return Err(ureq::Error::Timeout(reason));
            }
            self.set_write_timeout(left)?;
            let out = &self.buffers.output()[sent..amount];
            match (&*self.stream).write(out) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => sent += n,
                // The socket timeout fired (the loop checks the deadline) or a signal.
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl Transport for TcpTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let end = deadline(&timeout);
        // First without blocking: a request head nearly always fits the
        // socket buffer, and then no socket timeout needs setting.
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        let out = &self.buffers.output()[..amount];
        let sent = match rustix::net::send(&*self.stream, out, flags) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => 0,
            Err(e) => return Err(io::Error::from(e).into()),
        };
        self.write_blocking(amount, sent, end, timeout.reason)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let end = deadline(&timeout);
        loop {
            let left = left(end);
            if left.is_some_and(|l| l.is_zero()) {
                return Err(ureq::Error::Timeout(timeout.reason));
            }
            self.set_read_timeout(left)?;
            let input = self.buffers.input_append_buf();
            match (&*self.stream).read(input) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                // The socket timeout fired (the loop checks the deadline) or a signal.
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The pool's probe before it hands out an idle connection.
    fn is_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        match rustix::net::recv(&*self.stream, &mut byte[..], flags) {
            // Nothing waiting: idle and open.
            Err(rustix::io::Errno::AGAIN) => true,
            // EOF (closed by the upstream), bytes nobody asked for, or an error.
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_timeout_never_exceeds_the_time_left() {
        let ms = Duration::from_millis;
        // Kept while between half and all of the time left.
        assert_eq!(timeout_to_set(Some(ms(26_000)), Some(ms(30_000))), None);
        assert_eq!(timeout_to_set(Some(ms(15_000)), Some(ms(30_000))), None);
        assert_eq!(timeout_to_set(Some(ms(30_000)), Some(ms(30_000))), None);
        // Longer than the time left: lowered (to 7/8 of it).
        assert_eq!(
            timeout_to_set(Some(ms(26_000)), Some(ms(800))),
            Some(Some(ms(700)))
        );
        // Much shorter than the time left: raised, still below it.
        assert_eq!(
            timeout_to_set(Some(ms(100)), Some(ms(8_000))),
            Some(Some(ms(7_000)))
        );
        assert_eq!(timeout_to_set(None, Some(ms(8_000))), Some(Some(ms(7_000))));
        // Little time left: exactly that, never zero (zero is "no timeout").
        assert_eq!(
            timeout_to_set(Some(ms(700)), Some(ms(5))),
            Some(Some(ms(5)))
        );
        assert_eq!(
            timeout_to_set(None, Some(Duration::ZERO)),
            Some(Some(Duration::from_micros(1)))
        );
        // No deadline: no socket timeout.
        assert_eq!(timeout_to_set(Some(ms(700)), None), Some(None));
        assert_eq!(timeout_to_set(None, None), None);
    }

    #[test]
    fn a_timeout_too_far_away_is_no_deadline() {
        let far = NextTimeout {
            after: UreqDuration::Exact(Duration::MAX),
            ..NextTimeout::default()
        };
        assert_eq!(deadline(&far), None);
        assert_eq!(deadline(&NextTimeout::default()), None);
        let soon = NextTimeout {
            after: UreqDuration::Exact(Duration::from_secs(1)),
            ..NextTimeout::default()
        };
        assert!(deadline(&soon).is_some());
    }
}
