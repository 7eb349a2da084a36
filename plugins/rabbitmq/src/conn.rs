//! One AMQP connection on a blocking `std::net::TcpStream` (WASI sockets inside the
//! component): the handshake, channel 1 in confirm mode, frame reads with a deadline and
//! heartbeats.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::amqp::{self, Frame, In, Out};

/// The one channel every connection uses.
pub const CHANNEL: u16 = 1;
/// Largest frame we accept or send (the broker may ask for less).
const FRAME_MAX: u32 = 128 * 1024;
/// Shortest read timeout (a zero timeout is not allowed by `set_read_timeout`).
const MIN_READ: Duration = Duration::from_millis(1);

/// Why a connection stopped being usable.
#[derive(Debug)]
pub enum Fail {
    /// The socket failed, closed, or the stream is corrupt: reconnect.
    Io(String),
    /// The broker closed the channel or connection with a reason.
    Closed { code: u16, text: String },
    /// Nothing arrived in time for a reply the client waits for.
    Timeout(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Io(m) | Fail::Timeout(m) => f.write_str(m),
            Fail::Closed { code, text } => write!(f, "closed by the broker: {code} {text}"),
        }
    }
}

fn io_fail(what: &str) -> impl FnOnce(io::Error) -> Fail + '_ {
    move |e| Fail::Io(format!("{what}: {e}"))
}

/// Connection parameters.
#[derive(Debug, Clone)]
pub struct Params {
    pub address: String,
    pub vhost: String,
    pub user: String,
    pub password: String,
    /// Heartbeat interval asked for (seconds; 0 = off).
    pub heartbeat_s: u16,
    /// Bound of each step of the handshake.
    pub timeout: Duration,
}

pub struct Conn {
    sock: TcpStream,
    rbuf: Vec<u8>,
    /// Start of unparsed bytes in `rbuf`.
    rpos: usize,
    scratch: Box<[u8]>,
    read_timeout: Option<Duration>,
    pub frame_max: u32,
    heartbeat: Option<Duration>,
    last_write: Instant,
    last_read: Instant,
}

impl Conn {
    /// Connect, authenticate (PLAIN), open the vhost, open channel 1 and select confirm
    /// mode on it.
    pub fn open(p: &Params) -> Result<Conn, Fail> {
        let sock = TcpStream::connect(&p.address)
            .map_err(|e| Fail::Io(format!("connect to {}: {e}", p.address)))?;
        let _ = sock.set_nodelay(true);
        let now = Instant::now();
        let mut c = Conn {
            sock,
            rbuf: Vec::with_capacity(64 * 1024),
            rpos: 0,
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            read_timeout: None,
            frame_max: amqp::FRAME_MIN_SIZE,
            heartbeat: None,
            last_write: now,
            last_read: now,
        };
        c.write(amqp::PROTOCOL_HEADER)?;
        let deadline = || Instant::now() + p.timeout;
        match c.expect_method(deadline(), "connection.start")? {
            In::Start { mechanisms } => {
                if !mechanisms.split(' ').any(|m| m == "PLAIN") {
                    return Err(Fail::Io(format!(
                        "broker offers no PLAIN authentication (mechanisms: {mechanisms})"
                    )));
                }
            }
            m => return Err(unexpected("connection.start", &m)),
        }
        c.send(
            0,
            &Out::StartOk {
                user: &p.user,
                password: &p.password,
            },
        )?;
        let (channel_max, frame_max, heartbeat) =
            match c.expect_method(deadline(), "connection.tune")? {
                In::Tune {
                    channel_max,
                    frame_max,
                    heartbeat,
                } => (channel_max, frame_max, heartbeat),
                In::Close { code, text, .. } => {
                    return Err(Fail::Closed {
                        code,
                        text: format!("{text} (check user and password)"),
                    })
                }
                m => return Err(unexpected("connection.tune", &m)),
            };
        let frame_max = match frame_max {
            0 => FRAME_MAX,
            n => n.min(FRAME_MAX),
        };
        // Ours when the broker proposes none, else the smaller; 0 in the config = off.
        let heartbeat = match (p.heartbeat_s, heartbeat) {
            (0, _) => 0,
            (ours, 0) => ours,
            (ours, theirs) => ours.min(theirs),
        };
        c.send(
            0,
            &Out::TuneOk {
                channel_max: channel_max.clamp(1, 2047),
                frame_max,
                heartbeat,
            },
        )?;
        c.frame_max = frame_max;
        c.heartbeat = (heartbeat > 0).then(|| Duration::from_secs(heartbeat.into()));
        c.send(0, &Out::Open { vhost: &p.vhost })?;
        match c.expect_method(deadline(), "connection.open-ok")? {
            In::OpenOk => {}
            In::Close { code, text, .. } => return Err(Fail::Closed { code, text }),
            m => return Err(unexpected("connection.open-ok", &m)),
        }
        c.send(CHANNEL, &Out::ChannelOpen)?;
        match c.expect_method(deadline(), "channel.open-ok")? {
            In::ChannelOpenOk => {}
            m => return Err(unexpected("channel.open-ok", &m)),
        }
        c.send(CHANNEL, &Out::ConfirmSelect)?;
        match c.expect_method(deadline(), "confirm.select-ok")? {
            In::ConfirmSelectOk => {}
            m => return Err(unexpected("confirm.select-ok", &m)),
        }
        Ok(c)
    }

    /// The next method frame during the handshake (heartbeats skipped).
    fn expect_method(&mut self, deadline: Instant, what: &str) -> Result<In, Fail> {
        loop {
            match self.next_frame(deadline)? {
                Some(Frame::Method { method, .. }) => return Ok(method),
                Some(_) => continue,
                None => return Err(Fail::Timeout(format!("no {what} from the broker in time"))),
            }
        }
    }

    /// Encode and write one method.
    pub fn send(&mut self, channel: u16, m: &Out<'_>) -> Result<(), Fail> {
        let mut out = Vec::with_capacity(64);
        amqp::method(&mut out, channel, m).map_err(|e| Fail::Io(e.0))?;
        self.write(&out)
    }

    /// Write bytes as they are (already framed).
    pub fn write(&mut self, b: &[u8]) -> Result<(), Fail> {
        self.sock.write_all(b).map_err(io_fail("write"))?;
        self.last_write = Instant::now();
        Ok(())
    }

    /// A heartbeat when half the interval passed without a write; a broker silent for two
    /// intervals is gone.
    pub fn keep_alive(&mut self) -> Result<(), Fail> {
        let Some(hb) = self.heartbeat else {
            return Ok(());
        };
        if self.last_read.elapsed() > hb * 2 {
            return Err(Fail::Io(format!(
                "broker silent for {:?} (heartbeat {hb:?})",
                self.last_read.elapsed()
            )));
        }
        if self.last_write.elapsed() >= hb / 2 {
            let mut out = Vec::with_capacity(8);
            amqp::heartbeat(&mut out);
            self.write(&out)?;
        }
        Ok(())
    }

    /// A complete frame already read, without touching the socket.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, Fail> {
        match amqp::parse_frame(&self.rbuf[self.rpos..], self.frame_max) {
            Ok(Some((f, n))) => {
                self.rpos += n;
                if self.rpos == self.rbuf.len() {
                    self.rbuf.clear();
                    self.rpos = 0;
                }
                Ok(Some(f))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(Fail::Io(format!("malformed frame from the broker: {e}"))),
        }
    }

    /// The next frame, reading from the socket until `deadline` (`None` when it passed).
    /// A deadline already passed still reads once (what arrived since the last call).
    pub fn next_frame(&mut self, deadline: Instant) -> Result<Option<Frame>, Fail> {
        let mut read_once = false;
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(Some(f));
            }
            self.keep_alive()?;
            let now = Instant::now();
            let mut left = deadline.saturating_duration_since(now);
            if left.is_zero() && read_once {
                return Ok(None);
            }
            read_once = true;
            if let Some(hb) = self.heartbeat {
                left = left.min(hb / 2);
            }
            let left = left.max(MIN_READ);
            if self.read_timeout != Some(left) {
                self.sock
                    .set_read_timeout(Some(left))
                    .map_err(io_fail("set read timeout"))?;
                self.read_timeout = Some(left);
            }
            if self.rpos > 0 {
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
            }
            match self.sock.read(&mut self.scratch) {
                Ok(0) => return Err(Fail::Io("connection closed by the broker".into())),
                Ok(n) => {
                    self.rbuf.extend_from_slice(&self.scratch[..n]);
                    self.last_read = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fail::Io(format!("read: {e}"))),
            }
        }
    }

    /// Close politely (bounded); the socket is dropped either way.
    pub fn close(mut self, timeout: Duration) {
        if self
            .send(
                0,
                &Out::Close {
                    code: 200,
                    text: "bye",
                },
            )
            .is_err()
        {
            return;
        }
        let deadline = Instant::now() + timeout;
        while let Ok(Some(f)) = self.next_frame(deadline) {
            if let Frame::Method {
                method: In::CloseOk | In::Close { .. },
                ..
            } = f
            {
                return;
            }
        }
    }
}

fn unexpected(want: &str, got: &In) -> Fail {
    match got {
        In::Close { code, text, .. } | In::ChannelClose { code, text, .. } => Fail::Closed {
            code: *code,
            text: text.clone(),
        },
        m => Fail::Io(format!("expected {want}, got {m:?}")),
    }
}
