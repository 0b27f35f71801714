//! Two brokers (separate socket directories), two bridges over loopback
//! TCP: tensors arrive with the same bytes and metadata; malformed samples
//! are counted and dropped and never reach a consumer.

mod common;

use common::{checksum, free_port, head, random_meta, read_back_strides, Host, Rng, WAIT};
use std::time::Duration;
use tensorbus::error::TryRecvError;
use tensorbus::{ConsumerOptions, DType, Policy, TensorMeta, TensorView};
use tensorbus_bridge::bridge::wait_until;
use tensorbus_bridge::{wire, Bridge, Config, Direction};
use zenoh::Wait;

const N: u64 = 1000;

#[derive(Debug, PartialEq, Eq)]
struct Seen {
    dtype: DType,
    shape: Vec<u32>,
    strides: Vec<i64>,
    nbytes: u64,
    user: Vec<u8>,
    sum: u64,
}

impl Seen {
    fn of(t: &impl TensorView) -> Seen {
        let strides = read_back_strides(t.meta());
        Seen {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            strides,
            nbytes: t.meta().nbytes,
            user: t.user_header().to_vec(),
            sum: checksum(t),
        }
    }
}

#[test]
fn thousand_mixed_tensors_cross_two_bridges_unchanged() {
    let a = Host::start("mixed", "a", &["cam/raw"]);
    let b = Host::start("mixed", "b", &[]);
    let port = free_port();
    let ca = Config::from_toml(&format!(
        "{}[[export]]\nchannel = \"cam/raw\"\npolicy = \"block\"\n",
        head("bridge-a", &a, Some(port), None)
    ))
    .unwrap();
    // The far side creates its channel (no channel in B's broker config).
    let cb = Config::from_toml(&format!(
        "{}[[import]]\nkey = \"tensorbus/cam/raw\"\nchannel = \"remote/cam\"\npolicy = \"block\"\n\
         create = {{ mode = \"broadcast\" }}\n",
        head("bridge-b", &b, None, Some(port))
    ))
    .unwrap();
    let bridge_a = Bridge::start(&ca).expect("bridge a starts");
    let bridge_b = Bridge::start(&cb).expect("bridge b starts");
    let consumer = b
        .client
        .consumer_with(
            "remote/cam",
            ConsumerOptions::default().policy(Policy::Block).depth(16),
        )
        .unwrap();

    // The producer runs on its own thread: every route is `block`, so it
    // waits whenever the bridge or the link is behind.
    let producer = a.client.producer("cam/raw").unwrap();
    let sent = std::thread::spawn(move || {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut sent = Vec::new();
        for i in 0..N {
            let meta = random_meta(&mut rng, i);
            let mut t = loop {
                match producer.loan_meta(meta) {
                    Ok(t) => break t,
                    Err(tensorbus::error::LoanError::PoolExhausted { .. }) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("loan {i}: {e}"),
                }
            };
            rng.fill(t.as_mut_bytes());
            sent.push(Seen::of(&t));
            t.publish().unwrap();
        }
        sent
    });

    let bridge_b_id = b
        .client
        .stat()
        .unwrap()
        .clients
        .iter()
        .find(|c| c.name == "bridge-b")
        .expect("bridge b is a client of broker b")
        .id;
    let mut got = Vec::new();
    for i in 0..N {
        let t = consumer
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("tensor {i} never arrived: {e}"));
        // Seq on the far side is the importing bridge's own, so in a lossless
        // route it counts from 0 without gaps.
        assert_eq!(t.seq(), i);
        assert_eq!(t.producer_id(), bridge_b_id);
        got.push(Seen::of(&t));
    }
    let sent = sent.join().expect("producer thread");
    assert_eq!(sent.len(), got.len());
    for (i, (s, g)) in sent.iter().zip(&got).enumerate() {
        assert_eq!(s, g, "tensor {i} differs");
    }
    // A mix was sent.
    let dtypes: std::collections::HashSet<_> = sent.iter().map(|s| s.dtype).collect();
    assert_eq!(dtypes.len(), DType::ALL.len());
    assert!(sent.iter().any(|s| s.nbytes > 1 << 20), "a large tensor");
    assert!(sent.iter().any(|s| s.shape.is_empty()), "a scalar");

    assert!(wait_until(WAIT, || bridge_b.stats()[0].samples == N));
    let ea = &bridge_a.stats()[0];
    let ib = &bridge_b.stats()[0];
    assert_eq!(
        (ea.direction, ea.samples, ea.dropped, ea.errors),
        (Direction::Export, N, 0, 0)
    );
    assert_eq!(
        (
            ib.direction,
            ib.samples,
            ib.dropped,
            ib.malformed,
            ib.errors
        ),
        (Direction::Import, N, 0, 0, 0)
    );
    assert_eq!(ea.bytes, ib.bytes);
    assert!(matches!(consumer.try_recv(), Err(TryRecvError::Empty)));
    drop(bridge_b);
    drop(bridge_a);
}

/// A raw Zenoh session (no tensorbus) connected to a bridge that imports
/// `tensorbus/bad` into a channel of 64 KiB slots: 58 malformed samples,
/// then a good one.
#[test]
fn malformed_samples_are_counted_and_never_delivered() {
    let b = Host::start("malformed", "b", &["small:in"]);
    let port = free_port();
    let cb = Config::from_toml(&format!(
        "{}[[import]]\nkey = \"tensorbus/bad\"\nchannel = \"in\"\n",
        head("bridge-b", &b, Some(port), None)
    ))
    .unwrap();
    let bridge = Bridge::start(&cb).expect("bridge starts");
    let consumer = b.client.consumer("in").unwrap();

    let mut zc = zenoh::Config::default();
    zc.insert_json5("connect/endpoints", &format!("[\"tcp/127.0.0.1:{port}\"]"))
        .unwrap();
    zc.insert_json5("listen/endpoints", "[]").unwrap();
    zc.insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    let session = zenoh::open(zc).wait().unwrap();
    // Block, not Zenoh's default Drop: under congestion (after the large
    // sample) a put must wait, not vanish.
    let publisher = session
        .declare_publisher("tensorbus/bad")
        .congestion_control(zenoh::qos::CongestionControl::Block)
        .wait()
        .unwrap();
    assert!(
        wait_until(WAIT, || publisher
            .matching_status()
            .wait()
            .is_ok_and(|s| s.matching())),
        "the bridge's subscriber never showed up"
    );

    let good = TensorMeta::contiguous(DType::F32, &[4, 4]).unwrap();
    let good_att = wire::encode(&good, 0);
    let put = |payload: Vec<u8>, att: Option<Vec<u8>>| {
        let p = publisher.put(payload);
        match att {
            Some(a) => p.attachment(a).wait().unwrap(),
            None => p.wait().unwrap(),
        }
    };
    // 1. No attachment.
    put(vec![0; 64], None);
    // 2. Bad magic.
    let mut bad = good_att.clone();
    bad[0] = b'X';
    put(vec![0; 64], Some(bad));
    // 3. A truncated attachment.
    put(vec![0; 64], Some(good_att[..20].to_vec()));
    // 4. A short payload.
    put(vec![0; 63], Some(good_att.clone()));
    // 5. Shape and strides outside nbytes.
    let mut bad = good;
    bad.strides[0] = 1000;
    put(vec![0; 64], Some(wire::encode(&bad, 0)));
    // 6. A tensor that fits no slot of the channel (128 KiB > 64 KiB).
    let big = TensorMeta::contiguous(DType::U8, &[128 * 1024]).unwrap();
    put(vec![0; 128 * 1024], Some(wire::encode(&big, 0)));
    // 7. Random attachments.
    let mut rng = Rng(7);
    for _ in 0..50 {
        let mut a = vec![0u8; rng.below(200) as usize];
        rng.fill(&mut a);
        put(vec![0; 64], Some(a));
    }
    // 8. An lz4 payload that is not lz4, and an int8 one whose payload is short.
    let mut lz = wire::encode(&good, 0);
    lz[5] = 0x10;
    put(vec![0xff; 40], Some(lz));
    let q8 = wire::encode_with(&good, 0, 1, &[0, 0, 128, 63, 0, 0, 0, 0]);
    put(vec![0; 15], Some(q8));
    // Then one good tensor.
    let mut good_user = good;
    good_user.set_user_header(b"good").unwrap();
    let payload: Vec<u8> = (0..64).collect();
    put(payload.clone(), Some(wire::encode(&good_user, 0)));

    let t = consumer
        .recv_timeout(WAIT)
        .expect("the good tensor arrives");
    assert_eq!(t.user_header(), b"good");
    assert_eq!(&t[..], &payload[..]);
    assert_eq!(t.shape(), &[4, 4]);
    assert!(wait_until(WAIT, || bridge.stats()[0].samples == 1));
    let s = &bridge.stats()[0];
    assert_eq!((s.malformed, s.samples, s.errors), (58, 1, 0), "{s}");
    assert!(matches!(consumer.try_recv(), Err(TryRecvError::Empty)));
    drop(t);
    drop(publisher);
    session.close().wait().unwrap();
}
