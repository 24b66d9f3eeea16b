//! The polled NVMe driver: registers, queues, bring-up, admin and I/O over a [`Transport`].

pub mod transport;

pub use transport::Transport;
