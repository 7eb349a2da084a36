//! Test-only transport: connects to nothing; `receive` spins forever (a runaway guest the
//! host's per-call deadline must cut off); `send` panics (a trap).

use std::time::Duration;

use asya_sdk::transport::{Delivery, Outgoing, Transport};
use asya_sdk::{Config, Error};

pub struct Spin;

impl Transport for Spin {
    fn connect(_: &Config) -> Result<Self, Error> {
        Ok(Spin)
    }

    fn receive(&mut self, _: &str, _: u32, _: Duration) -> Result<Vec<Delivery>, Error> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }

    fn send(&mut self, _: Vec<Outgoing>) -> Result<(), Error> {
        panic!("test-transport-loop: send traps on purpose")
    }

    fn ack(&mut self, _: &str) -> Result<(), Error> {
        Ok(())
    }

    fn nack(&mut self, _: &str, _: Duration) -> Result<(), Error> {
        Ok(())
    }
}

asya_sdk::export_transport!(Spin);
