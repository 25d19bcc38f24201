//! The rank environment contract shared by `launcher` and every rank: the torchrun variable
//! names (so other launchers and schedulers work too) plus the launcher's own ([`env`]), and
//! the rendezvous store through which ranks and launchers meet ([`store`]). It holds no
//! process management, so the trainer can depend on it without the launcher.

pub mod env;
pub mod store;

pub use env::{EnvError, RankEnv};
pub use store::{random_token, StoreClient, StoreError, StoreServer};
