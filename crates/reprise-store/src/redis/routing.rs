//! How the Redis store's commands reach the master serving their slot,
//! including while that slot migrates between masters of a cluster.
//!
//! Every command of the store touches the keys of one stream (or one key
//! binding), so it has one slot. fred routes it by its slot map and follows a
//! `MOVED` answer itself (it refreshes the map). It does not follow `ASK` —
//! the answer of a master migrating a slot for a key that has already moved:
//! fred 10.1 sends `ASKING` to the importing master and then the command to
//! the old one again, which answers `ASK` again, until the command fails (and
//! with a single write attempt, fred even ends the connection's task). During
//! a migration that would fail appends, lease renewals and resumes of every
//! stream whose keys moved first.
//!
//! So the store's command pool is told never to follow a redirection itself
//! ([`without_redirections`]: fred refreshes its slot map on `MOVED` and
//! answers an error) and [`Router::run`] handles them:
//! - after a redirection, it sends the command again: after a `MOVED` fred's
//!   map is right now;
//! - if that is redirected too, the slot is half-migrated: it finds the
//!   master importing the slot (the one whose `CLUSTER NODES` says
//!   `[<slot>-<-…]` of itself) and sends it `ASKING` and the command, in one
//!   pipeline on one connection, so that nothing comes between the two;
//! - `TRYAGAIN` (a command on several keys of a slot while the move has split
//!   them) and any further redirection: waits a little and starts again.
//!
//! All within the command timeout. A redirected command was not run, so
//! sending it again is safe for writes too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::clients::{Pipeline, Pool};
use fred::error::Error as FredError;
use fred::prelude::*;
use fred::types::Builder;
use fred::types::{ClusterHash, CustomCommand};

use super::lock;

/// How long the importing master found for a slot is used before it is
/// looked up again: long enough to spare a burst of commands a round of
/// `CLUSTER NODES` each, short enough to follow the next migration.
const IMPORTING_TTL: Duration = Duration::from_secs(1);

/// One command of the store, kept so that it can be sent again elsewhere.
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

/// The builder of the store's command pool: that of `builder`, except that
/// fred follows no redirection itself but answers it with an error (after a
/// `MOVED`, once it refreshed its slot map), for [`Router::run`] to handle.
///
/// This must be the connections' setting: fred replaces a command's own
/// `max_redirections` of 0 with it. The subscriber keeps fred's default.
pub(crate) fn without_redirections(builder: &Builder) -> Builder {
    let mut builder = builder.clone();
    builder.with_connection_config(|c| c.max_redirections = 0);
    builder
}

/// What a failed command says about where to send it.
#[derive(Debug, PartialEq)]
enum Failure {
    /// fred did not follow a `MOVED` or `ASK`.
    Redirected,
    /// `TRYAGAIN`: the keys of a multi-key command are split by a migration.
    TryAgain,
    /// Anything else: the caller's to handle.
    Other,
}

fn classify(e: &FredError) -> Failure {
    let details = e.details();
    if details.contains("Too many redirections")
        || details.starts_with("ASK ")
        || details.starts_with("MOVED ")
    {
        Failure::Redirected
    } else if details.starts_with("TRYAGAIN") {
        Failure::TryAgain
    } else {
        Failure::Other
    }
}

/// Sends the store's commands, following redirections as the module says.
pub(crate) struct Router {
    pool: Pool,
    /// Overall bound of one [`Router::run`], redirections included.
    timeout: Duration,
    /// The importing master last found per slot, with when it was found.
    importing: Mutex<HashMap<u16, (Server, Instant)>>,
}

impl Router {
    pub(crate) fn new(pool: Pool, timeout: Duration) -> Router {
        Router {
            pool,
            timeout,
            importing: Mutex::new(HashMap::new()),
        }
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
        let mut redirected = false;
        loop {
            // After a redirection, the second try goes to the importing
            // master if there is one: a `MOVED` has been taken care of by
            // fred, so what still redirects is an `ASK`.
            let target = if redirected {
                self.importing_master(slot).await
            } else {
                None
            };
            let result = match &target {
                None => self.send(opts, slot, cmds).await,
                Some(server) => self.send_asking(opts, server, slot, cmds).await,
            };
            let e = match result {
                Ok(values) => {
                    if let Some(server) = &target {
                        tracing::debug!(slot, importing = %server, "served by the importing master");
                    }
                    return Ok(values);
                }
                Err(e) => e,
            };
            let failure = classify(&e);
            if failure == Failure::Other || Instant::now() + delay >= deadline {
                return Err(e);
            }
            tracing::debug!(
                slot,
                cause = %e,
                importing = ?target.as_ref().map(|s| s.to_string()),
                "a store command was redirected; sending it again"
            );
            if target.is_some() {
                // The importing master refused too: the migration moved on.
                lock(&self.importing).remove(&slot);
            }
            // Sending again at once is right after a `MOVED` (and the first
            // `ASK`); beyond that, let the migration make progress.
            if redirected || failure == Failure::TryAgain {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2).min(Duration::from_millis(200));
            }
            redirected = failure == Failure::Redirected;
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
        collect(pipeline.try_all::<Value>().await)
    }

    /// The commands, each preceded by `ASKING`, in one pipeline to `server`.
    async fn send_asking(
        &self,
        opts: &Options,
        server: &Server,
        slot: u16,
        cmds: &[Cmd],
    ) -> Result<Vec<Value>, FredError> {
        let mut opts = opts.clone();
        opts.cluster_node = Some(server.clone());
        let pipeline = Pipeline::from(self.pool.next_connected().with_options(&opts));
        for cmd in cmds {
            let () = pipeline
                .custom(
                    CustomCommand::new_static("ASKING", slot, false),
                    Vec::<Value>::new(),
                )
                .await?;
            let () = pipeline
                .custom(command(cmd, slot), cmd.args.clone())
                .await?;
        }
        let replies = collect(pipeline.try_all::<Value>().await)?;
        // Every other reply is an `ASKING`'s OK.
        Ok(replies.into_iter().skip(1).step_by(2).collect())
    }

    /// The master importing `slot`, if a migration of it is under way.
    async fn importing_master(&self, slot: u16) -> Option<Server> {
        if let Some((server, at)) = lock(&self.importing).get(&slot) {
            if at.elapsed() < IMPORTING_TTL {
                return Some(server.clone());
            }
        }
        let client = self.pool.next_connected();
        let masters = client.cached_cluster_state()?.unique_primary_nodes();
        for master in masters {
            let opts = Options {
                cluster_node: Some(master.clone()),
                max_attempts: Some(1),
                ..Default::default()
            };
            let nodes: String = match client.with_options(&opts).cluster_nodes().await {
                Ok(nodes) => nodes,
                Err(e) => {
                    tracing::debug!(master = %master, cause = %e, "CLUSTER NODES failed");
                    continue;
                }
            };
            if imports(&nodes, slot) {
                lock(&self.importing).insert(slot, (master.clone(), Instant::now()));
                return Some(master);
            }
        }
        None
    }
}

fn command(cmd: &Cmd, slot: u16) -> CustomCommand {
    CustomCommand::new_static(cmd.name, ClusterHash::Custom(slot), false)
}

/// The replies of a pipeline, or its first error.
fn collect(replies: Vec<Result<Value, FredError>>) -> Result<Vec<Value>, FredError> {
    replies.into_iter().collect()
}

/// Whether a node's `CLUSTER NODES` output says that this node imports
/// `slot` (its own line, flagged `myself`, holds `[<slot>-<-<source id>]`).
fn imports(cluster_nodes: &str, slot: u16) -> bool {
    let marker = format!("[{slot}-<-");
    cluster_nodes
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(2)
                .is_some_and(|flags| flags.split(',').any(|f| f == "myself"))
        })
        .any(|line| line.split_whitespace().any(|t| t.starts_with(&marker)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::error::ErrorKind;

    #[test]
    fn finds_the_importing_node_in_its_own_line_only() {
        let importing = "\
07c3 127.0.0.1:30004@40004 myself,master - 0 0 3 connected 10923-16383 [93-<-e7d1]
e7d1 127.0.0.1:30002@40002 master - 0 1 2 connected 0-5460 [93->-07c3]
";
        assert!(imports(importing, 93));
        assert!(!imports(importing, 9));
        assert!(!imports(importing, 930));
        // The migrating side's view: the marker of another node is not ours.
        let migrating = "\
e7d1 127.0.0.1:30002@40002 myself,master - 0 1 2 connected 0-5460 [93->-07c3]
07c3 127.0.0.1:30004@40004 master - 0 0 3 connected 10923-16383 [93-<-e7d1]
";
        assert!(!imports(migrating, 93));
        assert!(!imports("", 93));
    }

    #[test]
    fn classifies_redirections() {
        let routing = |s: &str| FredError::new(ErrorKind::Routing, s.to_string());
        let redis = |s: &str| FredError::new(ErrorKind::Unknown, s.to_string());
        assert_eq!(
            classify(&routing("Too many redirections.")),
            Failure::Redirected
        );
        assert_eq!(
            classify(&redis("ASK 93 127.0.0.1:30004")),
            Failure::Redirected
        );
        assert_eq!(
            classify(&redis("MOVED 93 127.0.0.1:30004")),
            Failure::Redirected
        );
        assert_eq!(
            classify(&redis(
                "TRYAGAIN Multiple keys request during rehashing of slot"
            )),
            Failure::TryAgain
        );
        assert_eq!(
            classify(&routing("Unable to route command or reconnect.")),
            Failure::Other
        );
        assert_eq!(classify(&redis("ERR reprise conflict: x")), Failure::Other);
    }
}
