//! Where a volume's replicas go: distinct nodes that are ready, take
//! replicas, answer on their replica port, and have room; the consumer's
//! node first when the claim waited for one, then the nodes holding the
//! fewest replicas, then the most free space.

use std::net::SocketAddr;

use crate::error::CsiError;

/// A node that may hold replicas, as the Kubernetes API and its replica
/// server describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageNode {
    pub name: String,
    /// The replica server (the node's InternalIP, the replica port).
    pub replica_addr: Option<SocketAddr>,
    /// Why it cannot take a replica now (not ready, cordoned, no
    /// address, replica server unreachable), if it cannot.
    pub unusable: Option<String>,
    /// Replicas of strata volumes it holds.
    pub replicas: usize,
    /// Size of the filesystem under its replicas, and what is free there
    /// (0 when its replica server did not say).
    pub filesystem_bytes: u64,
    pub available_bytes: u64,
}

/// Picks `count` nodes for a volume of `size` bytes.
pub fn choose<'a>(
    nodes: &'a [StorageNode],
    count: usize,
    size: u64,
    preferred: &[String],
) -> Result<Vec<&'a StorageNode>, CsiError> {
    let mut refused = Vec::new();
    let mut usable: Vec<&StorageNode> = nodes
        .iter()
        .filter(|n| {
            let why = match &n.unusable {
                Some(why) => Some(why.clone()),
                None if n.filesystem_bytes != 0 && n.filesystem_bytes < size => Some(format!(
                    "its replica filesystem holds {} bytes, less than the volume",
                    n.filesystem_bytes
                )),
                None => None,
            };
            if let Some(why) = &why {
                refused.push(format!("{}: {why}", n.name));
            }
            why.is_none()
        })
        .collect();
    if usable.len() < count {
        let mut msg = format!(
            "{count} replicas need {count} nodes that can hold one; {} can",
            usable.len()
        );
        if !refused.is_empty() {
            msg.push_str(&format!(" ({})", refused.join("; ")));
        }
        return Err(CsiError::Exhausted(msg));
    }
    usable.sort_by(|a, b| {
        let pa = !preferred.contains(&a.name);
        let pb = !preferred.contains(&b.name);
        (
            pa,
            a.replicas,
            std::cmp::Reverse(a.available_bytes),
            &a.name,
        )
            .cmp(&(
                pb,
                b.replicas,
                std::cmp::Reverse(b.available_bytes),
                &b.name,
            ))
    });
    usable.truncate(count);
    Ok(usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, replicas: usize, available: u64) -> StorageNode {
        StorageNode {
            name: name.into(),
            replica_addr: Some("127.0.0.1:10900".parse().unwrap()),
            unusable: None,
            replicas,
            filesystem_bytes: 1 << 40,
            available_bytes: available,
        }
    }

    fn names(v: Vec<&StorageNode>) -> Vec<&str> {
        v.into_iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn spreads_and_prefers() {
        let nodes = vec![
            node("a", 3, 10),
            node("b", 1, 10),
            node("c", 1, 20),
            node("d", 0, 1),
        ];
        assert_eq!(
            names(choose(&nodes, 3, 4096, &[]).unwrap()),
            ["d", "c", "b"]
        );
        assert_eq!(
            names(choose(&nodes, 2, 4096, &["a".into()]).unwrap()),
            ["a", "d"]
        );
    }

    #[test]
    fn refuses_with_the_reasons() {
        let mut nodes = vec![node("a", 0, 10), node("b", 0, 10), node("c", 0, 10)];
        nodes[1].unusable = Some("not ready".into());
        nodes[2].filesystem_bytes = 100;
        let e = choose(&nodes, 2, 4096, &[]).unwrap_err();
        let CsiError::Exhausted(msg) = e else {
            panic!("{e:?}")
        };
        assert!(msg.contains("b: not ready") && msg.contains("c: its replica filesystem"));
        assert!(choose(&nodes, 4, 4096, &[]).is_err());
        assert_eq!(names(choose(&nodes, 1, 4096, &[]).unwrap()), ["a"]);
    }
}
