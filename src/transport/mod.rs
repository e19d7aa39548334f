//! Transports that bring assignments to the engine from outside the HTTP
//! ingress. `nats` is a synchronous NATS client (core protocol and the
//! JetStream API) with no async runtime.

pub mod nats;
