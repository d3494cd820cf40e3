//! The first bytes of a connection, read before hyper sees them: a complete HTTP/1.1 request
//! head, or the HTTP/2 client preface and the SETTINGS frame that must follow it. hyper itself
//! would wait for them without a deadline and buffer a request head of up to ~400 KiB; reading
//! them here lets the listener bound both, so a silent socket, half a preface or a slow head
//! is closed at the handshake deadline having cost at most [`MAX_REQUEST_HEAD`] bytes. What was
//! read is handed on to hyper unchanged through [`Rewound`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest HTTP/1.1 request head accepted (GitLab's webhook requests carry about 1 KiB).
pub const MAX_REQUEST_HEAD: usize = 64 << 10;
/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest HTTP/2 frame a client may send before it has seen our SETTINGS (RFC 9113
/// §4.2), and the largest any of our listeners advertises.
pub const MAX_FRAME_SIZE: usize = 16_384;
const FRAME_HEADER: usize = 9;
const TYPE_SETTINGS: u8 = 0x4;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;

/// Why a connection did not complete its handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer closed the connection first.
    #[error("closed during the handshake")]
    Closed,
    /// An HTTP/1.1 request head over [`MAX_REQUEST_HEAD`].
    #[error("request head larger than {MAX_REQUEST_HEAD} bytes")]
    HeadTooLarge,
    /// The HTTP/2 preface is wrong, or is not followed by a SETTINGS frame of a valid size.
    #[error("not an HTTP/2 client preface followed by SETTINGS")]
    BadPreface,
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What a connection may start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// HTTP/1.1 or HTTP/2 (a listener).
    Any,
    /// HTTP/2 only (the connection carried by a WebSocket).
    Http2,
}

/// Tells when the bytes read so far complete the handshake; remembers how far it has looked
/// so that a head arriving a byte at a time is scanned once, not once per byte.
#[derive(Debug)]
struct Hello {
    expect: Expect,
    scanned: usize,
}

impl Hello {
    fn complete(&mut self, buf: &[u8]) -> Result<bool, HandshakeError> {
        let n = buf.len().min(PREFACE.len());
        if buf[..n] == PREFACE[..n] {
            let Some(header) = buf.get(PREFACE.len()..PREFACE.len() + FRAME_HEADER) else {
                return Ok(false);
            };
            let len = (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
            if header[3] != TYPE_SETTINGS || len > MAX_FRAME_SIZE {
                return Err(HandshakeError::BadPreface);
            }
            return Ok(buf.len() >= PREFACE.len() + FRAME_HEADER + len);
        }
        if self.expect == Expect::Http2 {
            return Err(HandshakeError::BadPreface);
        }
        let from = self.scanned.saturating_sub(3);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(true);
        }
        self.scanned = buf.len();
        if buf.len() >= MAX_REQUEST_HEAD {
            return Err(HandshakeError::HeadTooLarge);
        }
        Ok(false)
    }
}

/// Reads from `io` until the handshake is complete and returns every byte read (which may run
/// past the handshake, e.g. into a request body). No deadline here: the caller sets one.
pub async fn read_hello<I: AsyncRead + Unpin>(io: &mut I, expect: Expect) -> Result<Bytes, HandshakeError> {
    let mut hello = Hello { expect, scanned: 0 };
    let mut buf = BytesMut::new();
    while !hello.complete(&buf)? {
        buf.reserve(READ_CHUNK);
        let mut chunk = (&mut *io).take(READ_CHUNK as u64);
        if chunk.read_buf(&mut buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
    Ok(buf.freeze())
}

/// A connection whose first bytes were already read: they are read again first.
#[derive(Debug)]
pub struct Rewound<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewound<I> {
    /// `inner`, preceded by `prefix`.
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewound<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // An emptied `Bytes` still holds its whole buffer; a connection lives for hours.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewound<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(len: usize) -> Vec<u8> {
        let mut f = PREFACE.to_vec();
        f.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, TYPE_SETTINGS, 0, 0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(0, len));
        f
    }

    fn check(expect: Expect, bytes: &[u8]) -> Result<bool, HandshakeError> {
        Hello { expect, scanned: 0 }.complete(bytes)
    }

    #[test]
    fn a_preface_is_complete_with_its_settings_frame() {
        let full = settings(12);
        for cut in 0..full.len() {
            assert!(!check(Expect::Any, &full[..cut]).unwrap(), "{cut} bytes");
        }
        assert!(check(Expect::Any, &full).unwrap());
        assert!(check(Expect::Http2, &full).unwrap());
        assert!(matches!(check(Expect::Any, &settings(MAX_FRAME_SIZE + 1)[..40]), Err(HandshakeError::BadPreface)));
        let mut not_settings = settings(0);
        not_settings[PREFACE.len() + 3] = 0x1;
        assert!(matches!(check(Expect::Any, &not_settings), Err(HandshakeError::BadPreface)));
    }

    #[test]
    fn an_http1_head_is_complete_at_its_blank_line_and_bounded() {
        assert!(!check(Expect::Any, b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\n").unwrap());
        assert!(check(Expect::Any, b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\n\r\n{\"body").unwrap());
        assert!(matches!(check(Expect::Http2, b"GET / HTTP/1.1\r\n\r\n"), Err(HandshakeError::BadPreface)));
        let huge = vec![b'a'; MAX_REQUEST_HEAD];
        assert!(matches!(check(Expect::Any, &huge), Err(HandshakeError::HeadTooLarge)));
        // A head arriving a byte at a time: the blank line is found across reads.
        let head = b"GET /healthz HTTP/1.1\r\n\r\n";
        let mut hello = Hello { expect: Expect::Any, scanned: 0 };
        let done: Vec<bool> = (1..=head.len()).map(|n| hello.complete(&head[..n]).unwrap()).collect();
        assert_eq!(done.iter().position(|d| *d), Some(head.len() - 1));
    }

    #[tokio::test]
    async fn what_was_read_is_read_again() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = server;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\nrest").await.unwrap();
        drop(client);
        let prefix = read_hello(&mut server, Expect::Any).await.unwrap();
        let mut all = Vec::new();
        Rewound::new(prefix, server).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\nrest");
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(matches!(read_hello(&mut server, Expect::Any).await, Err(HandshakeError::Closed)));
    }
}
