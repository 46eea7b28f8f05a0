//! Seal and open with keybroker — runs against the development broker:
//!
//! ```sh
//! cargo run -p keybroker -- dev            # terminal 1: broker on 127.0.0.1:8443, key dev/demo
//! source keybroker-dev/env.sh              # terminal 2
//! cargo run -p keybroker-client --example seal_open -- dev/demo
//! ```
//!
//! It reads the broker address and the mutual-TLS files from the same `KEYBROKER_*` variables as
//! the `keybroker` CLI, seals a short record and a 1 MiB stream, opens both, and shows that one
//! DEK-cache miss serves many opens and that the wrong AAD is refused.

use keybroker_client::{ClientBuilder, Error};

fn var(name: &str) -> Result<String, Error> {
    std::env::var(name)
        .map_err(|_| Error::Config(format!("{name} is not set (source keybroker-dev/env.sh)")))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let key = std::env::args().nth(1).unwrap_or_else(|| "dev/demo".into());
    let client = ClientBuilder::from_pem_files(
        var("KEYBROKER_ENDPOINT")?,
        var("KEYBROKER_CA_CERT")?,
        var("KEYBROKER_CLIENT_CERT")?,
        var("KEYBROKER_CLIENT_KEY")?,
    )?
    .key(&key)
    .build()?;

    // One record: seal binds the AAD (here: which row the data belongs to).
    let record = b"4111 1111 1111 1111";
    let sealed = client.seal(record, b"customers/42/card").await?;
    println!(
        "sealed {} bytes into {} bytes under {key}",
        record.len(),
        sealed.len()
    );
    for _ in 0..3 {
        let opened = client.open(&sealed, b"customers/42/card").await?;
        assert_eq!(opened, record);
    }
    match client.open(&sealed, b"customers/43/card").await {
        Err(Error::Unauthentic) => {
            println!("wrong AAD refused: sealed data is malformed or not authentic")
        }
        other => {
            return Err(Error::Config(format!(
                "wrong AAD was not refused: {other:?}"
            )));
        }
    }

    // A stream: 1 MiB through the chunked API, from any AsyncRead into any AsyncWrite.
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut sealed_stream = Vec::new();
    client
        .seal_stream(b"backup-2024-06-01", &data[..], &mut sealed_stream)
        .await?;
    let mut opened = Vec::new();
    client
        .open_stream(b"backup-2024-06-01", &sealed_stream[..], &mut opened)
        .await?;
    assert_eq!(opened, data);
    println!(
        "streamed {} bytes through {} sealed bytes",
        data.len(),
        sealed_stream.len()
    );

    let s = client.stats();
    println!(
        "broker calls: {} GenerateDataKey, {} UnwrapKey; DEK cache: {} hits, {} misses",
        s.generate_calls, s.unwrap_calls, s.cache.hits, s.cache.misses
    );
    println!("ok");
    Ok(())
}
