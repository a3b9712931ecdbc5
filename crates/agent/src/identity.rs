//! Which node this agent is: the Swarm node id when the engine is in a swarm,
//! otherwise an id generated once and persisted, so it survives restarts.

use std::path::Path;

use flotilla_docker::EngineInfo;
use flotilla_types::NodeId;

use crate::AgentError;

pub async fn resolve_node_id(
    configured: Option<&NodeId>,
    engine: &EngineInfo,
    id_file: &Path,
) -> Result<NodeId, AgentError> {
    if let Some(id) = configured {
        return Ok(id.clone());
    }
    if let Some(swarm_id) = &engine.swarm_node_id {
        return Ok(NodeId::parse(swarm_id)?);
    }
    let file_error = |source| AgentError::NodeIdFile { path: id_file.display().to_string(), source };
    match tokio::fs::read_to_string(id_file).await {
        Ok(text) => Ok(NodeId::parse(text.trim())?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = NodeId::parse(&format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))?;
            if let Some(dir) = id_file.parent() {
                tokio::fs::create_dir_all(dir).await.map_err(file_error)?;
            }
            tokio::fs::write(id_file, format!("{id}\n")).await.map_err(file_error)?;
            tracing::info!(node.id = %id, file = %id_file.display(), "generated and saved a node id");
            Ok(id)
        }
        Err(e) => Err(file_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(swarm: Option<&str>) -> EngineInfo {
        EngineInfo {
            hostname: "h".into(),
            server_version: "20.10".into(),
            cpus: 2,
            memory_bytes: 1,
            swarm_node_id: swarm.map(str::to_owned),
            swarm_manager: false,
            swarm_address: None,
            cgroup_version: "1".into(),
        }
    }

    #[tokio::test]
    async fn the_id_is_configured_swarm_or_persisted() {
        let dir = std::env::temp_dir().join(format!("flotilla-id-{}", uuid::Uuid::new_v4().simple()));
        let file = dir.join("node-id");
        let configured = NodeId::parse("mine").unwrap();
        assert_eq!(resolve_node_id(Some(&configured), &engine(Some("sw")), &file).await.unwrap(), configured);
        assert_eq!(resolve_node_id(None, &engine(Some("swarm1")), &file).await.unwrap().as_str(), "swarm1");
        let first = resolve_node_id(None, &engine(None), &file).await.unwrap();
        let again = resolve_node_id(None, &engine(None), &file).await.unwrap();
        assert_eq!(first, again, "the generated id is stable across restarts");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
