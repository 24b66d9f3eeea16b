//! NBD: the wire format ([`proto`]), the handshake state machine ([`handshake`]), one connection's I/O engine
//! ([`conn`]) and the acceptor plus per-reactor pollers ([`server`]).

pub mod conn;
pub mod handshake;
#[allow(dead_code)] // The protocol's full constant table; not every value is used by the server.
pub mod proto;
pub mod server;
pub mod tls;
