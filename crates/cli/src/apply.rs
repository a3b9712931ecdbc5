//! `flo apply -f flotilla.toml`: a project declared in a file, applied
//! idempotently. Each declared deployment is created if missing and updated
//! only in what differs; applying the same file twice changes nothing. With
//! `--prune`, the project's deployments the file does not declare are
//! deleted. `--dry-run` prints the plan and changes nothing.
//!
//! ```toml
//! project = "web"            # optional: the organization's default project
//!
//! [[deployment]]
//! name = "api"
//! image = "registry.example.com/api:1.4"
//! port = 8080
//! replicas = 2               # default 1
//! domain = "api.example.com" # optional
//! path_prefix = "/v1"        # optional
//! memory = "256Mi"           # optional
//! cpus = "0.5"               # optional
//! env = { MODE = "production" }
//! ```
//!
//! Secrets are not declared in files (a file is often committed); set them
//! with `flo env --secret`. Apply leaves secret variables alone.

use std::collections::BTreeMap;

use flotilla_proto::v1 as pb;
use serde::Deserialize;

use crate::{CliError, Flo, OutputFormat, units};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    /// A project's name; the default project when absent.
    pub project: Option<String>,
    #[serde(default, rename = "deployment")]
    pub deployments: Vec<Declared>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declared {
    pub name: String,
    pub image: String,
    pub port: i32,
    #[serde(default = "one")]
    pub replicas: i32,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub path_prefix: String,
    pub memory: Option<String>,
    pub cpus: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

/// What apply does to one deployment.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Create(String),
    Update { name: String, id: String, changes: Vec<String>, request: Box<pb::UpdateDeploymentRequest> },
    Unchanged(String),
    Delete { name: String, id: String },
}

pub fn parse(text: &str) -> Result<ProjectFile, CliError> {
    let file: ProjectFile = toml::from_str(text).map_err(|e| CliError::Refused(format!("the project file: {e}")))?;
    let mut names: Vec<&str> = file.deployments.iter().map(|d| d.name.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(CliError::Refused(format!("the project file declares {:?} twice", twice[0])));
    }
    Ok(file)
}

fn limits(declared: &Declared) -> Result<pb::ResourceLimits, CliError> {
    let refuse = |field: &str, e: String| CliError::Refused(format!("deployment {:?}: {field}: {e}", declared.name));
    Ok(pb::ResourceLimits {
        memory_bytes: declared
            .memory
            .as_deref()
            .map(units::parse_memory)
            .transpose()
            .map_err(|e| refuse("memory", e))?
            .unwrap_or(0),
        cpu_millis: declared
            .cpus
            .as_deref()
            .map(units::parse_cpus)
            .transpose()
            .map_err(|e| refuse("cpus", e))?
            .unwrap_or(0),
    })
}

/// The steps that bring `current` (the project's deployments) to `file`.
pub fn plan(file: &ProjectFile, current: &[pb::Deployment], prune: bool) -> Result<Vec<Step>, CliError> {
    let mut steps = Vec::new();
    for declared in &file.deployments {
        let Some(now) = current.iter().find(|d| d.name == declared.name) else {
            steps.push(Step::Create(declared.name.clone()));
            continue;
        };
        let mut changes = Vec::new();
        let mut request = pb::UpdateDeploymentRequest {
            id: now.id.clone(),
            expected_generation: now.generation,
            ..Default::default()
        };
        if now.image != declared.image {
            changes.push(format!("image {} -> {}", now.image, declared.image));
            request.image = Some(declared.image.clone());
        }
        if i64::from(now.port) != i64::from(declared.port) {
            changes.push(format!("port {} -> {}", now.port, declared.port));
            request.port = Some(declared.port);
        }
        if i64::from(now.replica_count) != i64::from(declared.replicas) {
            changes.push(format!("replicas {} -> {}", now.replica_count, declared.replicas));
            request.replicas = Some(declared.replicas);
        }
        if now.domain != declared.domain {
            changes.push(format!("domain {:?} -> {:?}", now.domain, declared.domain));
            request.domain = Some(declared.domain.clone());
        }
        let prefix = |p: &str| if p.is_empty() { "/".to_owned() } else { p.to_owned() };
        if !declared.domain.is_empty() && prefix(&now.path_prefix) != prefix(&declared.path_prefix) {
            changes.push(format!("path prefix {} -> {}", prefix(&now.path_prefix), prefix(&declared.path_prefix)));
            request.path_prefix = Some(declared.path_prefix.clone());
        }
        let wanted = limits(declared)?;
        let had = now.limits.unwrap_or_default();
        if had != wanted {
            changes.push(format!(
                "limits {}/{}m -> {}/{}m",
                had.memory_bytes, had.cpu_millis, wanted.memory_bytes, wanted.cpu_millis
            ));
            request.limits = Some(wanted);
        }
        let plain: BTreeMap<String, String> =
            now.env.iter().filter(|v| !v.secret).map(|v| (v.name.clone(), v.value.clone())).collect();
        if plain != declared.env {
            changes.push(format!(
                "env {} -> {}",
                plain.keys().cloned().collect::<Vec<_>>().join(","),
                declared.env.keys().cloned().collect::<Vec<_>>().join(",")
            ));
            // Secrets are sent back masked: they keep their values.
            let secrets = now.env.iter().filter(|v| v.secret).cloned();
            let vars = declared
                .env
                .iter()
                .map(|(name, value)| pb::EnvVar { name: name.clone(), value: value.clone(), secret: false })
                .chain(secrets)
                .collect();
            request.env = Some(pb::EnvList { vars });
        }
        if changes.is_empty() {
            steps.push(Step::Unchanged(declared.name.clone()));
        } else {
            steps.push(Step::Update {
                name: declared.name.clone(),
                id: now.id.clone(),
                changes,
                request: Box::new(request),
            });
        }
    }
    if prune {
        for d in current.iter().filter(|d| !file.deployments.iter().any(|x| x.name == d.name)) {
            steps.push(Step::Delete { name: d.name.clone(), id: d.id.clone() });
        }
    }
    Ok(steps)
}

impl Flo {
    pub(crate) async fn apply(&self, path: &str, prune: bool, dry_run: bool) -> Result<(), CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| CliError::Refused(format!("reading {path}: {e}")))?;
        let file = parse(&text)?;
        let project_id = match &file.project {
            None => String::new(),
            Some(name) => {
                let projects =
                    self.projects.list_projects(&pb::ListProjectsRequest {}).await.map_err(|e| self.err(e))?;
                match projects.into_inner().projects.into_iter().find(|p| &p.name == name) {
                    Some(project) => project.id,
                    None if dry_run => String::new(),
                    None => {
                        let request = pb::CreateProjectRequest { name: name.clone() };
                        let created = self.projects.create_project(&request).await.map_err(|e| self.err(e))?;
                        eprintln!("+ project {name}");
                        created.into_inner().project.map(|p| p.id).unwrap_or_default()
                    }
                }
            }
        };
        let current = self.all_deployments(&project_id).await?;
        let steps = plan(&file, &current, prune)?;
        for step in &steps {
            let line = match step {
                Step::Create(name) => format!("+ create {name}"),
                Step::Update { name, changes, .. } => format!("~ update {name}: {}", changes.join("; ")),
                Step::Unchanged(name) => format!("= {name} unchanged"),
                Step::Delete { name, .. } => format!("- delete {name}"),
            };
            if self.format == OutputFormat::Human {
                self.say(&line)?;
            }
        }
        if dry_run {
            return Ok(());
        }
        for step in steps {
            match step {
                Step::Create(name) => {
                    let declared = file.deployments.iter().find(|d| d.name == name).expect("planned from the file");
                    let request = pb::CreateDeploymentRequest {
                        project_id: project_id.clone(),
                        name: declared.name.clone(),
                        image: declared.image.clone(),
                        port: declared.port,
                        env: declared
                            .env
                            .iter()
                            .map(|(name, value)| pb::EnvVar { name: name.clone(), value: value.clone(), secret: false })
                            .collect(),
                        domain: declared.domain.clone(),
                        path_prefix: declared.path_prefix.clone(),
                        limits: Some(limits(declared)?),
                        replicas: Some(declared.replicas),
                        ..Default::default()
                    };
                    self.client.create_deployment(&request).await.map_err(|e| self.err(e))?;
                }
                Step::Update { request, .. } => {
                    self.client.update_deployment(&request).await.map_err(|e| self.err(e))?;
                }
                Step::Delete { id, .. } => {
                    self.client
                        .delete_deployment(&pb::DeleteDeploymentRequest { id })
                        .await
                        .map_err(|e| self.err(e))?;
                }
                Step::Unchanged(_) => {}
            }
        }
        Ok(())
    }

    /// Every deployment of a project (empty: the default one), page by page.
    async fn all_deployments(&self, project_id: &str) -> Result<Vec<pb::Deployment>, CliError> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListDeploymentsRequest {
                project_id: project_id.to_owned(),
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            };
            let page = self.client.list_deployments(&request).await.map_err(|e| self.err(e))?.into_inner();
            all.extend(page.deployments.into_iter().filter(|d| d.status != pb::DeploymentStatus::Deleting as i32));
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[deployment]]
        name = "api"
        image = "img:1"
        port = 8080
        replicas = 2
        env = { MODE = "prod" }
    "#;

    fn running(name: &str, image: &str, replicas: u32, env: &[(&str, &str, bool)]) -> pb::Deployment {
        pb::Deployment {
            id: format!("id-{name}"),
            name: name.to_owned(),
            image: image.to_owned(),
            port: 8080,
            replica_count: replicas,
            limits: Some(pb::ResourceLimits::default()),
            env: env
                .iter()
                .map(|(n, v, s)| pb::EnvVar { name: (*n).to_owned(), value: (*v).to_owned(), secret: *s })
                .collect(),
            generation: 3,
            ..Default::default()
        }
    }

    #[test]
    fn plans_only_the_differences() {
        let file = parse(FILE).unwrap();
        assert_eq!(plan(&file, &[], false).unwrap(), vec![Step::Create("api".into())]);
        let same = running("api", "img:1", 2, &[("MODE", "prod", false), ("TOKEN", "********", true)]);
        assert_eq!(plan(&file, &[same], false).unwrap(), vec![Step::Unchanged("api".into())], "secrets are left alone");
        let older = running("api", "img:0", 2, &[("MODE", "prod", false)]);
        let steps = plan(&file, &[older, running("old", "x", 1, &[])], true).unwrap();
        let Step::Update { changes, request, .. } = &steps[0] else { panic!("{steps:?}") };
        assert_eq!(changes, &vec!["image img:0 -> img:1".to_owned()]);
        assert_eq!((request.image.as_deref(), request.replicas, request.expected_generation), (Some("img:1"), None, 3));
        assert_eq!(steps[1], Step::Delete { name: "old".into(), id: "id-old".into() });
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        assert!(parse("[[deployment]]\nname = \"a\"\n").is_err(), "missing image and port");
        assert!(parse("[[deployment]]\nname = \"a\"\nimage = \"i\"\nport = 1\nbogus = 1\n").is_err(), "unknown field");
        let twice =
            "[[deployment]]\nname=\"a\"\nimage=\"i\"\nport=1\n[[deployment]]\nname=\"a\"\nimage=\"i\"\nport=1\n";
        assert!(matches!(parse(twice), Err(CliError::Refused(m)) if m.contains("twice")));
    }
}
