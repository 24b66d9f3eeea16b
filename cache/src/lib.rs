//! nvstack's extent cache: state trees (byte-range state bits) over hugepage-backed cache pages.
