//! SemAlign-MS data: the correspondence model and the mapping of normalised points to token
//! indices (DESIGN.md §4). The shard format, object-store reader and importers build on this.

pub mod tokens;

pub use tokens::{map_points_to_tokens, Point4, TokenGrid, TokenPair, TokensError};
