//! A network of namespaces: one per node, each linked by a veth pair to a
//! bridge in the test's namespace, which also holds the bridge's address
//! (the test's own view of every node, never cut). The nemeses act on the
//! links between nodes only:
//!
//! - partitions and one-way cuts: `iptables -j DROP` on a node's OUTPUT
//!   (and INPUT) chain for the peers' addresses;
//! - packet loss: `iptables -m statistic --mode random` before the DROP;
//! - latency with jitter (which reorders): an NFQUEUE rule and a
//!   `ferry-netem` process in the namespace that holds each packet for its
//!   delay (this machine's kernel has no `sch_netem`, so not `tc netem`);
//! - bandwidth: a `tc tbf` qdisc on the node's end of its veth.
//!
//! Everything is created by [`Lab::new`] and removed when the lab is
//! dropped, also when the test panics; a lab left by a killed test process
//! is removed by the next one (its name carries the dead process's id).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Every lab's names start with this, then the owning process's id.
const PREFIX: &str = "fy";

static LABS: AtomicU32 = AtomicU32::new(0);

/// One node's namespace.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace's name (`ip netns`).
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The node's end of its veth pair, inside `ns`.
    dev: String,
}

/// The namespaces, the bridge, and the nemeses in force.
pub struct Lab {
    name: String,
    bridge: String,
    pub hosts: Vec<Host>,
    /// `ferry-netem` processes, by host index.
    delayers: Mutex<Vec<(usize, Child)>>,
}

/// Runs a command; panics with its output if it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command, ignoring failure (cleanup of what may not exist).
fn try_run(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Why this machine cannot run the fault tests, if it cannot (they need
/// root for namespaces, iptables and tc).
pub fn unsupported() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables", "tc"] {
        let found = Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if found.is_err() {
            return Some(format!("no `{tool}` (tests/setup.sh installs it)"));
        }
    }
    None
}

impl Lab {
    /// `n` namespaces on a bridge, addresses `10.P.L.2..` where P and L
    /// come from the process id and a counter (labs of one test process run
    /// side by side).
    pub fn new(n: usize) -> Lab {
        assert!(n <= 200);
        sweep_stale();
        let pid = std::process::id();
        let k = LABS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid}x{k}");
        let (p, l) = (100 + (pid % 100) as u8, (k % 250) as u8);
        let bridge = format!("{name}br");
        assert!(bridge.len() <= 15, "interface name {bridge} too long");
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        let mut lab =
            Lab { name: name.clone(), bridge: bridge.clone(), hosts: Vec::new(), delayers: Mutex::new(Vec::new()) };
        run("ip", &["addr", "add", &format!("10.{p}.{l}.1/24"), "dev", &bridge]);
        run("ip", &["link", "set", &bridge, "up"]);
        for i in 0..n {
            let ns = format!("{name}n{i}");
            let (outer, inner) = (format!("{name}v{i}"), format!("{name}i{i}"));
            let ip = Ipv4Addr::new(10, p, l, 2 + i as u8);
            run("ip", &["netns", "add", &ns]);
            lab.hosts.push(Host { ns: ns.clone(), ip, dev: inner.clone() });
            run("ip", &["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
            run("ip", &["link", "set", &inner, "netns", &ns]);
            run("ip", &["link", "set", &outer, "master", &bridge, "up"]);
            run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &inner]);
            run("ip", &["-n", &ns, "link", "set", &inner, "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// The namespace file a process joins with setns(2).
    pub fn netns_path(&self, i: usize) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.hosts[i].ns)
    }

    fn iptables(&self, i: usize, rule: &[&str]) {
        let mut args = vec!["netns", "exec", &self.hosts[i].ns, "iptables", "-w"];
        args.extend_from_slice(rule);
        run("ip", &args);
    }

    /// Drops every packet from `from` to `to` (one direction: `to` still
    /// reaches `from`, whose answers are lost).
    pub fn cut(&self, from: usize, to: usize) {
        let to_ip = self.hosts[to].ip.to_string();
        let from_ip = self.hosts[from].ip.to_string();
        self.iptables(from, &["-A", "OUTPUT", "-d", &to_ip, "-j", "DROP"]);
        self.iptables(to, &["-A", "INPUT", "-s", &from_ip, "-j", "DROP"]);
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.cut(x, y);
                self.cut(y, x);
            }
        }
    }

    /// Cuts node `i` from every other node, both ways.
    pub fn isolate(&self, i: usize) {
        let others: Vec<usize> = (0..self.hosts.len()).filter(|&j| j != i).collect();
        self.partition(&[i], &others);
    }

    /// Loses `percent` of the packets node `i` sends to the other nodes.
    pub fn loss(&self, i: usize, percent: u32) {
        let p = format!("{:.3}", f64::from(percent) / 100.0);
        for j in (0..self.hosts.len()).filter(|&j| j != i) {
            let to = self.hosts[j].ip.to_string();
            let rule =
                ["-A", "OUTPUT", "-d", &to, "-m", "statistic", "--mode", "random", "--probability", &p, "-j", "DROP"];
            self.iptables(i, &rule);
        }
    }

    /// Delays every packet node `i` sends to the other nodes by `ms` ± `jitter`.
    pub fn delay(&self, i: usize, ms: u64, jitter: u64, seed: u64) {
        let bin = crate::ferry_bin().with_file_name("ferry-netem");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns])
            .arg(&bin)
            .args(["--queue", "0", "--delay-ms", &ms.to_string(), "--jitter-ms", &jitter.to_string()])
            .args(["--seed", &seed.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "ferry-netem did not start: {:?}", child.try_wait());
        self.delayers.lock().unwrap().push((i, child));
        for j in (0..self.hosts.len()).filter(|&j| j != i) {
            let to = self.hosts[j].ip.to_string();
            let rule = ["-A", "OUTPUT", "-d", &to, "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"];
            self.iptables(i, &rule);
        }
    }

    /// Caps what node `i` sends at `kbit` kilobits per second.
    pub fn bandwidth(&self, i: usize, kbit: u32) {
        let rate = format!("{kbit}kbit");
        let host = &self.hosts[i];
        let args = ["-n", &host.ns, "qdisc", "replace", "dev", &host.dev, "root", "tbf", "rate", &rate];
        let mut args = args.to_vec();
        args.extend_from_slice(&["burst", "32kbit", "latency", "400ms"]);
        run("tc", &args);
    }

    /// Removes every nemesis: the network is whole again.
    pub fn heal(&self) {
        for (_, mut child) in self.delayers.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for host in &self.hosts {
            try_run("ip", &["netns", "exec", &host.ns, "iptables", "-w", "-F"]);
            try_run("tc", &["-n", &host.ns, "qdisc", "del", "dev", &host.dev, "root"]);
        }
    }

    /// The lab's name (a prefix of every namespace and interface it made).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.heal();
        for host in &self.hosts {
            try_run("ip", &["netns", "del", &host.ns]);
        }
        try_run("ip", &["link", "del", &self.bridge]);
    }
}

/// Removes the namespaces and bridges of labs whose process is gone.
fn sweep_stale() {
    let owner = |name: &str| -> Option<u32> { name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok() };
    let dead = |name: &str| owner(name).is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists());
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                try_run("ip", &["netns", "del", &name]);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with("br") && dead(&name) {
                try_run("ip", &["link", "del", &name]);
            }
        }
    }
}
