//! `ferry-netem`: holds the packets an NFQUEUE rule sends it for a random
//! delay, then lets them go. The fault tests' latency nemesis on kernels
//! without `sch_netem`: run inside a node's network namespace, fed by an
//! `iptables ... -j NFQUEUE --queue-num N --queue-bypass` rule (packets pass
//! unchanged when this process is not there). Jitter reorders packets, as
//! netem's does.
//!
//! `ferry-netem --queue N --delay-ms D --jitter-ms J --seed S`: each packet
//! waits D ± J ms (uniform). Runs until killed; packets still held then are
//! dropped by the kernel, and TCP sends them again.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 0)]
    queue: u16,
    #[arg(long)]
    delay_ms: u64,
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// A held packet, ordered by when it goes (then by arrival).
struct Held {
    due: Instant,
    order: u64,
    msg: nfq::Message,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut queue = nfq::Queue::open().context("opening a netfilter queue socket (needs CAP_NET_ADMIN)")?;
    queue.bind(args.queue).with_context(|| format!("binding queue {}", args.queue))?;
    queue.set_queue_max_len(args.queue, 8192)?;
    // A full queue lets packets through rather than dropping them: loss is
    // another nemesis's job.
    queue.set_fail_open(args.queue, true)?;
    queue.set_nonblocking(true);
    println!("ready");
    let (low, high) = (args.delay_ms.saturating_sub(args.jitter_ms), args.delay_ms + args.jitter_ms);
    let mut held: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut order = 0u64;
    loop {
        loop {
            match queue.recv() {
                Ok(msg) => {
                    let delay = Duration::from_millis(rng.random_range(low..=high));
                    order += 1;
                    held.push(Reverse(Held { due: Instant::now() + delay, order, msg }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the queue"),
            }
        }
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse(h)| h.due <= now) {
            let Reverse(Held { mut msg, .. }) = held.pop().unwrap();
            msg.set_verdict(nfq::Verdict::Accept);
            queue.verdict(msg).context("releasing a packet")?;
        }
        // 1 ms granularity: the delays this serves are tens of milliseconds.
        std::thread::sleep(Duration::from_millis(1));
    }
}
