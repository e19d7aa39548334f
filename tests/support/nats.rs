//! A real `nats-server` for tests: a free loopback port, JetStream with a
//! per-server temp store, its log in that temp dir, killed on drop. Restart
//! keeps the port, the arguments and the store.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server binary: `NATS_SERVER_BIN` or `nats-server` from PATH.
pub fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

/// A loopback port free right now (bind to 0, read it, close).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    args: Vec<String>,
    js: bool,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// `nats-server -js` on a free port.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// `-js` with extra arguments (e.g. `["--user", "u", "--pass", "p"]`).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        NatsServer::launch(extra, true)
    }

    /// Without JetStream (e.g. a two-node cluster, which JetStream would
    /// refuse without a third node).
    pub fn start_core(extra: &[&str]) -> NatsServer {
        NatsServer::launch(extra, false)
    }

    fn launch(extra: &[&str], js: bool) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("caf-nats-")
            .tempdir()
            .expect("tempdir");
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            js,
            dir,
        };
        s.spawn();
        s
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `nats://<userinfo>@127.0.0.1:<port>`.
    pub fn url_with(&self, userinfo: &str) -> String {
        format!("nats://{userinfo}@127.0.0.1:{}", self.port)
    }

    /// The per-server temp directory (store under `store/`, log in `server.log`).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server's process id (e.g. to send SIGUSR2 for lame duck mode).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same arguments and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let store = self.dir.path().join("store");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        let port = self.port.to_string();
        let mut cmd = Command::new(binary());
        cmd.args(["-a", "127.0.0.1", "-p", &port]);
        if self.js {
            cmd.arg("-js").arg("-sd").arg(&store);
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (install nats-server): {e}", binary()));
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10));
    }

    /// Waits until the port accepts and sends INFO.
    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"INFO" {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("nats-server exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not ready on port {}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
