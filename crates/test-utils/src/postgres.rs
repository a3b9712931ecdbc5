//! A PostgreSQL server of a test's (or benchmark's) own: initdb in a folder,
//! started with `pg_ctl`, killed at will. Debian's server binaries
//! (scripts/dev-services.sh installs them); run as the `postgres` user when
//! root, since the server refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The PostgreSQL server binaries: FLOTILLA_PG_BIN, else Debian's newest.
pub fn pg_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("FLOTILLA_PG_BIN") {
        return bin.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries in /usr/lib/postgresql (scripts/dev-services.sh installs them)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

/// Runs `program args` as the `postgres` user when root, with `env`; its
/// output, or why it failed.
pub fn try_as_postgres(program: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String, String> {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let output = command.args(args).envs(env.iter().map(|(k, v)| (k, v))).output().map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(format!("{} {args:?} failed: {text}", program.display())) }
}

/// [`try_as_postgres`], panicking with the output if it fails.
pub fn run_as_postgres(program: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    try_as_postgres(program, args, env).unwrap_or_else(|e| panic!("{e}"))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Hands `path` (recursively) to the `postgres` user when root.
pub fn give_to_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().expect("chown");
        assert!(status.success(), "chown {}", path.display());
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// A server on `127.0.0.1:port` over a data directory; killed on drop.
pub struct LocalServer {
    pub data: PathBuf,
    pub port: u16,
    log: PathBuf,
}

impl LocalServer {
    /// A new data directory in `data` (made by initdb, trust on loopback,
    /// superuser `postgres`), with `conf` appended to its postgresql.conf.
    /// `data`'s parent must be the `postgres` user's.
    pub fn init(data: &Path, conf: &str) {
        run_as_postgres(&pg_bin().join("initdb"), &["-D", path_str(data), "-A", "trust", "-U", "postgres"], &[]);
        let file = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&file).expect("postgresql.conf");
        text.push_str(conf);
        std::fs::write(&file, text).expect("postgresql.conf written");
    }

    /// Starts the server on `data`, logging to `log`; panics with the log
    /// if it does not start.
    pub fn start(data: &Path, port: u16, log: &Path) -> Self {
        let server = Self { data: data.to_owned(), port, log: log.to_owned() };
        server.start_again();
        server
    }

    /// Starts it (again, after [`Self::kill`]).
    pub fn start_again(&self) {
        let options = format!("-p {} -k /tmp -c listen_addresses=127.0.0.1", self.port);
        let started = try_as_postgres(
            &pg_bin().join("pg_ctl"),
            &["-D", path_str(&self.data), "-l", path_str(&self.log), "-o", &options, "-w", "-t", "120", "start"],
            &[],
        );
        if let Err(error) = started {
            panic!("{error}\nits log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }

    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops it at once (`-m immediate`: no shutdown checkpoint, crash
    /// recovery at the next start), as a lost machine does.
    pub fn kill(&self) {
        let _ = try_as_postgres(
            &pg_bin().join("pg_ctl"),
            &["-D", path_str(&self.data), "-m", "immediate", "-w", "stop"],
            &[],
        );
    }

    /// `psql -c sql` as the superuser: its output, trimmed.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let args = [
            "-X",
            "-tA",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        ];
        run_as_postgres(Path::new("/usr/bin/psql"), &args, &[]).trim().to_owned()
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
    }
}
