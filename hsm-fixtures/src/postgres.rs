//! A private PostgreSQL server for tests: `initdb` into a temporary directory, `pg_ctl start` on
//! loopback (a free port, no shared unix socket), password authentication (SCRAM), stopped when
//! dropped. Uses Debian's `postgresql` package (`softhsm/install.sh` installs it); the binaries
//! are found in `$KEYBROKER_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `PATH`.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the server's directory is
//! given to the `postgres` user (which the Debian package creates) and the server runs as that
//! user through `runuser`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result, io_err};

/// The database user the fixture creates (its superuser).
pub const USER: &str = "keybroker";

/// A running PostgreSQL server in a temporary directory.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// A file holding the password of [`USER`] (what `[store] password_file` points at).
    pub password_file: PathBuf,
    password: String,
}

fn bin_dir() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("KEYBROKER_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, b)) = found.pop() {
        return Ok(b);
    }
    let which = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .map_err(io_err("look for initdb"))?;
    let p = String::from_utf8_lossy(&which.stdout).trim().to_string();
    match Path::new(&p).parent() {
        Some(d) if !p.is_empty() => Ok(d.to_path_buf()),
        _ => Err(Error::Setup(
            "PostgreSQL is not installed (Debian package postgresql; softhsm/install.sh installs it)"
                .into(),
        )),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("find a free port"))?;
    Ok(l.local_addr().map_err(io_err("find a free port"))?.port())
}

impl PgServer {
    /// Creates and starts a server (about a second).
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Creates and starts a server that accepts TCP connections over TLS only (`hostssl` in
    /// `pg_hba.conf`), with this certificate chain and key (PEM).
    pub fn start_tls(cert: &Path, key: &Path) -> Result<Self> {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("kb-pg-")
            .tempdir()
            .map_err(io_err("temp dir"))?;
        let run_as = is_root().then(|| "postgres".to_string());
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(io_err("create the data directory"))?;
        let mut pw = [0u8; 16];
        getrandom(&mut pw)?;
        let password = hex::encode(pw);
        let password_file = dir.path().join("pg-password");
        // Private, as keybroker requires of a password file.
        crate::softhsm::write_private(&password_file, &format!("{password}\n"))?;
        let initdb_pw = dir.path().join("initdb-pw");
        std::fs::write(&initdb_pw, &password).map_err(io_err("write the initdb password"))?;
        if let Some(user) = &run_as {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(io_err("open the temp dir to the postgres user"))?;
            let st = Command::new("chown")
                .args([
                    &format!("{user}:"),
                    data.to_str().unwrap_or_default(),
                    initdb_pw.to_str().unwrap_or_default(),
                ])
                .status()
                .map_err(io_err("chown"))?;
            if !st.success() {
                return Err(Error::Setup(format!(
                    "cannot give {} to the {user} user (does it exist? the Debian postgresql package creates it)",
                    data.display()
                )));
            }
        }
        let mut server = Self {
            dir,
            bin,
            run_as,
            port: 0,
            password_file,
            password,
        };
        let out = server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-U",
                USER,
                "--auth=scram-sha-256",
                "--pwfile",
                initdb_pw.to_str().unwrap_or_default(),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let _ = std::fs::remove_file(&initdb_pw);
        if !out.0 {
            return Err(Error::Setup(format!("initdb failed: {}", out.1)));
        }
        let mut ssl_opts = String::new();
        if let Some((cert, key)) = tls {
            let (c, k) = (data.join("server.crt"), data.join("server.key"));
            std::fs::copy(cert, &c).map_err(io_err("copy the server certificate"))?;
            std::fs::copy(key, &k).map_err(io_err("copy the server key"))?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))
                    .map_err(io_err("chmod the server key"))?;
            }
            if let Some(user) = &server.run_as {
                let st = Command::new("chown")
                    .arg(format!("{user}:"))
                    .args([&c, &k])
                    .status()
                    .map_err(io_err("chown"))?;
                if !st.success() {
                    return Err(Error::Setup("cannot chown the server key".into()));
                }
            }
            let hba = data.join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).map_err(io_err("read pg_hba.conf"))?;
            let text: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, text).map_err(io_err("write pg_hba.conf"))?;
            ssl_opts = format!(
                " -c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}'",
                c.display(),
                k.display()
            );
        }
        // A port can be taken between choosing and binding it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{}' \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200{ssl_opts}",
                data.display()
            );
            let log = data.join("server.log");
            let out = server.run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap_or_default(),
                    "-l",
                    log.to_str().unwrap_or_default(),
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )?;
            if out.0 {
                server.port = port;
                return Ok(server);
            }
            last = format!(
                "{}\n{}",
                out.1,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Err(Error::Setup(format!("pg_ctl start failed: {last}")))
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(bool, String)> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(io_err(format!("run {}", exe.display())))?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// The URL of database `db` (without the password: see [`PgServer::password_file`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The password (for tools run by the test itself).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Runs SQL with `psql` against database `db`; returns its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                db,
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .output()
            .map_err(io_err("run psql"))?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates a database.
    pub fn create_database(&self, name: &str) -> Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))
            .map(|_| ())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn getrandom(b: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .map_err(io_err("read /dev/urandom"))
}
