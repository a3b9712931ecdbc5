//! The generated protocol types and services of Flotilla's API.
#![allow(clippy::all, clippy::pedantic, unused_qualifications, rust_2018_idioms)]

include!(concat!(env!("OUT_DIR"), "/protos.rs"));

pub use flotilla::v1;
