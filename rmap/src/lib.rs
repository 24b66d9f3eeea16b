//! nvstack's poison path: "ask the owner on demand" through pluggable reverse maps.

pub mod error;
pub mod xfs;

pub use error::RmapError;
