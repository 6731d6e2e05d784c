//! How the Redis store's commands reach the master serving their slot,
//! including while that slot migrates between masters of a cluster or a
//! master fails over.
//!
//! Every command of the store touches the keys of one stream (or one key
//! binding), so it has one slot. fred routes it by its slot map and follows
//! the redirections as Redis Cluster specifies (with the patch described in
//! `crates/vendor/fred/PATCHES.md`): a `MOVED` refreshes the map and sends
//! the command to the new owner; an `ASK` sends `ASKING` and the command to
//! the importing master, on one connection, leaving the map as it is.
//!
//! What fred answers as an error of kind [`ErrorKind::Cluster`] — the cluster
//! changed under the command: redirections ran out, `TRYAGAIN` (the keys of
//! a multi-key command are split by a migration), `CLUSTERDOWN` (a failover
//! in progress) — [`Router::run`] sends again after a short, growing pause,
//! until `store.command_timeout` has passed since the first try. A command
//! that failed this way was not run, so sending it again is safe for writes.

use std::time::{Duration, Instant};

use fred::clients::{Pipeline, Pool};
use fred::error::{Error as FredError, ErrorKind};
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

/// One command of the store, kept so that it can be sent again.
#[derive(Clone, Debug)]
pub(crate) struct Cmd {
    name: &'static str,
    args: Vec<Value>,
}

impl Cmd {
    pub(crate) fn new(name: &'static str, args: Vec<Value>) -> Cmd {
        Cmd { name, args }
    }
}

/// Whether a failed command may succeed if sent again once the cluster has
/// settled.
fn cluster_changed(e: &FredError) -> bool {
    *e.kind() == ErrorKind::Cluster
}

/// Sends the store's commands, trying again while the cluster changes.
pub(crate) struct Router {
    pool: Pool,
    /// Overall bound of one [`Router::run`], every try included.
    timeout: Duration,
}

impl Router {
    pub(crate) fn new(pool: Pool, timeout: Duration) -> Router {
        Router { pool, timeout }
    }

    /// Runs `cmds` (one command, or a pipeline of commands on one slot) and
    /// answers their replies in order, or the first error. `opts` are the
    /// caller's (attempts, fail-fast).
    pub(crate) async fn run(
        &self,
        opts: &Options,
        key: &str,
        cmds: &[Cmd],
    ) -> Result<Vec<Value>, FredError> {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let deadline = Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(5);
        let mut opts = opts.clone();
        loop {
            // Each try gets what is left of the bound, so that the whole run
            // (redirections fred follows included) stays within it.
            let left = deadline.saturating_duration_since(Instant::now());
            opts.timeout = Some(opts.timeout.map_or(left, |t| t.min(left)));
            let e = match self.send(&opts, slot, cmds).await {
                Ok(values) => return Ok(values),
                Err(e) => e,
            };
            if !cluster_changed(&e) || Instant::now() + delay >= deadline {
                return Err(e);
            }
            tracing::debug!(slot, cause = %e, "the cluster changed under a store command; sending it again");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(Duration::from_millis(200));
        }
    }

    /// Runs a pipeline of `cmds` on one slot, as [`Router::run`], but answers
    /// each command's own reply or error (a pipeline is not a transaction:
    /// one command refused does not stop the others). Sent again as a whole
    /// only while the cluster changes under it.
    pub(crate) async fn run_each(
        &self,
        opts: &Options,
        key: &str,
        cmds: &[Cmd],
    ) -> Result<Vec<Result<Value, FredError>>, FredError> {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let deadline = Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(5);
        let mut opts = opts.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            opts.timeout = Some(opts.timeout.map_or(left, |t| t.min(left)));
            let client = self.pool.next_connected().with_options(&opts);
            let pipeline = Pipeline::from(client);
            for cmd in cmds {
                let () = pipeline
                    .custom(command(cmd, slot), cmd.args.clone())
                    .await?;
            }
            let replies = pipeline.try_all::<Value>().await;
            let changed = replies.iter().find_map(|r| match r {
                Err(e) if cluster_changed(e) => Some(e.clone()),
                _ => None,
            });
            let Some(e) = changed else {
                return Ok(replies);
            };
            if Instant::now() + delay >= deadline {
                return Err(e);
            }
            tracing::debug!(slot, cause = %e, "the cluster changed under a store pipeline; sending it again");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(Duration::from_millis(200));
        }
    }

    /// The commands as fred sends them: routed by `slot`.
    async fn send(&self, opts: &Options, slot: u16, cmds: &[Cmd]) -> Result<Vec<Value>, FredError> {
        let client = self.pool.next_connected().with_options(opts);
        if let [cmd] = cmds {
            let value = client
                .custom::<Value, _>(command(cmd, slot), cmd.args.clone())
                .await?;
            return Ok(vec![value]);
        }
        let pipeline = Pipeline::from(client);
        for cmd in cmds {
            let () = pipeline
                .custom(command(cmd, slot), cmd.args.clone())
                .await?;
        }
        pipeline.try_all::<Value>().await.into_iter().collect()
    }
}

fn command(cmd: &Cmd, slot: u16) -> CustomCommand {
    CustomCommand::new_static(cmd.name, ClusterHash::Custom(slot), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kinds fred (patched) gives: a cluster that changed is told apart
    /// from any other failure by kind alone, whatever the message says.
    #[test]
    fn tells_a_changing_cluster_by_kind() {
        let err = |kind: ErrorKind, s: &str| FredError::new(kind, s.to_string());
        assert!(cluster_changed(&err(
            ErrorKind::Cluster,
            "Too many redirections."
        )));
        assert!(cluster_changed(&err(
            ErrorKind::Cluster,
            "CLUSTERDOWN The cluster is down"
        )));
        assert!(!cluster_changed(&err(
            ErrorKind::Routing,
            "Unable to route command or reconnect."
        )));
        // A script's error that quotes a redirection is not one.
        assert!(!cluster_changed(&err(
            ErrorKind::Unknown,
            "MOVED 93 127.0.0.1:30004"
        )));
        assert!(!cluster_changed(&err(
            ErrorKind::Unknown,
            "ERR reprise conflict: x"
        )));
    }
}
