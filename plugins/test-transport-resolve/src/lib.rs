//! Test-only transport: `connect` looks up every host name of config `names` (a list) and
//! fails with `lookup of NAME failed: ...` at the first one that does not resolve. A host
//! must let it resolve only the names of its allow-list: a lookup is a channel out (the
//! name itself carries data) even when every connection is refused.

use std::net::ToSocketAddrs;
use std::time::Duration;

use asya_sdk::transport::{Delivery, Outgoing, Transport};
use asya_sdk::{Config, Error};

pub struct Resolve;

impl Transport for Resolve {
    fn connect(config: &Config) -> Result<Self, Error> {
        for name in config.str_list("names")?.unwrap_or_default() {
            let found = (name.as_str(), 1)
                .to_socket_addrs()
                .map_err(|e| Error::new(format!("lookup of {name} failed: {e}")))?
                .count();
            if found == 0 {
                return Err(Error::new(format!("lookup of {name} found no address")));
            }
        }
        Ok(Resolve)
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

asya_sdk::export_transport!(Resolve);
