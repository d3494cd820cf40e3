//! Flux results as GitLab commit statuses: `flux` reads Kustomizations and their sources and
//! maps each to (project, commit, state); `watcher` follows opted-in agents' clusters through
//! their tunnels, one replica per agent, and queues what changed; the statuses go to GitLab
//! through `crate::gitlab::statuses`.

pub mod flux;
pub mod poster;
pub mod watcher;

pub use watcher::{SyncParts, SyncSettings, SyncWatcher};
