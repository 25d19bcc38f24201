//! Where this launcher sits among the nodes: from `--nodes/--node-rank/--master-addr`, or from
//! SLURM's variables when SLURM_JOB_ID is set (flags still win).

use crate::hostlist;

/// The port node 0's store listens on when several nodes must agree on one without being told.
pub const DEFAULT_PORT: u16 = 29500;
/// The environment variable carrying the job token.
pub const TOKEN_VAR: &str = "MOSAIC_JOB_TOKEN";

#[derive(Debug, Clone, Default)]
pub struct NodeArgs {
    pub nodes: Option<usize>,
    pub node_rank: Option<usize>,
    /// "host" or "host:port".
    pub master_addr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub nodes: usize,
    pub node_rank: usize,
    pub master_host: String,
    /// None: one node and no port given, so node 0 picks a free one.
    pub master_port: Option<u16>,
    /// "flags" or "SLURM job N".
    pub source: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("--nodes {nodes} needs --master-addr HOST[:PORT] (node 0's address, the same on every node) and --node-rank I (0..{nodes}) on each node; under SLURM they are read from SLURM_* variables")]
    MissingMaster { nodes: usize },
    #[error("--nodes {nodes} needs --node-rank I (0..{nodes}) on each node")]
    MissingNodeRank { nodes: usize },
    #[error("node rank {node_rank} is not below the node count {nodes}")]
    NodeRankOutOfRange { node_rank: usize, nodes: usize },
    #[error("--nodes must be at least 1")]
    ZeroNodes,
    #[error("{name}={value:?}: {reason}")]
    BadValue {
        name: String,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Hostlist(#[from] hostlist::HostlistError),
}

/// Splits "host:port" (or "[v6]:port", or "host").
pub fn split_host_port(addr: &str) -> Result<(String, Option<u16>), TopologyError> {
    let bad = |reason: &str| TopologyError::BadValue {
        name: "--master-addr".into(),
        value: addr.to_string(),
        reason: reason.to_string(),
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(|| bad("unmatched `[`"))?;
        (h, tail.strip_prefix(':'))
    } else if addr.matches(':').count() == 1 {
        let (h, p) = addr.split_once(':').unwrap_or((addr, ""));
        (h, Some(p))
    } else {
        (addr, None)
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port = port
        .map(|p| p.parse::<u16>().map_err(|_| bad("port must be 1-65535")))
        .transpose()?;
    if port == Some(0) {
        return Err(bad("port must be 1-65535"));
    }
    Ok((host.to_string(), port))
}

fn num(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>, TopologyError> {
    get(name)
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| TopologyError::BadValue {
                    name: name.into(),
                    value: v.clone(),
                    reason: "not a non-negative integer".into(),
                })
        })
        .transpose()
}

/// Resolves the topology from flags and the environment read through `get`.
pub fn resolve(
    args: &NodeArgs,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Topology, TopologyError> {
    let (flag_host, flag_port) = match &args.master_addr {
        Some(a) => {
            let (h, p) = split_host_port(a)?;
            (Some(h), p)
        }
        None => (None, None),
    };
    let env_port = num(&get, "MASTER_PORT")?.map(|p| p as u16);
    let (nodes, node_rank, host, port, source) = if let Some(job) = get("SLURM_JOB_ID") {
        let nodes = match args.nodes {
            Some(n) => n,
            None => num(&get, "SLURM_NNODES")?
                .or(num(&get, "SLURM_JOB_NUM_NODES")?)
                .unwrap_or(1),
        };
        let node_rank = match args.node_rank {
            Some(r) => r,
            None => num(&get, "SLURM_NODEID")?.unwrap_or(0),
        };
        let host = match flag_host {
            Some(h) => h,
            None => match get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")) {
                Some(list) => hostlist::expand(&list)?.remove(0),
                None if nodes == 1 => "127.0.0.1".into(),
                None => return Err(TopologyError::MissingMaster { nodes }),
            },
        };
        // A port derived from the job id keeps two jobs sharing a node apart.
        let job_port = job
            .trim()
            .parse::<u64>()
            .ok()
            .map(|j| 20000 + (j % 20000) as u16);
        let port = flag_port.or(env_port).or(job_port).or(Some(DEFAULT_PORT));
        (nodes, node_rank, host, port, format!("SLURM job {job}"))
    } else {
        let nodes = args.nodes.unwrap_or(1);
        if nodes > 1 {
            let host = flag_host.ok_or(TopologyError::MissingMaster { nodes })?;
            let node_rank = args
                .node_rank
                .ok_or(TopologyError::MissingNodeRank { nodes })?;
            (
                nodes,
                node_rank,
                host,
                flag_port.or(Some(DEFAULT_PORT)),
                "flags".into(),
            )
        } else {
            (
                nodes,
                args.node_rank.unwrap_or(0),
                flag_host.unwrap_or_else(|| "127.0.0.1".into()),
                flag_port,
                "flags".into(),
            )
        }
    };
    if nodes == 0 {
        return Err(TopologyError::ZeroNodes);
    }
    if node_rank >= nodes {
        return Err(TopologyError::NodeRankOutOfRange { node_rank, nodes });
    }
    Ok(Topology {
        nodes,
        node_rank,
        master_host: host,
        master_port: port,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)], args: NodeArgs) -> Result<Topology, TopologyError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(&args, |k| m.get(k).cloned())
    }

    #[test]
    fn one_node_needs_nothing() {
        let t = with(&[], NodeArgs::default()).unwrap();
        assert_eq!((t.nodes, t.node_rank, t.master_port), (1, 0, None));
        assert_eq!(t.master_host, "127.0.0.1");
    }

    #[test]
    fn several_nodes_need_master_and_rank() {
        let nodes = NodeArgs {
            nodes: Some(2),
            ..Default::default()
        };
        let e = with(&[], nodes.clone()).unwrap_err();
        assert!(e.to_string().contains("--master-addr"), "{e}");
        let e = with(
            &[],
            NodeArgs {
                master_addr: Some("10.0.0.1".into()),
                ..nodes.clone()
            },
        )
        .unwrap_err();
        assert_eq!(e, TopologyError::MissingNodeRank { nodes: 2 });
        let t = with(
            &[],
            NodeArgs {
                master_addr: Some("10.0.0.1:1234".into()),
                node_rank: Some(1),
                ..nodes
            },
        )
        .unwrap();
        assert_eq!(
            (t.master_host.as_str(), t.master_port, t.node_rank),
            ("10.0.0.1", Some(1234), 1)
        );
    }

    #[test]
    fn slurm_variables_give_the_topology() {
        let t = with(
            &[
                ("SLURM_JOB_ID", "4242"),
                ("SLURM_NNODES", "5"),
                ("SLURM_NODEID", "3"),
                ("SLURM_JOB_NODELIST", "gpu[01-04,07]"),
            ],
            NodeArgs::default(),
        )
        .unwrap();
        assert_eq!((t.nodes, t.node_rank), (5, 3));
        assert_eq!(t.master_host, "gpu01");
        assert_eq!(t.master_port, Some(24242));
        assert!(t.source.contains("4242"));
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("h:1").unwrap(), ("h".to_string(), Some(1)));
        assert_eq!(split_host_port("h").unwrap(), ("h".to_string(), None));
        assert_eq!(
            split_host_port("[::1]:80").unwrap(),
            ("::1".to_string(), Some(80))
        );
        assert!(split_host_port("h:x").is_err());
        assert!(split_host_port(":80").is_err());
    }

    #[test]
    fn node_rank_out_of_range() {
        let e = with(
            &[],
            NodeArgs {
                nodes: Some(2),
                node_rank: Some(2),
                master_addr: Some("h".into()),
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            TopologyError::NodeRankOutOfRange {
                node_rank: 2,
                nodes: 2
            }
        );
    }
}
