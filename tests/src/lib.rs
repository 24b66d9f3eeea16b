//! nvstack system tests.
