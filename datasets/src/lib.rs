//! SemAlign-MS data on object storage (design.md §1-2): the row schema, a shard writer with a
//! manifest, a streaming reader over object_store with a deterministic distributed order and a
//! resumable cursor, image and correspondence transforms, a synthetic scene generator, and the
//! mapping of normalised correspondence points to token indices.

pub mod bench;
pub mod buckets;
pub mod cache;
pub mod digest;
pub mod encode;
pub mod error;
pub mod inspect;
pub mod listing;
pub mod loader;
pub mod manifest;
pub mod model_files;
pub mod parquet_meta;
pub mod plan;
pub mod pt;
pub mod report;
pub mod schema;
pub mod shard;
pub mod store;
pub mod subjects200k;
pub mod synth;
pub mod testing;
pub mod tokens;
pub mod transform;
pub mod writer;

pub use digest::sha256_hex;
pub use error::{DataError, Result, SampleProblem};
pub use loader::{Batch, Loader, LoaderOptions};
pub use manifest::Manifest;
pub use plan::{Cursor, PlanSpec};
pub use report::DataReport;
pub use schema::RawSample;
pub use store::Location;
pub use tokens::{map_points_to_tokens, Point4, TokenGrid, TokenPair, TokensError};
pub use transform::{Decoded, Pixels, TransformSpec};
pub use writer::{ShardWriter, WriterOptions};
