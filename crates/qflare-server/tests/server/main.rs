//! Integration tests of the real server: HTTPS on 127.0.0.1:0, real stores
//! (SQLite always, PostgreSQL and Redis when configured), the real edge client.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

mod harness;

mod admin;
mod connections;
mod enrollment;
mod handover;
mod limits;
mod openapi;
mod sessions;
mod transport;
