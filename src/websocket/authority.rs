//! Rewriting HTTP/2 request headers on the wire.
//!
//! agentk, speaking gRPC through a WebSocket, sends every request with an `:authority` such as
//! `wss:%2F%2Fgitlab.example.com%2F-%2Fkubernetes-agent%2F` (its percent-encoded kas URL). That is
//! not a valid authority, and Rust's `h2` resets such a stream with PROTOCOL_ERROR. So the bytes
//! coming out of the WebSocket pass through a [`FrameRewriter`] before `h2` sees them: it keeps
//! HTTP/2 framing intact, decodes each header block with its own HPACK decoder (which tracks the
//! client's dynamic table), lets a function fix the headers, and re-encodes them with its own
//! HPACK encoder, whose table is the one the server's decoder follows. Every other frame passes
//! through untouched, so flow control and ordering are unaffected.
//!
//! The rewriter runs before anyone has authenticated, so it holds what it is fed to
//! [`Limits`]: no frame larger than the maximum frame size is waited for, a header block may
//! span few CONTINUATION frames and few bytes, and decoding keeps no more than the maximum
//! header list, counted as it decodes (a 4 KiB dynamic-table entry referenced thousands of
//! times costs one byte per reference on the wire, and must not cost 4 KiB each here).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listener::{HTTP2_MAX_FRAME, HTTP2_MAX_HEADER_LIST};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE: re-encoded blocks are split into frames no larger.
const MAX_FRAME_OUT: usize = 16_384;
/// The default SETTINGS_HEADER_TABLE_SIZE, which both sides of each HPACK context use.
const HEADER_TABLE_SIZE: usize = 4096;
/// What RFC 7541 §4.1 adds to each field's name and value when sizing a header list.
const FIELD_OVERHEAD: usize = 32;

/// Decoded headers, as name and value bytes.
pub type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

/// What one connection's header blocks may cost; past any bound the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame: usize,
    /// Largest decoded header list, in RFC 7541 sizes (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list: usize,
    /// Largest encoded header block: a HEADERS fragment and its CONTINUATIONs together.
    pub max_block: usize,
    /// Most CONTINUATION frames after one HEADERS frame.
    pub max_continuations: usize,
}

impl Default for Limits {
    /// The limits of the plain listeners. An encoded block is never much larger than the list
    /// it decodes to (each field costs 32 bytes in the list and a few on the wire), so twice
    /// the list bounds every valid one; two frames carry it, and h2 allows at least five.
    fn default() -> Self {
        Self {
            max_frame: HTTP2_MAX_FRAME,
            max_header_list: HTTP2_MAX_HEADER_LIST,
            max_block: 2 * HTTP2_MAX_HEADER_LIST,
            max_continuations: 8,
        }
    }
}

struct Block {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
    continuations: usize,
}

/// Transforms the client-to-server bytes of an HTTP/2 connection, rewriting header blocks.
pub struct FrameRewriter<F> {
    preface_left: usize,
    buf: BytesMut,
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    rewrite: F,
    limits: Limits,
}

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl<F: FnMut(&mut HeaderList)> FrameRewriter<F> {
    /// A rewriter applying `rewrite` to every header block, starting at the client preface,
    /// within the plain listeners' [`Limits`].
    pub fn new(rewrite: F) -> Self {
        Self::with_limits(rewrite, Limits::default())
    }

    /// A rewriter within other limits.
    pub fn with_limits(rewrite: F, limits: Limits) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            preface_left: PREFACE.len(),
            buf: BytesMut::new(),
            block: None,
            decoder,
            encoder: Encoder::new(),
            rewrite,
            limits,
        }
    }

    /// Consumes `input`, appending to `out` every complete frame (rewritten where needed).
    /// Bytes of an incomplete frame wait for the next call.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        self.buf.extend_from_slice(input);
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.buf.len());
            let expected = &PREFACE[PREFACE.len() - self.preface_left..][..n];
            if &self.buf[..n] != expected {
                return Err(protocol_error("not an HTTP/2 client preface"));
            }
            out.extend_from_slice(&self.buf.split_to(n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while self.buf.len() >= FRAME_HEADER {
            let len = (usize::from(self.buf[0]) << 16) | (usize::from(self.buf[1]) << 8) | usize::from(self.buf[2]);
            // Refused before its payload is waited for: the payload would be buffered here.
            if len > self.limits.max_frame {
                return Err(protocol_error("frame larger than the maximum frame size"));
            }
            if self.buf.len() < FRAME_HEADER + len {
                break;
            }
            let kind = self.buf[3];
            let flags = self.buf[4];
            let stream_id = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]) & 0x7fff_ffff;
            let frame = self.buf.split_to(FRAME_HEADER + len);
            let payload = &frame[FRAME_HEADER..];
            match (kind, self.block.as_mut()) {
                (TYPE_HEADERS, None) => {
                    let fragment = headers_fragment(flags, payload)?;
                    if fragment.len() > self.limits.max_block {
                        return Err(protocol_error("header block too large"));
                    }
                    let block = Block {
                        stream_id,
                        end_stream: flags & FLAG_END_STREAM != 0,
                        fragment: fragment.to_vec(),
                        continuations: 0,
                    };
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish(block, out)?;
                    } else {
                        self.block = Some(block);
                    }
                }
                (TYPE_CONTINUATION, Some(block)) if block.stream_id == stream_id => {
                    block.continuations += 1;
                    if block.continuations > self.limits.max_continuations {
                        return Err(protocol_error("too many CONTINUATION frames"));
                    }
                    if block.fragment.len() + payload.len() > self.limits.max_block {
                        return Err(protocol_error("header block too large"));
                    }
                    block.fragment.extend_from_slice(payload);
                    if flags & FLAG_END_HEADERS != 0 {
                        let block = self.block.take().expect("checked above");
                        self.finish(block, out)?;
                    }
                }
                (_, Some(_)) => return Err(protocol_error("a header block was interrupted by another frame")),
                _ => out.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    /// Decodes a block, keeping at most the maximum header list. The decoder cannot be stopped
    /// from its callback, so past the limit the callback keeps nothing: what the rest costs is
    /// bounded by the encoded block, not by what it would expand to.
    fn decode(&mut self, fragment: &[u8]) -> io::Result<HeaderList> {
        let limit = self.limits.max_header_list;
        let (mut headers, mut size, mut over) = (HeaderList::new(), 0usize, false);
        self.decoder
            .decode_with_cb(fragment, |name, value| {
                if over {
                    return;
                }
                size += name.len() + value.len() + FIELD_OVERHEAD;
                if size > limit {
                    over = true;
                    return;
                }
                headers.push((name.into_owned(), value.into_owned()));
            })
            .map_err(|e| protocol_error(format!("HPACK: {e:?}")))?;
        if over {
            return Err(protocol_error(format!("header list larger than {limit} bytes")));
        }
        Ok(headers)
    }

    fn finish(&mut self, block: Block, out: &mut Vec<u8>) -> io::Result<()> {
        let mut headers = self.decode(&block.fragment)?;
        (self.rewrite)(&mut headers);
        let encoded = self.encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut chunks = encoded.chunks(MAX_FRAME_OUT).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let kind = if first { TYPE_HEADERS } else { TYPE_CONTINUATION };
            let mut flags = if last { FLAG_END_HEADERS } else { 0 };
            if first && block.end_stream {
                flags |= FLAG_END_STREAM;
            }
            let len = chunk.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            out.extend_from_slice(&block.stream_id.to_be_bytes());
            out.extend_from_slice(chunk);
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// The header block fragment of a HEADERS payload, without padding and priority fields
/// (priority is advisory and deprecated; it is dropped with its flag).
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    let mut body = payload;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        let (&p, rest) = body.split_first().ok_or_else(|| protocol_error("PADDED HEADERS without a pad length"))?;
        pad = usize::from(p);
        body = rest;
    }
    if flags & FLAG_PRIORITY != 0 {
        body = body.get(5..).ok_or_else(|| protocol_error("PRIORITY HEADERS too short"))?;
    }
    body.get(..body.len().checked_sub(pad).ok_or_else(|| protocol_error("padding longer than the frame"))?)
        .ok_or_else(|| protocol_error("bad padding"))
}

/// Sets an `:authority` that `h2` would refuse to `fallback`; leaves valid ones alone.
pub fn fix_authority(fallback: String) -> impl FnMut(&mut HeaderList) + Send + 'static {
    move |headers| {
        for (name, value) in headers.iter_mut() {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = fallback.clone().into_bytes();
            }
        }
    }
}

/// Sets `:authority` to `value`, whatever it was (a client that must send exactly what agentk
/// sends uses this).
pub fn set_authority(value: String) -> impl FnMut(&mut HeaderList) + Send + 'static {
    move |headers| {
        for (name, v) in headers.iter_mut() {
            if name == b":authority" {
                *v = value.clone().into_bytes();
            }
        }
    }
}

/// A connection whose incoming bytes are rewritten (the server side).
pub struct RewriteReads<S, F> {
    inner: S,
    rewriter: FrameRewriter<F>,
    out: Vec<u8>,
    pos: usize,
    scratch: Box<[u8]>,
}

impl<S, F: FnMut(&mut HeaderList)> RewriteReads<S, F> {
    /// Wraps `inner`.
    pub fn new(inner: S, rewrite: F) -> Self {
        Self {
            inner,
            rewriter: FrameRewriter::new(rewrite),
            out: Vec::new(),
            pos: 0,
            scratch: vec![0; 16 * 1024].into(),
        }
    }
}

impl<S: AsyncRead + Unpin, F: FnMut(&mut HeaderList) + Unpin> AsyncRead for RewriteReads<S, F> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.out.len() {
                let n = (this.out.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.out[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            this.out.clear();
            this.pos = 0;
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.rewriter.feed(read.filled(), &mut this.out)?;
        }
    }
}

impl<S: AsyncWrite + Unpin, F: Unpin> AsyncWrite for RewriteReads<S, F> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection whose outgoing bytes are rewritten (the client side).
pub struct RewriteWrites<S, F> {
    inner: S,
    rewriter: FrameRewriter<F>,
    pending: BytesMut,
}

impl<S, F: FnMut(&mut HeaderList)> RewriteWrites<S, F> {
    /// Wraps `inner`.
    pub fn new(inner: S, rewrite: F) -> Self {
        Self { inner, rewriter: FrameRewriter::new(rewrite), pending: BytesMut::new() }
    }
}

impl<S: AsyncWrite + Unpin, F> RewriteWrites<S, F> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin, F: Unpin> AsyncRead for RewriteWrites<S, F> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, F: FnMut(&mut HeaderList) + Unpin> AsyncWrite for RewriteWrites<S, F> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let mut out = Vec::with_capacity(buf.len());
        this.rewriter.feed(buf, &mut out)?;
        this.pending.extend_from_slice(&out);
        // Best effort now; flush finishes it.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENTK_AUTHORITY: &str = "wss:%2F%2Fgitlab.example.com%2F-%2Fkubernetes-agent%2F";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn request(enc: &mut Encoder<'static>, authority: &str) -> Vec<u8> {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/gitlab.agent.flux.rpc.GitLabFlux/ReconcileProjects"),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
        ];
        enc.encode(headers)
    }

    /// Decodes every header block in `bytes` (after the preface) with a fresh decoder, as the
    /// server does.
    fn server_view(bytes: &[u8]) -> Vec<HeaderList> {
        let mut decoder = Decoder::new();
        let mut rest = &bytes[PREFACE.len()..];
        let mut blocks = Vec::new();
        let mut current = Vec::new();
        while rest.len() >= 9 {
            let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[9..9 + len];
            if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                current.extend_from_slice(payload);
                if flags & FLAG_END_HEADERS != 0 {
                    blocks.push(decoder.decode(&current).unwrap());
                    current.clear();
                }
            }
            rest = &rest[9 + len..];
        }
        blocks
    }

    fn authority_of(h: &HeaderList) -> String {
        String::from_utf8(h.iter().find(|(n, _)| n == b":authority").unwrap().1.clone()).unwrap()
    }

    #[test]
    fn rewrites_the_agentk_authority_across_split_reads_and_keeps_hpack_state() {
        let mut client = Encoder::new();
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // Two requests on streams 1 and 3: the second uses the client's dynamic table.
        wire.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &request(&mut client, AGENTK_AUTHORITY)));
        wire.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        let second = request(&mut client, AGENTK_AUTHORITY);
        let (a, b) = second.split_at(3);
        wire.extend(frame(TYPE_HEADERS, 0, 3, a));
        wire.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));
        let mut rewriter = FrameRewriter::new(fix_authority("kas.example".into()));
        let mut out = Vec::new();
        for byte in wire.chunks(7) {
            rewriter.feed(byte, &mut out).unwrap();
        }
        let blocks = server_view(&out);
        assert_eq!(blocks.len(), 2);
        for b in &blocks {
            assert_eq!(authority_of(b), "kas.example");
            assert!(b.iter().any(|(n, v)| n == b":path" && v.starts_with(b"/gitlab.agent")));
        }
        // The DATA frame passed through byte for byte.
        assert!(out.windows(14).any(|w| w == frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0").as_slice()));
    }

    #[test]
    fn valid_authorities_are_kept_and_padding_and_priority_are_handled() {
        let mut client = Encoder::new();
        let block = request(&mut client, "kas.internal:8150");
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 1, 16]); // priority: dependency 1, weight 16
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM | FLAG_PADDED | FLAG_PRIORITY, 5, &payload));
        let mut out = Vec::new();
        FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut out).unwrap();
        let blocks = server_view(&out);
        assert_eq!(authority_of(&blocks[0]), "kas.internal:8150");
        assert_eq!(out[PREFACE.len() + 4], FLAG_END_HEADERS | FLAG_END_STREAM, "padding and priority are gone");
    }

    #[test]
    fn refuses_what_is_not_http2() {
        let mut out = Vec::new();
        assert!(
            FrameRewriter::new(fix_authority("x".into())).feed(b"GET / HTTP/1.1\r\n\r\nxxxxxxxx", &mut out).is_err()
        );
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        wire.extend(frame(0x0, 0, 1, b"x"));
        assert!(FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut out).is_err(), "interrupted block");
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let mut client = Encoder::new();
        let big = "v".repeat(40_000);
        let block =
            client.encode(vec![(&b":authority"[..], AGENTK_AUTHORITY.as_bytes()), (&b"x-big"[..], big.as_bytes())]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let mut out = Vec::new();
        let roomy = Limits { max_frame: 1 << 16, max_header_list: 1 << 16, max_block: 1 << 16, max_continuations: 8 };
        FrameRewriter::with_limits(set_authority("a".into()), roomy).feed(&wire, &mut out).unwrap();
        let blocks = server_view(&out);
        assert_eq!(authority_of(&blocks[0]), "a");
        assert_eq!(blocks[0].iter().find(|(n, _)| n == b"x-big").unwrap().1.len(), 40_000);
        let mut rest = &out[PREFACE.len()..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            frames.push((rest[3], len));
            rest = &rest[9 + len..];
        }
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert_eq!(frames[0].0, TYPE_HEADERS);
        assert!(frames[1..].iter().all(|(kind, _)| *kind == TYPE_CONTINUATION));
        assert!(frames.iter().all(|(_, len)| *len <= MAX_FRAME_OUT));
    }

    /// A 4,000-byte dynamic-table entry, then `refs` one-byte references to it.
    fn bomb(refs: usize) -> Vec<u8> {
        let mut block = Encoder::new().encode(vec![(&b"x-bomb"[..], &[b'b'; 4000][..])]);
        block.extend(std::iter::repeat_n(0x80 | 62, refs)); // indexed: the newest dynamic entry
        block
    }

    #[test]
    fn an_hpack_bomb_is_refused_once_the_decoded_list_passes_the_limit() {
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &bomb(12_000)));
        let mut out = Vec::new();
        let err = FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut out).unwrap_err();
        assert!(err.to_string().contains("header list larger than 16384"), "{err}");
        // Three references (four fields of ~4 KiB) stay under 16 KiB and pass.
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &bomb(3)));
        let mut out = Vec::new();
        FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut out).unwrap();
        assert_eq!(server_view(&out)[0].len(), 4);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &bomb(4)));
        assert!(FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut Vec::new()).is_err());
    }

    #[test]
    fn frames_blocks_and_continuations_are_bounded() {
        // A frame header announcing 1 MiB is refused before any of its payload arrives.
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&[0x10, 0, 0, TYPE_HEADERS, 0, 0, 0, 0, 1]);
        let err = FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("maximum frame size"), "{err}");
        // Empty CONTINUATIONs cost nothing to send; there may be only a few.
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        for _ in 0..9 {
            wire.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
        }
        let err = FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("CONTINUATION"), "{err}");
        // Full CONTINUATIONs: the block stops at twice the header list.
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        for _ in 0..3 {
            wire.extend(frame(TYPE_CONTINUATION, 0, 1, &[0x82; 16_000]));
        }
        let err = FrameRewriter::new(fix_authority("x".into())).feed(&wire, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("header block too large"), "{err}");
    }
}
