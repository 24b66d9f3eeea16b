//! nvstack's poison path: "ask the owner on demand" through pluggable reverse maps.

pub mod action;
pub mod cache;
pub mod error;
pub mod journal;
pub mod listener;
pub mod owner;
pub mod plugins;
pub mod translate;
pub mod xfs;

pub use error::RmapError;
