//! Shared test helpers: a real local HTTP/1.1 server that can misbehave on purpose, tiny real
//! qcow2 files, and cache inspection.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the server answers one path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this body.
    Ok(Vec<u8>),
    /// 404.
    NotFound,
    /// 200 claiming `claimed` bytes, sending `body`, then closing the connection.
    Truncated { body: Vec<u8>, claimed: u64 },
    /// 200 claiming `claimed` bytes, sending `body`, then going silent (never closing).
    Stall { body: Vec<u8>, claimed: u64 },
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Reply>,
    hits: HashMap<String, usize>,
}

/// A local HTTP server serving `/images/<file>`; dropped with the test's runtime.
pub struct Server {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<Mutex<State>> = Arc::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, st.clone()));
            }
        });
        Server { port, state, task }
    }

    /// Stop listening: later connections are refused.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/images/", self.port)
    }

    pub fn set(&self, file: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(format!("/images/{file}"), reply);
    }

    pub fn hits(&self, file: &str) -> usize {
        *self
            .state
            .lock()
            .unwrap()
            .hits
            .get(&format!("/images/{file}"))
            .unwrap_or(&0)
    }

    /// Serve `bytes` as `file` with a matching SHA512SUMS (Debian's `<sha512>  <name>` format,
    /// with a second unrelated entry like the real one has).
    pub fn publish(&self, file: &str, bytes: &[u8]) {
        self.set(file, Reply::Ok(bytes.to_vec()));
        self.set_sums(file, &sha512(bytes));
    }

    pub fn set_sums(&self, file: &str, sum: &str) {
        let other = "0".repeat(128);
        let sums = format!("{other}  debian-13-genericcloud-amd64.json\n{sum}  {file}\n");
        self.set("SHA512SUMS", Reply::Ok(sums.into_bytes()));
    }
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let reply = {
        let mut s = state.lock().unwrap();
        *s.hits.entry(path.clone()).or_default() += 1;
        s.routes.get(&path).cloned().unwrap_or(Reply::NotFound)
    };
    let head = |len: u64| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
    };
    match reply {
        Reply::Ok(body) => {
            let _ = sock.write_all(head(body.len() as u64).as_bytes()).await;
            let _ = sock.write_all(&body).await;
        }
        Reply::NotFound => {
            let body = b"not found\n";
            let h = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(h.as_bytes()).await;
            let _ = sock.write_all(body).await;
        }
        Reply::Truncated { body, claimed } => {
            let _ = sock.write_all(head(claimed).as_bytes()).await;
            let _ = sock.write_all(&body).await;
        }
        Reply::Stall { body, claimed } => {
            let _ = sock.write_all(head(claimed).as_bytes()).await;
            let _ = sock.write_all(&body).await;
            let _ = sock.flush().await;
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
    }
    let _ = sock.shutdown().await;
}

/// A URL where nothing listens (bind, note the port, release it).
pub fn dead_base_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/images/")
}

pub fn sha512(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha512::digest(bytes))
}

pub fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

fn ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real qcow2 of `virtual_mib` MiB with the first `data_mib` MiB filled with `pattern`.
pub fn make_qcow2(path: &Path, virtual_mib: u64, data_mib: u64, pattern: u8) -> Vec<u8> {
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(format!("{virtual_mib}M")));
    if data_mib > 0 {
        ok(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {pattern:#x} 0 {data_mib}M"),
            ])
            .arg(path));
    }
    std::fs::read(path).unwrap()
}

/// qcow2 image bytes in a scratch dir.
pub fn qcow2_bytes(virtual_mib: u64, data_mib: u64, pattern: u8) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    make_qcow2(&d.path().join("x.qcow2"), virtual_mib, data_mib, pattern)
}

/// The image cache holds only the lock and complete image directories (no staging leftovers),
/// and returns the image directory names.
pub fn cache_entries(images: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(images) else {
        return vec![];
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in &names {
        assert!(
            n == ".lock" || !n.starts_with('.'),
            "junk left in the cache: {n} (all: {names:?})"
        );
    }
    names.retain(|n| n != ".lock");
    names
}

/// Files in an image directory, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

pub fn tmp_dirs() -> (tempfile::TempDir, boma_qvm::paths::Dirs) {
    let t = tempfile::tempdir().unwrap();
    let d = boma_qvm::paths::Dirs::under(t.path());
    (t, d)
}
