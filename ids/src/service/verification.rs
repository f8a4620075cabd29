//! Proving a handle: verification sessions, codes and their limits.
//!
//! The rules live in the sans-IO core (`core::verification`); what a
//! request changes is kept in the database — the session, the handle's
//! wrong-code count, the handle token a passed check makes — so that a code
//! sent through one node is checked at another, a handle's lockout holds on
//! every node, and a token is spent once across them. Each request reads
//! what it needs with row locks, lets the core decide, and writes it back
//! in the same transaction. New sessions per handle, per address (IPv6:
//! /64) and per IPv6 /48 are counted in the database too, an hour back,
//! so the limits hold however many nodes an attacker spreads over; the
//! core's own counts stay as each node's first line.

use super::*;
use crate::core::verification::{Failures, Session, SessionId};
use crate::store::{tx, FailureRow, SessionRow};

/// Converts the core's `Instant`s to Unix milliseconds and back, from one
/// pair of readings taken at start: what is stored means the same on every
/// node whose clock is synchronised.
#[derive(Debug, Clone, Copy)]
pub(super) struct WallClock {
    at: Instant,
    unix_ms: i64,
}

impl WallClock {
    pub(super) fn now() -> WallClock {
        WallClock {
            at: Instant::now(),
            unix_ms: crate::kt::unix_now_ms(),
        }
    }

    fn ms(&self, t: Instant) -> i64 {
        match t.checked_duration_since(self.at) {
            Some(d) => self.unix_ms + d.as_millis() as i64,
            None => self.unix_ms - self.at.duration_since(t).as_millis() as i64,
        }
    }

    fn instant(&self, ms: i64) -> Instant {
        let d = Duration::from_millis(ms.abs_diff(self.unix_ms));
        if ms >= self.unix_ms {
            self.at + d
        } else {
            // Before this process started: as far back as the clock goes.
            self.at.checked_sub(d).unwrap_or(self.at)
        }
    }

    fn session_row(&self, s: &Session) -> SessionRow {
        SessionRow {
            handle: s.handle.as_str().to_owned(),
            started_ms: self.ms(s.started),
            code_mac: s.code_mac.to_vec(),
            sends: i64::from(s.sends),
            last_send_ms: self.ms(s.last_send),
            checks: i64::from(s.checks),
            next_check_ms: self.ms(s.next_check_at),
        }
    }

    fn session(&self, r: &SessionRow) -> Result<Session, Error> {
        let bad = |what: &str| Error::Internal(format!("stored verification session: {what}"));
        Ok(Session {
            handle: Handle::parse(&r.handle).map_err(|_| bad("handle"))?,
            started: self.instant(r.started_ms),
            code_mac: r.code_mac.clone().try_into().map_err(|_| bad("code"))?,
            sends: u32::try_from(r.sends).map_err(|_| bad("sends"))?,
            last_send: self.instant(r.last_send_ms),
            checks: u32::try_from(r.checks).map_err(|_| bad("checks"))?,
            next_check_at: self.instant(r.next_check_ms),
        })
    }

    fn failure_row(&self, f: &Failures) -> FailureRow {
        FailureRow {
            count: i64::from(f.count),
            last_ms: self.ms(f.last),
            locked_until_ms: f.locked_until.map(|t| self.ms(t)),
        }
    }

    fn failures(&self, r: &FailureRow) -> Failures {
        Failures {
            count: u32::try_from(r.count).unwrap_or(u32::MAX),
            last: self.instant(r.last_ms),
            locked_until: r.locked_until_ms.map(|t| self.instant(t)),
        }
    }
}

const HOUR_MS: i64 = 3_600_000;

/// Handle tokens are kept by their SHA-256: the database holds nothing a
/// reader could present.
fn token_hash(token: &[u8; 32]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, token)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

impl Ids {
    pub async fn start_verification(
        &self,
        handle: &str,
        ip: IpAddr,
    ) -> Result<VerificationView, Error> {
        let handle = Handle::parse(handle).map_err(|e| Error::BadRequest(e.to_string()))?;
        let now = Instant::now();
        let id: [u8; 16] = self.random();
        let mut t = self.store.begin().await?;
        let failures = tx::failures(&mut t, self.store.backend(), handle.as_str()).await?;
        let keys = self.start_keys(&handle, ip);
        let now_ms = self.clock.ms(now);
        for (key, limit) in &keys {
            let (count, oldest) = tx::starts(&mut t, key, now_ms - HOUR_MS).await?;
            if count >= i64::from(*limit) {
                let wait = oldest.map_or(HOUR_MS, |o| o + HOUR_MS - now_ms).max(1000);
                return Err(Error::RetryAfter(Duration::from_millis(wait as u64)));
            }
        }
        let (state, code, session) = {
            let mut v = self.lock_verifications();
            v.put_failures(&handle, failures.map(|f| self.clock.failures(&f)));
            let (state, code) = v
                .start(
                    handle.clone(),
                    ip,
                    now,
                    id,
                    u32::from_be_bytes(self.random()),
                )
                .map_err(refusal)?;
            (state, code, v.session(SessionId(id)))
        };
        let row = session.map(|s| self.clock.session_row(&s));
        tx::put_session(&mut t, &id, row.as_ref()).await?;
        for (key, _) in &keys {
            tx::record_start(&mut t, key, now_ms).await?;
        }
        t.commit().await.map_err(Error::db)?;
        self.sender.send(&handle, &code).await?;
        tracing::info!(handle = %handle.redacted(), "verification started");
        Ok(self.view(state, now))
    }

    /// What a new session counts under, with each key's hourly limit.
    fn start_keys(&self, handle: &Handle, ip: IpAddr) -> Vec<(String, u32)> {
        let c = &self.config.verification;
        let mut keys = vec![
            (
                format!("handle {}", handle.as_str()),
                c.starts_per_handle_per_hour,
            ),
            (
                format!("source {}", wire::net::source_key(ip)),
                c.starts_per_ip_per_hour,
            ),
        ];
        if let Some(net) = crate::core::verification::wide_key(ip) {
            keys.push((format!("net48 {net}"), c.starts_per_v6_48_per_hour));
        }
        keys
    }

    pub async fn resend_verification(&self, id: &str) -> Result<VerificationView, Error> {
        let id = session_id(id)?;
        let now = Instant::now();
        let mut t = self.store.begin().await?;
        let (state, code, session) = {
            let stored = tx::session(&mut t, self.store.backend(), &id.0).await?;
            let stored = stored.map(|r| self.clock.session(&r)).transpose()?;
            let mut v = self.lock_verifications();
            v.put_session(id, stored);
            let (state, code) = v
                .resend(id, now, u32::from_be_bytes(self.random()))
                .map_err(refusal)?;
            (state, code, v.session(id))
        };
        let row = session.map(|s| self.clock.session_row(&s));
        tx::put_session(&mut t, &id.0, row.as_ref()).await?;
        t.commit().await.map_err(Error::db)?;
        self.sender.send(&state.handle, &code).await?;
        Ok(self.view(state, now))
    }

    /// Returns (handle, handle token).
    pub async fn check_verification(
        &self,
        id: &str,
        code: &str,
    ) -> Result<(Handle, String), Error> {
        let id = session_id(id)?;
        let now = Instant::now();
        let backend = self.store.backend();
        let mut t = self.store.begin().await?;
        let Some(stored) = tx::session(&mut t, backend, &id.0).await? else {
            return Err(refusal(crate::core::verification::Refusal::NotFound));
        };
        let failures = tx::failures(&mut t, backend, &stored.handle).await?;
        let stored = self.clock.session(&stored)?;
        let handle = stored.handle.clone();
        let (result, session, failures) = {
            let mut v = self.lock_verifications();
            v.put_session(id, Some(stored));
            v.put_failures(&handle, failures.map(|f| self.clock.failures(&f)));
            let result = v.check(id, code.trim(), now);
            (result, v.session(id), v.failures(&handle))
        };
        let row = session.map(|s| self.clock.session_row(&s));
        tx::put_session(&mut t, &id.0, row.as_ref()).await?;
        let failures = failures.map(|f| self.clock.failure_row(&f));
        tx::put_failures(&mut t, handle.as_str(), failures.as_ref()).await?;
        let proved = match result {
            Ok(h) => {
                let token: [u8; 32] = self.random();
                let expires = self.clock.ms(now + self.config.verification.token_ttl);
                tx::insert_token(&mut t, &token_hash(&token), h.as_str(), expires).await?;
                Ok((h, B64.encode(token)))
            }
            Err(r) => Err(refusal(r)),
        };
        // A wrong code counts even though the request fails.
        t.commit().await.map_err(Error::db)?;
        proved
    }

    /// Spends handle tokens; all or none.
    pub(super) async fn redeem(&self, tokens: &[String]) -> Result<Vec<(Handle, [u8; 32])>, Error> {
        let refused = || {
            Error::Forbidden(
                "a handle token is invalid, used or expired; verify the handle again".into(),
            )
        };
        let raw: Vec<[u8; 32]> = tokens
            .iter()
            .map(|t| B64.decode(t).ok().and_then(|b| b.try_into().ok()))
            .collect::<Option<_>>()
            .ok_or_else(refused)?;
        let hashes: Vec<[u8; 32]> = raw.iter().map(token_hash).collect();
        let now = self.clock.ms(Instant::now());
        let handles = self
            .store
            .spend_tokens(&hashes, now)
            .await?
            .ok_or_else(refused)?;
        handles
            .iter()
            .zip(hashes)
            .map(|(h, hash)| {
                Handle::parse(h)
                    .map(|h| (h, hash))
                    .map_err(|_| Error::Internal("stored handle".into()))
            })
            .collect()
    }

    /// Puts spent tokens back (the request failed), with their lifetime.
    pub(super) async fn restore(&self, tokens: Vec<(Handle, [u8; 32])>) {
        let hashes: Vec<[u8; 32]> = tokens.into_iter().map(|(_, h)| h).collect();
        let now = self.clock.ms(Instant::now());
        if let Err(e) = self.store.unspend_tokens(&hashes, now).await {
            tracing::warn!(error = %e, "putting handle tokens back failed; they stay spent");
        }
    }

    /// Periodic housekeeping: in-memory state, and verification rows past
    /// their use.
    pub async fn tick(&self) {
        let now = Instant::now();
        self.lock_verifications().handle_timeout(now);
        self.lookups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prune(now);
        let c = &self.config.verification;
        let now_ms = self.clock.ms(now);
        let ms = |d: Duration| d.as_millis() as i64;
        if let Err(e) = self
            .store
            .prune_verifications(
                now_ms,
                now_ms - ms(c.session_ttl),
                now_ms - ms(c.lockout_max),
            )
            .await
        {
            tracing::warn!(error = %e, "pruning verification rows failed");
        }
    }
}
