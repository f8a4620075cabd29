//! A far end's SDP in the form the media engine reads.
//!
//! str0m speaks WebRTC's dialect: every m-line has an `a=mid` and the
//! session bundles them (`a=group:BUNDLE`, RFC 9143). SIP phones such as
//! baresip write neither. With a single active media stream that
//! multiplexes RTCP (RFC 5761 `a=rtcp-mux`), bundling or not is the same
//! transport, so such an SDP is given mids and a one-stream group here
//! and means exactly what it said. More than one active stream without
//! BUNDLE would need a transport per stream, and RTCP on its own port a
//! second ICE component; neither is supported and both are refused with
//! a clear error rather than negotiated into a call without media.
//!
//! The other way, str0m writes the discard address (`0.0.0.0`, port 9) as
//! every stream's default destination, as trickle ICE allows. An ICE
//! agent that does not trickle (RFC 8445, baresip's) takes a default
//! destination that is none of the candidates as a sign that something
//! between the ends rewrote the SDP, and drops ICE. [`with_default`]
//! writes a real candidate there.

use std::net::SocketAddr;

use super::MediaError;

/// Our `sdp` with `default` (one of our candidates: the relayed one when
/// there is one, as RFC 8445 §5.1.4 recommends) as each active stream's
/// default destination, in `c=`, `m=` and `a=rtcp:` lines.
pub(crate) fn with_default(sdp: &str, default: SocketAddr) -> String {
    let (family, ip, port) = match default {
        SocketAddr::V4(a) => ("IP4", a.ip().to_string(), a.port()),
        SocketAddr::V6(a) => ("IP6", a.ip().to_string(), a.port()),
    };
    let mut out = String::with_capacity(sdp.len() + 64);
    for l in sdp.lines().map(str::trim_end) {
        if l == "c=IN IP4 0.0.0.0" {
            push_line(&mut out, &format!("c=IN {family} {ip}"));
        } else if l == "a=rtcp:9 IN IP4 0.0.0.0" {
            push_line(&mut out, &format!("a=rtcp:{port} IN {family} {ip}"));
        } else if let Some(rest) = l.strip_prefix("m=").filter(|_| port_of(l) == Some(9)) {
            let mut parts: Vec<String> = rest.split(' ').map(str::to_owned).collect();
            parts[1] = port.to_string();
            push_line(&mut out, &format!("m={}", parts.join(" ")));
        } else {
            push_line(&mut out, l);
        }
    }
    out
}

/// `sdp` with mids and a BUNDLE group if it had none. `mids` names the
/// m-lines in order: for an answer, the mids of our offer; for an offer,
/// empty (they are numbered from 0). ICE candidates of other components
/// than RTP (1) are dropped.
pub(crate) fn bundled(sdp: &str, mids: &[String]) -> Result<String, MediaError> {
    let lines: Vec<&str> = sdp.lines().map(str::trim_end).collect();
    if lines.iter().any(|l| l.starts_with("a=group:BUNDLE")) {
        return Ok(sdp.to_owned());
    }
    let sections = sections(&lines);
    let active: Vec<usize> = sections
        .iter()
        .enumerate()
        .filter(|(_, s)| port_of(lines[s.start]) != Some(0))
        .map(|(i, _)| i)
        .collect();
    if active.len() > 1 {
        return Err(MediaError::Sdp(format!(
            "the far end takes {} media streams without bundling them (a=group:BUNDLE, RFC 9143); \
             one is supported",
            active.len()
        )));
    }
    let mid_of = |i: usize| -> String {
        let section = &sections[i];
        lines[section.clone()]
            .iter()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .map(str::to_owned)
            .or_else(|| mids.get(i).cloned())
            .unwrap_or_else(|| i.to_string())
    };
    if let Some(&i) = active.first() {
        if !lines[sections[i].clone()].contains(&"a=rtcp-mux") {
            return Err(MediaError::Sdp(
                "the far end sends RTCP on a port of its own; RTP and RTCP must share one \
                 (a=rtcp-mux, RFC 5761)"
                    .into(),
            ));
        }
    }

    let mut out = String::with_capacity(sdp.len() + 64);
    let first_m = sections.first().map_or(lines.len(), |s| s.start);
    for l in &lines[..first_m] {
        if !other_component(l) {
            push_line(&mut out, l);
        }
    }
    let group: Vec<String> = active.iter().map(|&i| mid_of(i)).collect();
    push_line(&mut out, &format!("a=group:BUNDLE {}", group.join(" ")));
    for (i, section) in sections.iter().enumerate() {
        let section_lines = &lines[section.clone()];
        let has_mid = section_lines.iter().any(|l| l.starts_with("a=mid:"));
        // No direction means sendrecv (RFC 8866 §6.7); str0m wants it said.
        let has_direction = section_lines.iter().any(|l| {
            matches!(
                *l,
                "a=sendrecv" | "a=sendonly" | "a=recvonly" | "a=inactive"
            )
        });
        for l in section_lines.iter().filter(|l| !other_component(l)) {
            push_line(&mut out, l);
        }
        // Attributes go last: c= and b= must follow m= directly.
        if !has_mid {
            push_line(&mut out, &format!("a=mid:{}", mid_of(i)));
        }
        if !has_direction {
            push_line(&mut out, "a=sendrecv");
        }
    }
    Ok(out)
}

fn push_line(out: &mut String, l: &str) {
    out.push_str(l);
    out.push_str("\r\n");
}

/// Line ranges of the m-sections.
fn sections(lines: &[&str]) -> Vec<std::ops::Range<usize>> {
    let starts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("m="))
        .map(|(i, _)| i)
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| s..starts.get(k + 1).copied().unwrap_or(lines.len()))
        .collect()
}

/// The port of an `m=` line.
fn port_of(m_line: &str) -> Option<u16> {
    m_line
        .split_whitespace()
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// An ICE candidate for another component than RTP.
fn other_component(l: &str) -> bool {
    l.strip_prefix("a=candidate:")
        .and_then(|c| c.split_whitespace().nth(1))
        .is_some_and(|component| component != "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::change::SdpAnswer;

    /// What baresip 1.0 (mediaenc=dtls_srtp, rtcp_mux yes) writes.
    const BARESIP: &str = "v=0\r\n\
        o=- 251415733 1920619144 IN IP4 10.215.1.2\r\n\
        s=-\r\n\
        c=IN IP4 10.215.1.2\r\n\
        t=0 0\r\n\
        a=tool:baresip 1.0.0\r\n\
        a=ice-ufrag:lvs95DU\r\n\
        a=ice-pwd:ClhhrMDrjqPKlWtBKAONX4A9kHnRKsX\r\n\
        a=setup:active\r\n\
        a=fingerprint:SHA-256 1D:44:F7:63:13:28:47:2F:3F:9A:92:22:78:1D:1A:C0:A3:63:AD:A0:A1:79:70:AB:FC:F2:AD:C9:6A:0F:62:CB\r\n\
        m=audio 22668 UDP/TLS/RTP/SAVPF 96 101\r\n\
        c=IN IP4 10.215.1.2\r\n\
        a=rtpmap:96 opus/48000/2\r\n\
        a=fmtp:96 stereo=1;sprop-stereo=1\r\n\
        a=rtpmap:101 telephone-event/8000\r\n\
        a=fmtp:101 0-15\r\n\
        a=sendrecv\r\n\
        a=label:1\r\n\
        a=rtcp-rsize\r\n\
        a=ssrc:2011886489 cname:sip:bob@10.215.1.1\r\n\
        a=rtcp-mux\r\n\
        a=minptime:20\r\n\
        a=ptime:20\r\n\
        a=candidate:0ad70102 1 UDP 2113929471 10.215.1.2 22668 typ host\r\n";

    #[test]
    fn an_unbundled_single_stream_gets_our_mid_and_a_group() {
        assert!(SdpAnswer::from_sdp_string(BARESIP).is_err());
        let out = bundled(BARESIP, &["a0".into()]).unwrap();
        assert!(out.contains("a=group:BUNDLE a0\r\n"), "{out}");
        assert!(out.ends_with("typ host\r\na=mid:a0\r\n"), "{out}");
        assert!(SdpAnswer::from_sdp_string(&out).is_ok(), "{out}");
        // An offer's lines are numbered.
        assert!(bundled(BARESIP, &[]).unwrap().contains("a=mid:0\r\n"));
    }

    #[test]
    fn no_direction_means_sendrecv() {
        // As baresip answers: no direction, c= after m=.
        let sdp = BARESIP.replace("a=sendrecv\r\n", "").replace(
            "c=IN IP4 10.215.1.2\r\na=rtpmap",
            "c=IN IP4 10.215.1.1\r\na=rtpmap",
        );
        assert!(sdp.contains("c=IN IP4 10.215.1.1\r\n"));
        let out = bundled(&sdp, &["0".into()]).unwrap();
        assert!(out.contains("a=sendrecv\r\n"), "{out}");
        assert!(SdpAnswer::from_sdp_string(&out).is_ok(), "{out}");
    }

    #[test]
    fn our_default_destination_is_a_candidate() {
        let ours = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
                    m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n\
                    a=rtcp:9 IN IP4 0.0.0.0\r\na=mid:0\r\n\
                    m=video 0 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\n";
        let out = with_default(ours, "10.0.0.7:40000".parse().unwrap());
        assert!(
            out.contains("m=audio 40000 UDP/TLS/RTP/SAVPF 111\r\n"),
            "{out}"
        );
        assert!(out.contains("c=IN IP4 10.0.0.7\r\n"), "{out}");
        assert!(out.contains("a=rtcp:40000 IN IP4 10.0.0.7\r\n"), "{out}");
        assert!(out.contains("m=video 0 "), "{out}");
        assert!(
            out.starts_with("v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n"),
            "{out}"
        );
        let v6 = with_default(ours, "[2001:db8::1]:5000".parse().unwrap());
        assert!(v6.contains("c=IN IP6 2001:db8::1\r\n"), "{v6}");
    }

    #[test]
    fn a_bundled_sdp_is_left_alone() {
        let sdp = "v=0\r\na=group:BUNDLE 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                   a=candidate:1 2 UDP 1 10.0.0.1 9 typ host\r\n";
        assert_eq!(bundled(sdp, &[]).unwrap(), sdp);
    }

    #[test]
    fn rtcp_candidates_are_dropped() {
        let sdp = BARESIP.replace(
            "a=candidate:0ad70102 1 UDP 2113929471 10.215.1.2 22668 typ host\r\n",
            "a=candidate:0ad70102 1 UDP 2113929471 10.215.1.2 22668 typ host\r\n\
             a=candidate:0ad70102 2 UDP 2113929470 10.215.1.2 22669 typ host\r\n",
        );
        let out = bundled(&sdp, &[]).unwrap();
        assert!(out.contains(" 22668 typ host"), "{out}");
        assert!(!out.contains(" 22669 typ host"), "{out}");
    }

    #[test]
    fn rtcp_on_its_own_port_is_refused() {
        let sdp = BARESIP.replace("a=rtcp-mux\r\n", "");
        let e = bundled(&sdp, &[]).unwrap_err().to_string();
        assert!(e.contains("rtcp-mux"), "{e}");
    }

    #[test]
    fn two_unbundled_streams_are_refused_and_a_rejected_one_is_not_counted() {
        let video = "m=video 30000 UDP/TLS/RTP/SAVPF 97\r\na=rtpmap:97 VP8/90000\r\na=rtcp-mux\r\n";
        let e = bundled(&format!("{BARESIP}{video}"), &[]).unwrap_err();
        assert!(e.to_string().contains("2 media streams"), "{e}");
        let rejected = video.replace("30000", "0");
        let out = bundled(&format!("{BARESIP}{rejected}"), &["0".into(), "1".into()]).unwrap();
        assert!(out.contains("a=group:BUNDLE 0\r\n"), "{out}");
        assert!(
            out.ends_with("a=rtcp-mux\r\na=mid:1\r\na=sendrecv\r\n"),
            "{out}"
        );
    }
}
