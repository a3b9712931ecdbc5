//! The generated protocol types and services of Flotilla's API.
#![allow(clippy::all, clippy::pedantic, unused_qualifications, rust_2018_idioms)]

include!(concat!(env!("OUT_DIR"), "/protos.rs"));

pub use flotilla::v1;

/// Every proto file of the API with its imports, as a serialized
/// `FileDescriptorSet`: what reflection-based clients build requests from.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
