//! `flo backups`: the control database's base backups, newest first, and
//! the last good one (platform administrators).

use flotilla_proto::v1 as pb;

use crate::{CliError, Flo, OutputFormat, bytes, time_text};

impl Flo {
    pub(crate) async fn list_backups(&self, limit: i32) -> Result<(), CliError> {
        let request = pb::ListDatabaseBackupsRequest { limit };
        let reply = self.nodes.list_database_backups(&request).await.map_err(|e| self.err(e))?.into_inner();
        if self.format == OutputFormat::Json {
            return self.json(&reply);
        }
        match &reply.last_good {
            Some(good) => self.say(&format!(
                "last good backup: {} finished {} ({}, WAL from {})",
                good.label,
                time_text(good.finished_at.as_ref()),
                bytes(good.size_bytes as f64),
                good.wal_start
            ))?,
            None => self.say("last good backup: none (is the stack's backup service running? docs/data.md)")?,
        }
        if reply.backups.is_empty() {
            return Ok(());
        }
        self.say(&format!("{:<18} {:<19} {:<7} {:>9}  {}", "LABEL", "FINISHED", "RESULT", "SIZE", "WHERE / WHY"))?;
        for b in &reply.backups {
            let (result, size, detail) = if b.succeeded {
                ("ok", bytes(b.size_bytes as f64), b.location.as_str())
            } else {
                ("failed", "-".to_owned(), b.error.as_str())
            };
            self.say(&format!(
                "{:<18} {:<19} {:<7} {:>9}  {detail}",
                b.label,
                time_text(b.finished_at.as_ref()),
                result,
                size
            ))?;
        }
        Ok(())
    }
}
