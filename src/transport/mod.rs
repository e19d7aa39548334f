//! Transports that bring assignments to the engine from outside the HTTP
//! ingress. `nats` is a synchronous NATS client (core protocol and the
//! JetStream API) with no async runtime; `front` is the worker's NATS front
//! (SPEC §13), which only calls the engine and implements its result sink.

pub mod front;
pub mod nats;
