//! SIP and SIPS URIs (RFC 3261 §19.1) and name-addr values (§20.10, as in
//! From, To, Contact, Route and Record-Route).
//!
//! A handle's address-of-record is `sip:<handle>@<domain>`: an E.164
//! number as is (`sip:+14155550123@parley.example`, optionally with
//! `;user=phone`), an email address with its `@` escaped as `%40`
//! (`sip:alice%40example.com@parley.example`).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Sip,
    Sips,
}

/// A `sip:` or `sips:` URI. The user part is kept as written (escaped);
/// [`Uri::user_unescaped`] decodes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Uri {
    pub scheme: Scheme,
    pub user: Option<String>,
    /// Host name, IPv4 address, or IPv6 address without brackets.
    pub host: String,
    pub port: Option<u16>,
    /// `;name[=value]` parameters in order.
    pub params: Vec<(String, Option<String>)>,
    /// `?headers`, kept as written.
    pub headers: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("unsupported URI scheme")]
    Scheme,
    #[error("malformed URI")]
    Syntax,
}

impl Uri {
    pub fn parse(s: &str) -> Result<Uri, UriError> {
        let (scheme, rest) = s.split_once(':').ok_or(UriError::Syntax)?;
        let scheme = if scheme.eq_ignore_ascii_case("sip") {
            Scheme::Sip
        } else if scheme.eq_ignore_ascii_case("sips") {
            Scheme::Sips
        } else if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(UriError::Scheme);
        } else {
            return Err(UriError::Syntax);
        };
        let (rest, headers) = match rest.split_once('?') {
            Some((r, h)) => (r, Some(h.to_string())),
            None => (rest, None),
        };
        // The user part may contain ';' (user params) but never an unescaped
        // '@' other than the separator, so the last '@' splits.
        let (user, hostpart) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        if let Some(u) = user {
            if u.is_empty()
                || u.bytes()
                    .any(|b| b <= b' ' || b == b'<' || b == b'>' || b == b'"')
            {
                return Err(UriError::Syntax);
            }
        }
        let mut parts = hostpart.split(';');
        let hostport = parts.next().ok_or(UriError::Syntax)?;
        let (host, port) = split_hostport(hostport)?;
        let mut params = Vec::new();
        for p in parts {
            if p.is_empty() {
                return Err(UriError::Syntax);
            }
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (p, None),
            };
            if k.is_empty() || !k.bytes().all(is_param_byte) {
                return Err(UriError::Syntax);
            }
            if let Some(v) = &v {
                if !v
                    .bytes()
                    .all(|b| is_param_byte(b) || b == b'[' || b == b']' || b == b':')
                {
                    return Err(UriError::Syntax);
                }
            }
            params.push((k.to_ascii_lowercase(), v));
        }
        Ok(Uri {
            scheme,
            user: user.map(str::to_string),
            host,
            port,
            params,
            headers,
        })
    }

    /// A `sip:` URI for a host and port with no user.
    pub fn host_port(host: &str, port: Option<u16>) -> Uri {
        Uri {
            scheme: Scheme::Sip,
            user: None,
            host: host.to_string(),
            port,
            params: Vec::new(),
            headers: None,
        }
    }

    /// The user part with `%XX` escapes decoded.
    pub fn user_unescaped(&self) -> Option<String> {
        self.user.as_deref().map(unescape)
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    pub fn has_param(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        self.params.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.params
            .push((name.to_string(), value.map(str::to_string)));
    }

    /// `transport` parameter, lower-cased.
    pub fn transport(&self) -> Option<String> {
        self.param("transport")
            .flatten()
            .map(|t| t.to_ascii_lowercase())
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.scheme {
            Scheme::Sip => "sip:",
            Scheme::Sips => "sips:",
        })?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        write_hostport(f, &self.host, self.port)?;
        write_params(f, &self.params)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

/// `"Display" <uri>;params` or `uri;params`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    pub uri: Uri,
    /// Header parameters (after the URI), names lower-cased.
    pub params: Vec<(String, Option<String>)>,
}

impl NameAddr {
    pub fn parse(s: &str) -> Result<NameAddr, UriError> {
        let s = s.trim();
        let (display, uri, params) = if let Some(open) = find_unquoted(s, '<') {
            let close = s[open..].find('>').ok_or(UriError::Syntax)? + open;
            let display = s[..open].trim();
            let display = (!display.is_empty()).then(|| display.to_string());
            (display, &s[open + 1..close], &s[close + 1..])
        } else {
            // addr-spec form: parameters after the URI belong to the header
            // (RFC 3261 §20.10), so the URI has none.
            match s.find(';') {
                Some(i) => (None, &s[..i], &s[i..]),
                None => (None, s, ""),
            }
        };
        let uri = Uri::parse(uri.trim())?;
        let mut out = Vec::new();
        for p in params.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
                None => (p, None),
            };
            if k.is_empty() {
                return Err(UriError::Syntax);
            }
            out.push((k.to_ascii_lowercase(), v));
        }
        Ok(NameAddr {
            display,
            uri,
            params: out,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        self.params.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.params
            .push((name.to_string(), value.map(str::to_string)));
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "{d} ")?;
        }
        write!(f, "<{}>", self.uri)?;
        write_params(f, &self.params)?;
        Ok(())
    }
}

/// Writes `host[:port]`, an IPv6 host in brackets.
pub fn write_hostport(f: &mut fmt::Formatter<'_>, host: &str, port: Option<u16>) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]")?;
    } else {
        f.write_str(host)?;
    }
    match port {
        Some(p) => write!(f, ":{p}"),
        None => Ok(()),
    }
}

/// Writes `;name[=value]` for each parameter.
pub fn write_params(
    f: &mut fmt::Formatter<'_>,
    params: &[(String, Option<String>)],
) -> fmt::Result {
    for (k, v) in params {
        match v {
            Some(v) => write!(f, ";{k}={v}")?,
            None => write!(f, ";{k}")?,
        }
    }
    Ok(())
}

/// Decodes `%XX` escapes; invalid escapes are kept as written.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes what may not appear in a URI's user part (RFC 3261 §25.1
/// `user`): here, for handles, `@` and anything outside the unreserved and
/// user-unreserved sets.
pub fn escape_user(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn split_hostport(s: &str) -> Result<(String, Option<u16>), UriError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(UriError::Syntax)?;
        h.parse::<std::net::Ipv6Addr>()
            .map_err(|_| UriError::Syntax)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(UriError::Syntax)?),
        };
        (h, port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
    {
        return Err(UriError::Syntax);
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().map_err(|_| UriError::Syntax)?),
        None => None,
    };
    Ok((host.to_ascii_lowercase(), port))
}

fn is_param_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.!~*'()%&+$/:[]".contains(&b)
}

fn find_unquoted(s: &str, c: char) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, ch) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if ch == '\\' && quoted {
            escaped = true;
        } else if ch == '"' {
            quoted = !quoted;
        } else if ch == c && !quoted {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_back() {
        for s in [
            "sip:+14155550123@parley.test;user=phone",
            "sip:alice%40example.com@parley.test",
            "sips:bob@[2001:db8::1]:5061;transport=tcp;lr",
            "sip:127.0.0.1:5060",
            "sip:carol@10.0.0.1?Subject=hi",
        ] {
            let u = Uri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
        }
        let u = Uri::parse("sip:alice%40example.com@Parley.Test:5070").unwrap();
        assert_eq!(u.user_unescaped().as_deref(), Some("alice@example.com"));
        assert_eq!(u.host, "parley.test");
        assert_eq!(u.port, Some(5070));
        assert_eq!(Uri::parse("tel:+1555"), Err(UriError::Scheme));
        assert_eq!(Uri::parse("sip:@x"), Err(UriError::Syntax));
        assert_eq!(Uri::parse("sip:a@x:99999"), Err(UriError::Syntax));
        assert_eq!(escape_user("alice@example.com"), "alice%40example.com");
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse("\"Alice <A>\" <sip:alice@a.test;transport=tcp>;tag=12;expires=60")
            .unwrap();
        assert_eq!(n.display.as_deref(), Some("\"Alice <A>\""));
        assert_eq!(n.uri.transport().as_deref(), Some("tcp"));
        assert_eq!(n.param("tag"), Some(Some("12")));
        let bare = NameAddr::parse("sip:bob@b.test;tag=9").unwrap();
        assert!(bare.uri.params.is_empty());
        assert_eq!(bare.param("tag"), Some(Some("9")));
        let c = NameAddr::parse(
            "<sip:x@10.0.0.2:5060;pn-provider=parley;pn-prid=abc>;+sip.instance=\"<urn:uuid:1>\";reg-id=1",
        )
        .unwrap();
        assert_eq!(c.uri.param("pn-prid"), Some(Some("abc")));
        assert_eq!(c.param("+sip.instance"), Some(Some("\"<urn:uuid:1>\"")));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = Uri::parse(&s);
            let _ = NameAddr::parse(&s);
            let _ = unescape(&s);
        }
    }
}
