//! Cost of one loan+publish+try_recv+release cycle on one thread (no
//! cache-line transfers): the instruction overhead of the data path.
//! `cargo run --release --example single_thread_cost`
use std::time::Instant;
use tensorbus::{Client, DType};
use tensorbus_broker::{Config, EmbeddedBroker};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sock = std::env::temp_dir().join(format!("tb-stc-{}/broker.sock", std::process::id()));
    let config = Config::from_toml(
        "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 16\n[[channels]]\nname = \"c\"\n",
    )?;
    let _b = EmbeddedBroker::start(&config, &sock)?;
    let client = Client::connect_to(Some(&sock), "stc")?;
    let p = client.producer("c")?;
    let c = client.consumer("c")?;
    for round in 0..3 {
        let n = 1_000_000u64;
        let t0 = Instant::now();
        let mut sum = 0u64;
        for i in 0..n {
            let mut t = p.loan(&[8], DType::U8)?;
            t.copy_from_slice(&i.to_le_bytes());
            t.publish()?;
            let r = c.try_recv()?;
            sum = sum.wrapping_add(r[0] as u64);
        }
        let dt = t0.elapsed();
        println!(
            "round {round}: {:.1} ns per loan+publish+recv+release (sum {sum})",
            dt.as_nanos() as f64 / n as f64
        );
    }
    Ok(())
}
