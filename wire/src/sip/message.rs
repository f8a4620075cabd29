//! SIP messages (RFC 3261 §7, §20, §25): parse what arrives robustly,
//! write what leaves strictly.
//!
//! Received messages may use compact header names (`v:`, `i:`, `m:`…),
//! any capitalisation, folded lines (RFC 3261 §7.3.1), bare LF line ends,
//! and several values in one header line. What we send always uses the
//! long names in their usual capitalisation, CRLF, one line per header
//! and an exact `Content-Length`.

use crate::sip::uri::Uri;
use std::fmt::{self, Write as _};

/// The largest message accepted on any transport (a UDP datagram's payload
/// limit; RFC 3261 §18.1.1 expects far less).
pub const MAX_MESSAGE: usize = 65_535;
/// At most this many header lines; a request with more is refused.
pub const MAX_HEADERS: usize = 256;

/// A method. Unknown methods are kept as they were written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    Message,
    Update,
    Info,
    Prack,
    Subscribe,
    Notify,
    Refer,
    Publish,
    Other(String),
}

impl Method {
    pub fn parse(s: &str) -> Method {
        match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "REGISTER" => Method::Register,
            "OPTIONS" => Method::Options,
            "MESSAGE" => Method::Message,
            "UPDATE" => Method::Update,
            "INFO" => Method::Info,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "REFER" => Method::Refer,
            "PUBLISH" => Method::Publish,
            other => Method::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Register => "REGISTER",
            Method::Options => "OPTIONS",
            Method::Message => "MESSAGE",
            Method::Update => "UPDATE",
            Method::Info => "INFO",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Refer => "REFER",
            Method::Publish => "PUBLISH",
            Method::Other(s) => s,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request { method: Method, uri: Uri },
    Response { code: u16, reason: String },
}

/// One header line: its canonical name and its (unfolded, trimmed) value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    pub value: String,
}

/// A header name: a well-known one in its canonical spelling, or any other
/// token as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderName(std::borrow::Cow<'static, str>);

impl HeaderName {
    pub const VIA: HeaderName = HeaderName::known("Via");
    pub const FROM: HeaderName = HeaderName::known("From");
    pub const TO: HeaderName = HeaderName::known("To");
    pub const CALL_ID: HeaderName = HeaderName::known("Call-ID");
    pub const CSEQ: HeaderName = HeaderName::known("CSeq");
    pub const CONTACT: HeaderName = HeaderName::known("Contact");
    pub const MAX_FORWARDS: HeaderName = HeaderName::known("Max-Forwards");
    pub const ROUTE: HeaderName = HeaderName::known("Route");
    pub const RECORD_ROUTE: HeaderName = HeaderName::known("Record-Route");
    pub const CONTENT_LENGTH: HeaderName = HeaderName::known("Content-Length");
    pub const CONTENT_TYPE: HeaderName = HeaderName::known("Content-Type");
    pub const EXPIRES: HeaderName = HeaderName::known("Expires");
    pub const REASON: HeaderName = HeaderName::known("Reason");
    pub const AUTHORIZATION: HeaderName = HeaderName::known("Authorization");
    pub const PROXY_AUTHORIZATION: HeaderName = HeaderName::known("Proxy-Authorization");
    pub const WWW_AUTHENTICATE: HeaderName = HeaderName::known("WWW-Authenticate");
    pub const PROXY_AUTHENTICATE: HeaderName = HeaderName::known("Proxy-Authenticate");
    pub const REQUIRE: HeaderName = HeaderName::known("Require");
    pub const SUPPORTED: HeaderName = HeaderName::known("Supported");
    pub const UNSUPPORTED: HeaderName = HeaderName::known("Unsupported");
    pub const ALLOW: HeaderName = HeaderName::known("Allow");
    pub const FLOW_TIMER: HeaderName = HeaderName::known("Flow-Timer");
    pub const RETRY_AFTER: HeaderName = HeaderName::known("Retry-After");
    pub const PATH: HeaderName = HeaderName::known("Path");
    pub const IDENTITY: HeaderName = HeaderName::known("Identity");
    pub const MIN_EXPIRES: HeaderName = HeaderName::known("Min-Expires");
    pub const SERVER: HeaderName = HeaderName::known("Server");
    pub const DATE: HeaderName = HeaderName::known("Date");

    const fn known(s: &'static str) -> HeaderName {
        HeaderName(std::borrow::Cow::Borrowed(s))
    }

    /// An extension header's name, for constants.
    pub const fn from_static(s: &'static str) -> HeaderName {
        HeaderName::known(s)
    }

    /// The canonical name for `raw`: compact forms expanded (RFC 3261
    /// §7.3.3 and later RFCs), well-known names in their usual spelling.
    pub fn from_wire(raw: &str) -> HeaderName {
        if raw.len() == 1 {
            let long = match raw.as_bytes()[0].to_ascii_lowercase() {
                b'v' => "Via",
                b'f' => "From",
                b't' => "To",
                b'i' => "Call-ID",
                b'm' => "Contact",
                b'l' => "Content-Length",
                b'c' => "Content-Type",
                b'e' => "Content-Encoding",
                b's' => "Subject",
                b'k' => "Supported",
                b'o' => "Event",
                b'r' => "Refer-To",
                b'u' => "Allow-Events",
                b'x' => "Session-Expires",
                b'y' => "Identity",
                b'b' => "Referred-By",
                b'a' => "Accept-Contact",
                b'j' => "Reject-Contact",
                b'd' => "Request-Disposition",
                _ => return HeaderName(raw.to_string().into()),
            };
            return HeaderName::known(long);
        }
        const KNOWN: &[&str] = &[
            "Via",
            "From",
            "To",
            "Call-ID",
            "CSeq",
            "Contact",
            "Max-Forwards",
            "Route",
            "Record-Route",
            "Content-Length",
            "Content-Type",
            "Expires",
            "Reason",
            "Authorization",
            "Proxy-Authorization",
            "WWW-Authenticate",
            "Proxy-Authenticate",
            "Require",
            "Proxy-Require",
            "Supported",
            "Unsupported",
            "Allow",
            "Flow-Timer",
            "Retry-After",
            "Path",
            "Identity",
            "Min-Expires",
            "User-Agent",
            "Server",
            "Date",
            "Subject",
            "Event",
            "Session-Expires",
        ];
        match KNOWN.iter().find(|k| k.eq_ignore_ascii_case(raw)) {
            Some(k) => HeaderName::known(k),
            None => HeaderName(raw.to_string().into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Header names compare without regard to case (RFC 3261 §7.3.1).
    pub fn is(&self, other: &HeaderName) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

/// A parsed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
}

/// Why a message could not be read. The text is used as the reason phrase
/// of the 400 that answers it, so it names the fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Message Too Large")]
    TooLarge,
    #[error("Incomplete Message")]
    Incomplete,
    #[error("Bad Start Line")]
    StartLine,
    #[error("Bad Request-URI")]
    RequestUri,
    #[error("Unsupported SIP Version")]
    Version,
    #[error("Bad Status Code")]
    Status,
    #[error("Bad Header Line")]
    HeaderLine,
    #[error("Too Many Headers")]
    TooManyHeaders,
    #[error("Bad Content-Length")]
    ContentLength,
    #[error("Missing {0} Header")]
    Missing(&'static str),
    #[error("Bad {0} Header")]
    Bad(&'static str),
    #[error("Method Does Not Match CSeq")]
    CSeqMethod,
    #[error("Not UTF-8")]
    Encoding,
}

/// How a byte stream (TCP, TLS) is cut into messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A CRLF keepalive (RFC 5626 §3.5.1): `n` bytes of CR/LF to discard;
    /// `ping` if it was the double CRLF that asks for a single-CRLF pong.
    Keepalive { n: usize, ping: bool },
    /// A whole message of this many bytes.
    Message(usize),
}

/// Finds the next frame at the start of `buf`; `Ok(None)` if more bytes are
/// needed. A stream needs `Content-Length` on every message (RFC 3261
/// §18.3); a header block without it, or larger than [`MAX_MESSAGE`], is an
/// error and the stream cannot be resynchronised. A reader that calls this
/// again after every read rescans the header each time; [`Framer`] does not.
pub fn frame(buf: &[u8]) -> Result<Option<Frame>, ParseError> {
    match scan(buf, 0)? {
        Scan::Frame(f) => Ok(Some(f)),
        Scan::NeedHeader | Scan::NeedBody(_) => Ok(None),
    }
}

/// [`frame`] for a stream read piece by piece: it remembers how far it
/// searched for the end of the header and, once that is found, the
/// message's length, so every byte is looked at a bounded number of times
/// (a peer dripping a 64 KiB header a byte per read costs linear time,
/// not quadratic). Call [`Framer::next`] with the whole unconsumed buffer
/// after each read, and consume what a returned frame says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framer {
    /// Bytes at the start of the buffer known to hold no header end.
    scanned: usize,
    /// The length of the message whose header is complete.
    total: Option<usize>,
}

impl Framer {
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Frame>, ParseError> {
        if let Some(total) = self.total {
            if buf.len() < total {
                return Ok(None);
            }
            *self = Framer::default();
            return Ok(Some(Frame::Message(total)));
        }
        // A header end is `\n\n` or `\n\r\n`: it may start two bytes
        // before where the last search stopped.
        match scan(buf, self.scanned.saturating_sub(2))? {
            Scan::Frame(f) => {
                *self = Framer::default();
                Ok(Some(f))
            }
            Scan::NeedHeader => {
                self.scanned = buf.len();
                Ok(None)
            }
            Scan::NeedBody(total) => {
                self.total = Some(total);
                Ok(None)
            }
        }
    }
}

enum Scan {
    Frame(Frame),
    NeedHeader,
    NeedBody(usize),
}

/// The framing of [`frame`], searching for the header end from `from`.
fn scan(buf: &[u8], from: usize) -> Result<Scan, ParseError> {
    let crlfs = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    if crlfs > 0 {
        if buf.starts_with(b"\r\n\r\n") {
            return Ok(Scan::Frame(Frame::Keepalive { n: 4, ping: true }));
        }
        if crlfs == buf.len() && crlfs < 4 && b"\r\n\r\n".starts_with(buf) {
            // Could still become a ping.
            return Ok(Scan::NeedHeader);
        }
        return Ok(Scan::Frame(Frame::Keepalive {
            n: crlfs,
            ping: false,
        }));
    }
    let Some((head_end, body_start)) = header_end_from(buf, from) else {
        if buf.len() > MAX_MESSAGE {
            return Err(ParseError::TooLarge);
        }
        return Ok(Scan::NeedHeader);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| ParseError::Encoding)?;
    let mut length = None;
    for line in head.split('\n').skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            length = Some(parse_length(value)?);
        }
    }
    let length = length.ok_or(ParseError::Missing("Content-Length"))?;
    let total = body_start + length;
    if total > MAX_MESSAGE {
        return Err(ParseError::TooLarge);
    }
    if buf.len() < total {
        return Ok(Scan::NeedBody(total));
    }
    Ok(Scan::Frame(Frame::Message(total)))
}

impl Message {
    /// Parses one whole message. On a datagram (`stream == false`) a
    /// missing `Content-Length` means the body runs to the end (RFC 3261
    /// §18.3); trailing bytes beyond `Content-Length` are ignored.
    pub fn parse(buf: &[u8]) -> Result<Message, ParseError> {
        if buf.len() > MAX_MESSAGE {
            return Err(ParseError::TooLarge);
        }
        // Leading CRLFs before a message are allowed (RFC 3261 §7.5).
        let skip = buf
            .iter()
            .take_while(|b| **b == b'\r' || **b == b'\n')
            .count();
        let buf = &buf[skip..];
        let (head_end, body_start) = header_end(buf).ok_or(ParseError::Incomplete)?;
        let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| ParseError::Encoding)?;
        let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let first = lines.next().ok_or(ParseError::StartLine)?;
        let start = parse_start_line(first)?;

        let mut headers: Vec<Header> = Vec::with_capacity(16);
        for line in lines {
            if line.is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                // Folded continuation of the previous header's value.
                let last = headers.last_mut().ok_or(ParseError::HeaderLine)?;
                if line.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                    return Err(ParseError::HeaderLine);
                }
                let more = line.trim_matches(is_lws);
                if !more.is_empty() {
                    if !last.value.is_empty() {
                        last.value.push(' ');
                    }
                    last.value.push_str(more);
                }
                continue;
            }
            let (name, value) = line.split_once(':').ok_or(ParseError::HeaderLine)?;
            // No control characters in a value but tab (§25.1 TEXT-UTF8).
            if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(ParseError::HeaderLine);
            }
            let name = name.trim_end_matches(is_lws);
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return Err(ParseError::HeaderLine);
            }
            if headers.len() == MAX_HEADERS {
                return Err(ParseError::TooManyHeaders);
            }
            headers.push(Header {
                name: HeaderName::from_wire(name),
                value: value.trim_matches(is_lws).to_string(),
            });
        }

        let rest = &buf[body_start..];
        let body = match headers
            .iter()
            .find(|h| h.name.is(&HeaderName::CONTENT_LENGTH))
        {
            Some(h) => {
                let n = parse_length(&h.value)?;
                if n > rest.len() {
                    return Err(ParseError::ContentLength);
                }
                rest[..n].to_vec()
            }
            None => rest.to_vec(),
        };
        let message = Message {
            start,
            headers,
            body,
        };
        message.check_mandatory()?;
        Ok(message)
    }

    /// RFC 3261 §8.1.1: the headers every message needs to be handled at
    /// all, and a CSeq that agrees with the method.
    fn check_mandatory(&self) -> Result<(), ParseError> {
        for (name, label) in [
            (&HeaderName::VIA, "Via"),
            (&HeaderName::FROM, "From"),
            (&HeaderName::TO, "To"),
            (&HeaderName::CALL_ID, "Call-ID"),
            (&HeaderName::CSEQ, "CSeq"),
        ] {
            if self.header(name).is_none() {
                return Err(ParseError::Missing(label));
            }
        }
        let (_, cseq_method) = self.cseq().ok_or(ParseError::Bad("CSeq"))?;
        if let StartLine::Request { method, .. } = &self.start {
            if *method != cseq_method {
                return Err(ParseError::CSeqMethod);
            }
            if let Some(mf) = self.header(&HeaderName::MAX_FORWARDS) {
                mf.parse::<u8>()
                    .map_err(|_| ParseError::Bad("Max-Forwards"))?;
            }
        }
        Ok(())
    }

    /// A new request with the usual headers in the usual order.
    pub fn request(method: Method, uri: Uri) -> Message {
        Message {
            start: StartLine::Request { method, uri },
            headers: Vec::with_capacity(12),
            body: Vec::new(),
        }
    }

    /// A response to `req` (RFC 3261 §8.2.6): its Via, From, To, Call-ID
    /// and CSeq, with `to_tag` added to To if it has none and the response
    /// is not a 100.
    pub fn response_to(req: &Message, code: u16, reason: &str, to_tag: Option<&str>) -> Message {
        let mut headers = Vec::with_capacity(8);
        for h in &req.headers {
            if h.name.is(&HeaderName::VIA)
                || h.name.is(&HeaderName::FROM)
                || h.name.is(&HeaderName::CALL_ID)
                || h.name.is(&HeaderName::CSEQ)
            {
                headers.push(h.clone());
            } else if h.name.is(&HeaderName::TO) {
                let mut value = h.value.clone();
                if code > 100 && !has_tag(&value) {
                    if let Some(tag) = to_tag {
                        value.push_str(";tag=");
                        value.push_str(tag);
                    }
                }
                headers.push(Header {
                    name: HeaderName::TO,
                    value,
                });
            }
        }
        Message {
            start: StartLine::Response {
                code,
                reason: reason.to_string(),
            },
            headers,
            body: Vec::new(),
        }
    }

    /// A UAS's response that creates or confirms a dialog (RFC 3261
    /// §12.1.1): [`Message::response_to`] plus the request's Record-Route
    /// set, in order, so in-dialog requests follow the proxies.
    pub fn dialog_response(req: &Message, code: u16, reason: &str, to_tag: &str) -> Message {
        let mut resp = Message::response_to(req, code, reason, Some(to_tag));
        for h in &req.headers {
            if h.name.is(&HeaderName::RECORD_ROUTE) {
                resp.headers.push(h.clone());
            }
        }
        resp
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn uri(&self) -> Option<&Uri> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    pub fn code(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// The first value of a header.
    pub fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.is(name))
            .map(|h| h.value.as_str())
    }

    /// Every value of a header, across lines and comma-separated lists
    /// (RFC 3261 §7.3.1), for headers whose grammar allows lists.
    pub fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
        let name = name.clone();
        self.headers
            .iter()
            .filter(move |h| h.name.is(&name))
            .flat_map(|h| split_list(&h.value))
    }

    /// Every line of a header, whole: for headers whose values contain
    /// commas but are not lists (Authorization, WWW-Authenticate…).
    pub fn lines<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
        let name = name.clone();
        self.headers
            .iter()
            .filter(move |h| h.name.is(&name))
            .map(|h| h.value.as_str())
    }

    pub fn has(&self, name: &HeaderName) -> bool {
        self.headers.iter().any(|h| h.name.is(name))
    }

    /// Appends a header line.
    pub fn push(&mut self, name: HeaderName, value: impl Into<String>) {
        self.headers.push(Header {
            name,
            value: value.into(),
        });
    }

    /// Puts a header line before all others of the same name, or at the
    /// top if there are none (how Via and Record-Route are added).
    pub fn prepend(&mut self, name: HeaderName, value: impl Into<String>) {
        let at = self
            .headers
            .iter()
            .position(|h| h.name.is(&name))
            .unwrap_or(0);
        self.headers.insert(
            at,
            Header {
                name,
                value: value.into(),
            },
        );
    }

    /// Sets a header to one value, replacing every line of it.
    pub fn set(&mut self, name: HeaderName, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter().position(|h| h.name.is(&name)) {
            Some(i) => {
                self.headers[i].value = value;
                let mut n = 0;
                self.headers.retain(|h| {
                    !h.name.is(&name) || {
                        n += 1;
                        n == 1
                    }
                });
            }
            None => self.push(name, value),
        }
    }

    pub fn remove(&mut self, name: &HeaderName) {
        self.headers.retain(|h| !h.name.is(name));
    }

    /// Removes the first value of a list header (the top Via, the first
    /// Route), returning it.
    pub fn pop_first(&mut self, name: &HeaderName) -> Option<String> {
        let i = self.headers.iter().position(|h| h.name.is(name))?;
        let values: Vec<&str> = split_list(&self.headers[i].value).collect();
        let first = values.first()?.to_string();
        if values.len() == 1 {
            self.headers.remove(i);
        } else {
            self.headers[i].value = values[1..].join(", ");
        }
        Some(first)
    }

    pub fn call_id(&self) -> &str {
        self.header(&HeaderName::CALL_ID).unwrap_or("")
    }

    /// CSeq number and method.
    pub fn cseq(&self) -> Option<(u32, Method)> {
        let v = self.header(&HeaderName::CSEQ)?;
        let mut parts = v.split_whitespace();
        let n = parts.next()?.parse().ok()?;
        let m = parts.next()?;
        if parts.next().is_some() || !m.bytes().all(is_token_byte) {
            return None;
        }
        Some((n, Method::parse(m)))
    }

    /// The `tag` parameter of From or To.
    pub fn tag(&self, name: &HeaderName) -> Option<&str> {
        tag_of(self.header(name)?)
    }

    /// Writes the message in wire form: long names, CRLF, exact
    /// Content-Length (any received one is replaced).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(512 + self.body.len());
        match &self.start {
            StartLine::Request { method, uri } => {
                let _ = write!(out, "{method} {uri} SIP/2.0\r\n");
            }
            StartLine::Response { code, reason } => {
                let _ = write!(out, "SIP/2.0 {code} {reason}\r\n");
            }
        }
        for h in &self.headers {
            if h.name.is(&HeaderName::CONTENT_LENGTH) {
                continue;
            }
            out.push_str(h.name.as_str());
            out.push_str(": ");
            out.push_str(&h.value);
            out.push_str("\r\n");
        }
        let _ = write!(out, "Content-Length: {}\r\n\r\n", self.body.len());
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// Splits a header value at top-level commas: not inside quotes or `<…>`.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut quoted, mut angle, mut escaped, mut start) = (false, false, false, 0);
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                parts.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(value[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty())
}

/// The `tag` parameter of a From/To value.
pub fn tag_of(value: &str) -> Option<&str> {
    // Parameters follow the URI, which may itself carry `;params` inside <>.
    let params = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value,
    };
    params.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("tag").then(|| v.trim())
    })
}

fn has_tag(value: &str) -> bool {
    tag_of(value).is_some()
}

fn parse_start_line(line: &str) -> Result<StartLine, ParseError> {
    if let Some(rest) = line.strip_prefix("SIP/") {
        let (version, rest) = rest.split_once(' ').ok_or(ParseError::StartLine)?;
        if version != "2.0" {
            return Err(ParseError::Version);
        }
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let code: u16 = code.parse().map_err(|_| ParseError::Status)?;
        if !(100..=699).contains(&code) {
            return Err(ParseError::Status);
        }
        return Ok(StartLine::Response {
            code,
            reason: reason.trim().to_string(),
        });
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::StartLine);
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(ParseError::StartLine);
    }
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        return Err(ParseError::Version);
    }
    let uri = Uri::parse(uri).map_err(|_| ParseError::RequestUri)?;
    Ok(StartLine::Request {
        method: Method::parse(method),
        uri,
    })
}

/// Where the header block ends: (end of the last header line, start of
/// the body). Accepts CRLFCRLF and, robustly, LFLF.
fn header_end(buf: &[u8]) -> Option<(usize, usize)> {
    header_end_from(buf, 0)
}

fn header_end_from(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, i + 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

fn parse_length(value: &str) -> Result<usize, ParseError> {
    let v = value.trim();
    if v.is_empty() || v.len() > 6 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::ContentLength);
    }
    v.parse().map_err(|_| ParseError::ContentLength)
}

/// Linear white space inside a header line (RFC 3261 §25.1): only space
/// and tab, never other Unicode spaces, so what we write reads back the
/// same.
fn is_lws(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// RFC 3261 §25.1 `token` characters.
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:+14155550123@parley.test SIP/2.0\r\n\
        Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds\r\n\
        Max-Forwards: 70\r\n\
        To: <sip:+14155550123@parley.test>\r\n\
        From: \"Alice, A.\" <sip:alice%40example.com@parley.test>;tag=1928301774\r\n\
        Call-ID: a84b4c76e66710\r\n\
        CSeq: 314159 INVITE\r\n\
        Contact: <sip:alice@10.0.0.1:5060>\r\n\
        Content-Type: application/sdp\r\n\
        Content-Length: 4\r\n\
        \r\n\
        v=0\n";

    #[test]
    fn parses_a_request_and_writes_it_back() {
        let m = Message::parse(INVITE.as_bytes()).unwrap();
        assert_eq!(m.method(), Some(&Method::Invite));
        assert_eq!(m.call_id(), "a84b4c76e66710");
        assert_eq!(m.cseq(), Some((314159, Method::Invite)));
        assert_eq!(m.tag(&HeaderName::FROM), Some("1928301774"));
        assert_eq!(m.tag(&HeaderName::TO), None);
        assert_eq!(m.body, b"v=0\n");
        let again = Message::parse(&m.to_bytes()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn compact_names_any_case_folding_and_lists() {
        let raw = "OPTIONS sip:parley.test SIP/2.0\n\
            v: SIP/2.0/TCP a.example;branch=z9hG4bK1,\n SIP/2.0/UDP b.example;branch=z9hG4bK2\n\
            VIA: SIP/2.0/UDP c.example;branch=z9hG4bK3\n\
            f: <sip:a@parley.test>;tag=x\n\
            t: <sip:b@parley.test>\n\
            i: abc\n\
            cseq: 1 OPTIONS\n\
            subject: one\n\ttwo\n\
            l: 0\n\n";
        let m = Message::parse(raw.as_bytes()).unwrap();
        let vias: Vec<_> = m.values(&HeaderName::VIA).collect();
        assert_eq!(vias.len(), 3);
        assert_eq!(vias[1], "SIP/2.0/UDP b.example;branch=z9hG4bK2");
        assert_eq!(m.call_id(), "abc");
        assert_eq!(m.header(&HeaderName::from_wire("SUBJECT")), Some("one two"));
        let out = String::from_utf8(m.to_bytes()).unwrap();
        assert!(out.contains("\r\nCall-ID: abc\r\n"), "{out}");
        assert!(out.contains("\r\nContent-Length: 0\r\n\r\n"));
    }

    /// Found by fuzzing: a value that starts on a folded line, or with a
    /// non-ASCII space, must read back as it was written.
    #[test]
    fn folded_empty_values_and_unicode_spaces_round_trip() {
        for raw in [
            "OPTIONS sip:a SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nSubject:\r\n  hello\r\n\r\n",
            "OPTIONS sip:a SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nSubject: \u{a0}hello\r\n\r\n",
        ] {
            let m = Message::parse(raw.as_bytes()).unwrap();
            let again = Message::parse(&m.to_bytes()).unwrap();
            assert_eq!(again.to_bytes(), m.to_bytes());
        }
    }

    #[test]
    fn errors_name_the_fault() {
        let no_callid = INVITE.replace("Call-ID: a84b4c76e66710\r\n", "");
        assert_eq!(
            Message::parse(no_callid.as_bytes()),
            Err(ParseError::Missing("Call-ID"))
        );
        let bad_len = INVITE.replace("Content-Length: 4", "Content-Length: 40");
        assert_eq!(
            Message::parse(bad_len.as_bytes()),
            Err(ParseError::ContentLength)
        );
        let mismatch = INVITE.replace("CSeq: 314159 INVITE", "CSeq: 314159 BYE");
        assert_eq!(
            Message::parse(mismatch.as_bytes()),
            Err(ParseError::CSeqMethod)
        );
        assert_eq!(
            Message::parse(b"INVITE sip:x SIP/3.0\r\n\r\n"),
            Err(ParseError::Version)
        );
        assert_eq!(ParseError::Missing("Via").to_string(), "Missing Via Header");
    }

    #[test]
    fn frames_a_stream() {
        let mut stream = b"\r\n\r\n".to_vec();
        stream.extend_from_slice(INVITE.as_bytes());
        assert_eq!(
            frame(&stream),
            Ok(Some(Frame::Keepalive { n: 4, ping: true }))
        );
        let rest = &stream[4..];
        assert_eq!(frame(rest), Ok(Some(Frame::Message(INVITE.len()))));
        assert_eq!(frame(&rest[..rest.len() - 1]), Ok(None));
        assert_eq!(frame(b"\r\n"), Ok(None));
        assert_eq!(
            frame(b"\r\nX"),
            Ok(Some(Frame::Keepalive { n: 2, ping: false }))
        );
        let no_len = "OPTIONS sip:a SIP/2.0\r\nVia: x\r\n\r\n";
        assert_eq!(
            frame(no_len.as_bytes()),
            Err(ParseError::Missing("Content-Length"))
        );
    }

    #[test]
    fn response_copies_the_dialog_headers() {
        let req = Message::parse(INVITE.as_bytes()).unwrap();
        let resp = Message::response_to(&req, 180, "Ringing", Some("abc"));
        assert_eq!(resp.tag(&HeaderName::TO), Some("abc"));
        assert_eq!(resp.values(&HeaderName::VIA).count(), 1);
        let trying = Message::response_to(&req, 100, "Trying", Some("abc"));
        assert_eq!(trying.tag(&HeaderName::TO), None);
    }

    #[test]
    fn header_edits() {
        let mut m = Message::parse(INVITE.as_bytes()).unwrap();
        m.prepend(HeaderName::VIA, "SIP/2.0/UDP proxy;branch=z9hG4bKp");
        assert_eq!(m.values(&HeaderName::VIA).count(), 2);
        assert_eq!(
            m.pop_first(&HeaderName::VIA).as_deref(),
            Some("SIP/2.0/UDP proxy;branch=z9hG4bKp")
        );
        m.set(HeaderName::MAX_FORWARDS, "69");
        assert_eq!(m.header(&HeaderName::MAX_FORWARDS), Some("69"));
    }

    #[test]
    fn the_framer_looks_at_each_header_byte_a_bounded_number_of_times() {
        // A 60 KiB header dripped a byte at a time: the framer resumes
        // where it stopped instead of searching from the start.
        let mut framer = Framer::default();
        let mut buf = b"OPTIONS sip:a SIP/2.0\r\nX: ".to_vec();
        for _ in 0..60_000 {
            buf.push(b'a');
            assert_eq!(framer.next(&buf), Ok(None));
            assert!(framer.scanned + 2 >= buf.len());
        }
        buf.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(framer.next(&buf), Ok(Some(Frame::Message(buf.len()))));
        assert_eq!(framer, Framer::default());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Message::parse(&bytes);
            let _ = frame(&bytes);
        }

        /// A stream cut anywhere, fed a piece at a time: the framer finds
        /// the frames `frame` finds on the whole, and the same error.
        #[test]
        fn the_framer_cuts_a_stream_as_frame_does(
            pieces in proptest::collection::vec(0usize..40, 1..40),
            body in 0usize..30,
            crlf in proptest::bool::ANY,
        ) {
            let msg = |n: usize| {
                let body = "x".repeat(n);
                let eol = if crlf { "\r\n" } else { "\n" };
                format!("MESSAGE sip:a@b SIP/2.0{eol}Call-ID: c{eol}Content-Length: {n}{eol}{eol}{body}")
            };
            let stream = format!("{}\r\n\r\n{}\r\n{}", msg(body), msg(0), msg(body + 1));
            let whole = {
                let mut out = Vec::new();
                let mut rest = stream.as_bytes();
                while let Ok(Some(f)) = frame(rest) {
                    let n = match f { Frame::Keepalive { n, .. } | Frame::Message(n) => n };
                    out.push(f);
                    rest = &rest[n..];
                }
                out
            };
            let mut got = Vec::new();
            let mut framer = Framer::default();
            let mut buf: Vec<u8> = Vec::new();
            let mut fed = 0;
            let mut cuts = pieces.into_iter().cycle();
            while fed < stream.len() {
                let n = cuts.next().unwrap_or(1).max(1).min(stream.len() - fed);
                buf.extend_from_slice(&stream.as_bytes()[fed..fed + n]);
                fed += n;
                while let Ok(Some(f)) = framer.next(&buf) {
                    let n = match f { Frame::Keepalive { n, .. } | Frame::Message(n) => n };
                    got.push(f);
                    buf.drain(..n);
                }
            }
            proptest::prop_assert_eq!(got, whole);
        }

        #[test]
        fn never_panics_on_mutated_messages(at in 0usize..INVITE.len(), b in proptest::num::u8::ANY) {
            let mut bytes = INVITE.as_bytes().to_vec();
            bytes[at] = b;
            if let Ok(m) = Message::parse(&bytes) {
                // What we write reads back and writes the same again.
                let again = Message::parse(&m.to_bytes()).unwrap();
                proptest::prop_assert_eq!(again.to_bytes(), m.to_bytes());
            }
        }
    }
}
