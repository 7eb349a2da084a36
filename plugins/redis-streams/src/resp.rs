//! A minimal RESP2 client over a blocking `std::net::TcpStream` (WASI sockets in the guest):
//! commands are written in batches (pipelining) and replies read in order.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// One reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    pub fn into_array(self) -> Option<Vec<Value>> {
        match self {
            Value::Array(Some(a)) => Some(a),
            _ => None,
        }
    }

    pub fn into_bytes(self) -> Option<Vec<u8>> {
        match self {
            Value::Bulk(Some(b)) => Some(b),
            Value::Simple(s) => Some(s.into_bytes()),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

/// Largest bulk string accepted (a guard against a confused stream).
const MAX_BULK: usize = 512 << 20;

pub struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    pub fn connect(addr: &str) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            out: Vec::with_capacity(4096),
            buf: Vec::with_capacity(16 * 1024),
            pos: 0,
        })
    }

    /// Queue one command (sent by [`Conn::flush`]).
    pub fn push(&mut self, args: &[&[u8]]) {
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let r = self.stream.write_all(&self.out);
        self.out.clear();
        r?;
        self.stream.flush()
    }

    /// Send queued commands and read `n` replies.
    pub fn run(&mut self, n: usize) -> io::Result<Vec<Value>> {
        self.flush()?;
        (0..n).map(|_| self.read_value()).collect()
    }

    /// One command, one reply.
    pub fn call(&mut self, args: &[&[u8]]) -> io::Result<Value> {
        self.push(args);
        self.flush()?;
        self.read_value()
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + 16 * 1024, 0);
        let n = loop {
            match self.stream.read(&mut self.buf[len..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match n {
            Ok(0) => {
                self.buf.truncate(len);
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ))
            }
            Ok(n) => {
                self.buf.truncate(len + n);
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(len);
                Err(e)
            }
        }
    }

    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[self.pos..self.pos + i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() - self.pos < n + 2 {
            self.fill()?;
        }
        let v = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n + 2;
        Ok(v)
    }

    pub fn read_value(&mut self) -> io::Result<Value> {
        let line = self.line()?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed RESP reply");
        let (&kind, rest) = line.split_first().ok_or_else(bad)?;
        let text = || String::from_utf8_lossy(rest).into_owned();
        let int = || -> io::Result<i64> {
            std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)
        };
        Ok(match kind {
            b'+' => Value::Simple(text()),
            b'-' => Value::Error(text()),
            b':' => Value::Int(int()?),
            b'$' => {
                let n = int()?;
                if n < 0 {
                    Value::Bulk(None)
                } else if n as usize > MAX_BULK {
                    return Err(bad());
                } else {
                    Value::Bulk(Some(self.exact(n as usize)?))
                }
            }
            b'*' => {
                let n = int()?;
                if n < 0 {
                    Value::Array(None)
                } else {
                    let mut items = Vec::with_capacity((n as usize).min(1024));
                    for _ in 0..n {
                        items.push(self.read_value()?);
                    }
                    Value::Array(Some(items))
                }
            }
            _ => return Err(bad()),
        })
    }
}
