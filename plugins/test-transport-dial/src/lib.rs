//! Test-only transport: `connect` opens a TCP connection to config `addr` and fails with
//! `connect to ADDR failed: ...` when that is refused. A host whose allow-list does not
//! list `addr` must make it fail with "permission denied".

use std::time::Duration;

use asya_sdk::transport::{Delivery, Outgoing, Transport};
use asya_sdk::{Config, Error};

pub struct Dial(#[allow(dead_code)] std::net::TcpStream);

impl Transport for Dial {
    fn connect(config: &Config) -> Result<Self, Error> {
        let addr = config.str_or("addr", "127.0.0.1:6379")?;
        std::net::TcpStream::connect(addr.as_str())
            .map(Dial)
            .map_err(|e| Error::new(format!("connect to {addr} failed: {e}")))
    }

    fn receive(&mut self, _: &str, _: u32, _: Duration) -> Result<Vec<Delivery>, Error> {
        Ok(Vec::new())
    }

    fn send(&mut self, _: Vec<Outgoing>) -> Result<(), Error> {
        Ok(())
    }

    fn ack(&mut self, _: &str) -> Result<(), Error> {
        Ok(())
    }

    fn nack(&mut self, _: &str, _: Duration) -> Result<(), Error> {
        Ok(())
    }
}

asya_sdk::export_transport!(Dial);
