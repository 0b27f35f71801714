//! Shared helpers: a broker per "host" (its own socket directory), bridge
//! configs over loopback TCP with scouting off, random tensors.

#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::time::Duration;
use tensorbus::{Client, DType, TensorMeta, MAX_DIMS, USER_HEADER_LEN};
use tensorbus_broker::{Config as BrokerConfig, EmbeddedBroker};

/// How long any wait in these tests may take before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// One "host": a broker on a socket in a directory of its own.
pub struct Host {
    pub client: Client,
    pub socket: PathBuf,
    dir: PathBuf,
    _broker: EmbeddedBroker,
}

impl Host {
    /// A broker with a small pool (64 KiB slots) and a big one (8 MiB),
    /// and `channels` (broadcast; `small:` prefixed ones use the small pool only).
    pub fn start(test: &str, side: &str, channels: &[&str]) -> Host {
        let dir =
            std::env::temp_dir().join(format!("tb-bridge-{}-{test}-{side}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("broker.sock");
        let mut toml = String::from(
            "[limits]\nring_capacity = 64\n\
             [[pools]]\nname = \"small\"\nslot_size = \"64KiB\"\nslots = 48\n\
             [[pools]]\nname = \"big\"\nslot_size = \"8MiB\"\nslots = 6\n",
        );
        for c in channels {
            match c.strip_prefix("small:") {
                Some(name) => toml.push_str(&format!(
                    "[[channels]]\nname = \"{name}\"\nmode = \"broadcast\"\npools = [\"small\"]\n"
                )),
                None => toml.push_str(&format!(
                    "[[channels]]\nname = \"{c}\"\nmode = \"broadcast\"\n"
                )),
            }
        }
        let config = BrokerConfig::from_toml(&toml).expect("test broker config is valid");
        let broker = EmbeddedBroker::start(&config, &socket).expect("broker starts");
        let client = Client::connect_to(Some(&socket), "test").expect("test client connects");
        Host {
            client,
            socket,
            dir,
            _broker: broker,
        }
    }

    /// A file in this host's directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `[broker]` and `[zenoh]` part of a bridge config: loopback TCP,
/// multicast scouting off.
pub fn head(name: &str, host: &Host, listen: Option<u16>, connect: Option<u16>) -> String {
    let ep = |p: Option<u16>| match p {
        Some(p) => format!("[\"tcp/127.0.0.1:{p}\"]"),
        None => "[]".into(),
    };
    format!(
        "name = \"{name}\"\n[broker]\nsocket = {:?}\n[zenoh]\nlisten = {}\nconnect = {}\nscouting = false\n",
        host.socket.display().to_string(),
        ep(listen),
        ep(connect)
    )
}

/// xorshift64*: deterministic randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

/// FNV-1a over the bytes.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A random tensor layout: any dtype, 0 to 5 dimensions, C-contiguous,
/// transposed, or with padded rows; a random user header; now and then a
/// large one (up to 6 MiB, so Zenoh fragments it).
pub fn random_meta(rng: &mut Rng, i: u64) -> TensorMeta {
    let dtype = DType::ALL[rng.below(DType::ALL.len() as u64) as usize];
    let item = dtype.itemsize() as i64;
    let mut meta = if i % 97 == 13 {
        // Large: about 1 to 6 MiB.
        let rows = 256 + rng.below(1280) as u32;
        let cols = (4096 / item) as u32;
        TensorMeta::contiguous(dtype, &[rows, cols]).expect("contiguous")
    } else {
        let ndim = rng.below(6) as usize;
        let shape: Vec<u32> = (0..ndim).map(|_| 1 + rng.below(9) as u32).collect();
        TensorMeta::contiguous(dtype, &shape).expect("contiguous")
    };
    let ndim = usize::from(meta.ndim);
    match rng.below(3) {
        // Transposed: the first two axes swapped over the same bytes.
        1 if ndim >= 2 => {
            meta.shape.swap(0, 1);
            meta.strides.swap(0, 1);
        }
        // Padded rows: the first axis steps over extra bytes.
        2 if ndim >= 1 => {
            let pad = item * (1 + rng.below(3) as i64);
            let row = if ndim > 1 {
                meta.strides[1] * i64::from(meta.shape[1])
            } else {
                item
            };
            meta.strides[0] = row + pad;
            meta.nbytes =
                (meta.strides[0] * i64::from(meta.shape[0]).saturating_sub(1)) as u64 + row as u64;
        }
        _ => {}
    }
    let user_len = rng.below(USER_HEADER_LEN as u64 + 1) as usize;
    let mut user = vec![0u8; user_len];
    rng.fill(&mut user);
    meta.set_user_header(&user).expect("user header fits");
    assert!(usize::from(meta.ndim) <= MAX_DIMS);
    meta.validate(meta.nbytes)
        .unwrap_or_else(|e| panic!("test layout {meta:?} is invalid: {e}"));
    meta
}

/// The strides a reader sees: a slot header stores a C-contiguous layout as
/// a flag and readers rebuild its strides, so an extent-1 axis's stride
/// (which never matters) reads back canonical on either host.
pub fn read_back_strides(m: &TensorMeta) -> Vec<i64> {
    if m.is_contiguous() {
        TensorMeta::contiguous(m.dtype, m.shape())
            .expect("contiguous")
            .strides()
            .to_vec()
    } else {
        m.strides().to_vec()
    }
}
