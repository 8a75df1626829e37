//! Who may do what: bearer tokens, each granting scopes.
//!
//! | credential | grants | held by |
//! | --- | --- | --- |
//! | `read` | status and listings | dashboards, monitoring |
//! | `admin` | `read`, transfers, membership, plugins | operators |
//! | `node` | `read`, Raft RPCs, snapshot streams, membership requests between members | the nodes of one cluster |
//!
//! A node configured the old way, with one token file, gives that token every
//! scope (and says so at start-up).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    Admin,
    Node,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
            Scope::Node => "node",
        }
    }
}

/// The scopes one token grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub admin: bool,
    pub node: bool,
}

impl Grant {
    pub const ALL: Grant = Grant { admin: true, node: true };

    pub fn allows(self, scope: Scope) -> bool {
        match scope {
            Scope::Read => true,
            Scope::Admin => self.admin,
            Scope::Node => self.node,
        }
    }
}

/// Where the tokens are: one file per credential.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthFiles {
    /// Shared by the members of a cluster (required).
    pub node_token_file: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub read_token_file: Option<PathBuf>,
}

/// A node's tokens.
pub struct Credentials {
    tokens: Vec<(String, Grant)>,
    /// What this node presents to other nodes.
    node: Arc<str>,
    /// One token for every scope (the old configuration).
    pub single: bool,
}

/// Never prints a token.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let grants: Vec<Grant> = self.tokens.iter().map(|(_, g)| *g).collect();
        f.debug_struct("Credentials").field("grants", &grants).field("single", &self.single).finish()
    }
}

impl Credentials {
    /// One token for every scope.
    pub fn single(token: String) -> Credentials {
        Credentials { node: token.as_str().into(), tokens: vec![(token, Grant::ALL)], single: true }
    }

    /// The scoped credentials named by `files`.
    pub fn scoped(files: &AuthFiles) -> anyhow::Result<Credentials> {
        let node_file = files.node_token_file.as_ref().context("[auth] needs node_token_file")?;
        let node = read_token(node_file, false)?;
        let mut tokens = vec![(node.clone(), Grant { admin: false, node: true })];
        if let Some(path) = &files.admin_token_file {
            tokens.push((read_token(path, false)?, Grant { admin: true, node: false }));
        }
        if let Some(path) = &files.read_token_file {
            tokens.push((read_token(path, false)?, Grant { admin: false, node: false }));
        }
        for (i, (a, _)) in tokens.iter().enumerate() {
            anyhow::ensure!(
                tokens[..i].iter().all(|(b, _)| b != a),
                "two credentials have the same token: each scope needs its own"
            );
        }
        Ok(Credentials { node: node.into(), tokens, single: false })
    }

    /// What `token` may do, if it is one of ours. Compares in constant time.
    pub fn check(&self, token: &[u8]) -> Option<Grant> {
        let mut found = None;
        for (ours, grant) in &self.tokens {
            if constant_time_eq::constant_time_eq(token, ours.as_bytes()) {
                found = Some(*grant);
            }
        }
        found
    }

    /// The token this node presents to other members.
    pub fn node_token(&self) -> Arc<str> {
        self.node.clone()
    }
}

/// Reads the token from `path`; when `create` and the file is missing,
/// writes a new random one (mode 0600). The token is never logged; a file
/// that others may read is named in a warning.
pub fn read_token(path: &Path, create: bool) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            anyhow::ensure!(token.len() >= 16, "token in {} is shorter than 16 characters", path.display());
            anyhow::ensure!(token.len() <= 4096, "token in {} is longer than 4096 characters", path.display());
            anyhow::ensure!(
                token.bytes().all(|b| b.is_ascii_graphic()),
                "token in {} has characters that cannot go in a header",
                path.display()
            );
            warn_if_loose(path);
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating token file {}", path.display()))?;
            file.write_all(token.as_bytes())?;
            file.sync_all()?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading token file {}", path.display())),
    }
}

/// Whether a file's mode lets its group or others read it.
pub fn is_loose(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

fn warn_if_loose(path: &Path) {
    if is_loose(path) {
        tracing::warn!("token file {} can be read by other users; chmod 600 it", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, token: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, token).unwrap();
        path
    }

    #[test]
    fn each_token_grants_its_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let files = AuthFiles {
            node_token_file: Some(write(dir.path(), "node", "node-token-0123456789")),
            admin_token_file: Some(write(dir.path(), "admin", "admin-token-0123456789")),
            read_token_file: Some(write(dir.path(), "read", "read-token-0123456789")),
        };
        let creds = Credentials::scoped(&files).unwrap();
        let node = creds.check(b"node-token-0123456789").unwrap();
        let admin = creds.check(b"admin-token-0123456789").unwrap();
        let read = creds.check(b"read-token-0123456789").unwrap();
        assert!(node.allows(Scope::Node) && node.allows(Scope::Read) && !node.allows(Scope::Admin));
        assert!(admin.allows(Scope::Admin) && admin.allows(Scope::Read) && !admin.allows(Scope::Node));
        assert!(read.allows(Scope::Read) && !read.allows(Scope::Admin) && !read.allows(Scope::Node));
        assert_eq!(creds.check(b"node-token-012345678"), None);
        assert_eq!(&*creds.node_token(), "node-token-0123456789");

        let single = Credentials::single("one-token-0123456789".into());
        assert_eq!(single.check(b"one-token-0123456789"), Some(Grant::ALL));
    }

    #[test]
    fn scoped_credentials_need_distinct_tokens_and_a_node_token() {
        let dir = tempfile::tempdir().unwrap();
        let same = write(dir.path(), "same", "same-token-0123456789");
        let files =
            AuthFiles { node_token_file: Some(same.clone()), admin_token_file: Some(same), read_token_file: None };
        assert!(Credentials::scoped(&files).is_err());
        let files = AuthFiles {
            admin_token_file: Some(write(dir.path(), "a", "admin-token-0123456789")),
            ..Default::default()
        };
        assert!(Credentials::scoped(&files).unwrap_err().to_string().contains("node_token_file"));
    }

    #[test]
    fn token_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/token");
        let token = read_token(&path, true).unwrap();
        assert_eq!(read_token(&path, false).unwrap(), token);
        assert!(!is_loose(&path));
        std::fs::write(&path, "short").unwrap();
        assert!(read_token(&path, false).is_err());
        assert!(read_token(&dir.path().join("none"), false).is_err());
    }
}
