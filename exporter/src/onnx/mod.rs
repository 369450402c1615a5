//! ONNX writing: the protobuf messages ([`proto`]), a graph builder with typed values
//! ([`builder`], [`ops`]), external weight data ([`external`]) and the text summary ([`inspect`]).

pub mod builder;
pub mod external;
pub mod inspect;
pub mod ops;
pub mod proto;
