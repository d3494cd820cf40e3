//! Fuzzes the WebSocket → HTTP/2 `:authority` rewriter with one connection's client bytes, as
//! they come out of agentk's WebSocket. An input starting with `P` is that byte stream as it is;
//! any other input is a list of frame records (`type, flags, stream, length:2, payload`) that the
//! target assembles after the preface, so that lengths always match and mutations land inside
//! frames rather than breaking the framing. Nothing authenticates these bytes, so:
//! - no panic, and the result does not depend on how the bytes were split into reads;
//! - a header block whose decoded list is larger than `MAX_DECODED` is refused (an error ends the
//!   connection), never expanded: a 4 KiB dynamic-table entry referenced once per input byte
//!   must not turn into 4 KiB of memory per byte;
//! - when the input is a valid HTTP/2 client stream, so is the output: the same frames in the
//!   same order, every other frame byte for byte, every header block decoding (fresh HPACK
//!   decoder, as the server's) to the input's headers with an unusable `:authority` replaced.
#![no_main]

use std::borrow::Cow;

use kas::websocket::authority::{FrameRewriter, HeaderList, fix_authority};
use libfuzzer_sys::fuzz_target;
use loona_hpack::Decoder;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE as long as nobody raised it (kas's server never does).
const MAX_FRAME: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE both sides start with.
const TABLE_SIZE: usize = 4096;
/// Largest decoded header list (RFC 7541 size: name + value + 32 per field) the rewriter may
/// pass on. The plain HTTP/2 listener allows 16 KiB; four times that leaves room for how a fix
/// counts, and is still passed by only 16 references to a 4 KiB dynamic-table entry.
const MAX_DECODED: usize = 64 * 1024;
/// What the server gives requests whose own authority is unusable.
const FALLBACK: &str = "kas";

/// What a stream is made of, as the server sees it.
#[derive(Debug, PartialEq)]
enum Event {
    /// Any frame that is not part of a header block, byte for byte.
    Frame(Vec<u8>),
    /// A complete header block.
    Block { stream: u32, end_stream: bool, headers: HeaderList },
}

/// Where reading a stream stopped.
#[derive(Debug, PartialEq)]
enum Stop {
    /// At the end of the complete frames (a partial frame or open block may follow).
    End,
    /// At something a client may not send (or this check does not follow).
    Invalid,
    /// At a header block whose decoded list exceeds `MAX_DECODED`.
    TooLarge,
}

/// Reads a client stream: the events up to the first frame that is invalid or too large.
fn read(bytes: &[u8]) -> (Vec<Event>, Stop) {
    let mut events = Vec::new();
    let Some(mut rest) = bytes.strip_prefix(PREFACE) else {
        return (events, if PREFACE.starts_with(bytes) { Stop::End } else { Stop::Invalid });
    };
    let mut decoder = Decoder::new();
    decoder.set_max_allowed_table_size(TABLE_SIZE);
    // (stream, end_stream, fragment) of a block waiting for CONTINUATION frames.
    let mut open: Option<(u32, bool, Vec<u8>)> = None;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        if len > MAX_FRAME {
            return (events, Stop::Invalid);
        }
        if rest.len() < 9 + len {
            break;
        }
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        let (frame, payload) = (&rest[..9 + len], &rest[9..9 + len]);
        rest = &rest[9 + len..];
        let block = match (kind, open.take()) {
            (HEADERS, None) if stream != 0 => {
                let Some(fragment) = fragment(flags, payload) else { return (events, Stop::Invalid) };
                (stream, flags & END_STREAM != 0, fragment.to_vec())
            }
            (CONTINUATION, Some((s, end, mut fragment))) if s == stream => {
                fragment.extend_from_slice(payload);
                (s, end, fragment)
            }
            (HEADERS | CONTINUATION, _) | (_, Some(_)) => return (events, Stop::Invalid),
            _ => {
                events.push(Event::Frame(frame.to_vec()));
                continue;
            }
        };
        if flags & END_HEADERS == 0 {
            open = Some(block);
            continue;
        }
        let (stream, end_stream, fragment) = block;
        match decode(&mut decoder, &fragment) {
            Ok(headers) => events.push(Event::Block { stream, end_stream, headers }),
            Err(stop) => return (events, stop),
        }
    }
    (events, Stop::End)
}

/// The header block fragment of a HEADERS payload, or `None` when padding or priority do not fit.
fn fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&p, rest) = body.split_first()?;
        pad = usize::from(p);
        body = rest;
    }
    if flags & PRIORITY != 0 {
        body = body.get(5..)?;
    }
    body.get(..body.len().checked_sub(pad)?)
}

/// Decodes one block, measuring before keeping anything, so this check never holds more than
/// `MAX_DECODED` itself.
fn decode(decoder: &mut Decoder<'static>, fragment: &[u8]) -> Result<HeaderList, Stop> {
    let mut size = 0usize;
    let mut headers = Vec::new();
    decoder
        .decode_with_cb(fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= MAX_DECODED {
                headers.push((name.into_owned(), value.into_owned()));
            }
        })
        .map_err(|_| Stop::Invalid)?;
    if size > MAX_DECODED { Err(Stop::TooLarge) } else { Ok(headers) }
}

/// Runs the rewriter over `input` in reads of `chunk` bytes (all at once when 0).
fn rewrite(input: &[u8], chunk: usize) -> (Vec<u8>, bool) {
    let mut rewriter = FrameRewriter::new(fix_authority(FALLBACK.into()));
    let mut out = Vec::new();
    let chunk = if chunk == 0 { input.len().max(1) } else { chunk };
    for piece in input.chunks(chunk) {
        if rewriter.feed(piece, &mut out).is_err() {
            return (out, false);
        }
    }
    (out, true)
}

/// The byte stream an input stands for: itself, or its frame records assembled.
fn connection(data: &[u8]) -> Cow<'_, [u8]> {
    if data.first() == Some(&b'P') {
        return Cow::Borrowed(data);
    }
    let mut wire = PREFACE.to_vec();
    let mut rest = data;
    while let [kind, flags, stream, hi, lo, tail @ ..] = rest {
        let len = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
        wire.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, *kind, *flags, 0, 0, 0, *stream]);
        wire.extend_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    Cow::Owned(wire)
}

fuzz_target!(|input: &[u8]| {
    let data = &*connection(input);
    let (whole, whole_ok) = rewrite(data, 0);
    // Split into small reads: the split point must never matter.
    let chunk = usize::from(data.len() % 13) + 1;
    let (split, split_ok) = rewrite(data, chunk);
    assert_eq!(whole_ok, split_ok, "the result depends on how the bytes were split");
    if whole_ok {
        assert_eq!(whole, split, "the output depends on how the bytes were split");
    }

    let (input_events, input_stop) = read(data);
    let (output_events, output_stop) = read(&whole);
    for event in &output_events {
        if let Event::Block { headers, .. } = event {
            for (name, value) in headers {
                if name == b":authority" {
                    assert!(http::uri::Authority::try_from(value.as_slice()).is_ok(), "unusable :authority passed on");
                }
            }
        }
    }
    if input_stop == Stop::TooLarge {
        assert!(!whole_ok, "a header block decoding to more than {MAX_DECODED} bytes was passed on");
    }
    // What the valid part of the input became: the same events, header blocks rewritten.
    let mut fixer = fix_authority(FALLBACK.into());
    let expected: Vec<Event> = input_events
        .into_iter()
        .map(|e| match e {
            Event::Block { stream, end_stream, mut headers } => {
                fixer(&mut headers);
                Event::Block { stream, end_stream, headers }
            }
            frame => frame,
        })
        .collect();
    let n = expected.len().min(output_events.len());
    assert_eq!(expected[..n], output_events[..n], "the rewriter changed what it should have kept");
    if whole_ok && input_stop == Stop::End {
        assert_eq!(output_stop, Stop::End, "a valid stream became an invalid one");
        assert_eq!(expected.len(), output_events.len(), "frames were lost or added");
    }
});
