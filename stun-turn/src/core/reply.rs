//! Answers: success and error responses, challenges, and the integrity
//! and fingerprint every answer ends with.

use super::*;

impl Server {
    pub(super) fn empty_success(&mut self, reply: Reply, auth: &Auth) {
        let mut out = Vec::with_capacity(48);
        let b = MessageBuilder::new(&mut out, Class::Success, reply.method, reply.tid);
        self.finish(b, reply, Some(auth));
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
    }

    /// An error response; authenticated ones carry integrity.
    pub(super) fn error(&mut self, reply: Reply, code: ErrorCode, auth: Option<&Auth>) {
        let mut out = Vec::with_capacity(64);
        let mut b = MessageBuilder::new(&mut out, Class::Error, reply.method, reply.tid);
        // Reason phrases only where the client proved who it is: an
        // unauthenticated answer stays as small as it can be.
        b.add_error(code, if auth.is_some() { code.reason() } else { "" });
        self.finish(b, reply, auth);
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
    }

    pub(super) fn unknown_attributes(&mut self, reply: Reply, typ: u16) {
        let mut out = Vec::with_capacity(48);
        let mut b = MessageBuilder::new(&mut out, Class::Error, reply.method, reply.tid);
        b.add_error(ErrorCode::UNKNOWN_ATTRIBUTE, "");
        b.add(AttrType::UnknownAttributes as u16, &typ.to_be_bytes());
        self.finish(b, reply, None);
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
    }

    /// A 401 or 438 with REALM, a fresh NONCE and PASSWORD-ALGORITHMS.
    pub(super) fn challenge(
        &mut self,
        reply: Reply,
        code: ErrorCode,
        creds: &Credentials,
        now: Instant,
        _request_len: usize,
    ) {
        let nonce = self.shared.nonce.issue(&reply.to, self.shared.unix(now));
        let mut out = Vec::with_capacity(96);
        let mut b = MessageBuilder::new(&mut out, Class::Error, reply.method, reply.tid);
        b.add_error(code, "");
        b.add_attr(AttrType::Realm, creds.realm().as_bytes());
        b.add_attr(AttrType::Nonce, nonce.as_bytes());
        b.add_with(
            AttrType::PasswordAlgorithms as u16,
            4 * OFFERED_ALGORITHMS.len(),
            |o| PasswordAlgorithm::encode_list(OFFERED_ALGORITHMS, o),
        );
        self.finish(b, reply, None);
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
    }

    pub(super) fn finish(&self, mut b: MessageBuilder<'_>, reply: Reply, auth: Option<&Auth>) {
        if let Some(s) = &self.shared.config.software {
            if auth.is_some() {
                b.add_attr(AttrType::Software, s.as_bytes());
            }
        }
        if let Some(a) = auth {
            b.add_integrity(a.kind, &a.key);
        }
        if reply.fingerprint {
            b.add_fingerprint();
        }
    }

    /// A 400 for a request whose header is readable but whose body is not.
    pub(super) fn answer_undecodable(&mut self, from: ClientAddr, bytes: &[u8]) {
        if bytes.len() < crate::message::HEADER_LEN
            || bytes[0] & 0xc0 != 0
            || bytes[0] & 0x01 != 0
            || bytes[1] & 0x10 != 0
        {
            return;
        }
        if bytes[4..8] != crate::message::MAGIC_COOKIE.to_be_bytes() {
            return;
        }
        let t = u16::from_be_bytes([bytes[0], bytes[1]]);
        let method = Method::from_code((t & 0x000f) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0f80));
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&bytes[8..20]);
        let reply = Reply {
            to: from,
            method,
            tid: TransactionId(tid),
            fingerprint: false,
        };
        self.error(reply, ErrorCode::BAD_REQUEST, None);
    }
}
