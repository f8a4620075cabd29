//! Proving a handle: verification sessions, codes and their limits.

use super::*;

impl Ids {
    pub async fn start_verification(
        &self,
        handle: &str,
        ip: IpAddr,
    ) -> Result<VerificationView, Error> {
        let handle = Handle::parse(handle).map_err(|e| Error::BadRequest(e.to_string()))?;
        let now = Instant::now();
        let (state, code) = self
            .lock_verifications()
            .start(
                handle.clone(),
                ip,
                now,
                self.random(),
                u32::from_be_bytes(self.random()),
            )
            .map_err(refusal)?;
        self.sender.send(&handle, &code).await?;
        tracing::info!(handle = %handle.redacted(), "verification started");
        Ok(self.view(state, now))
    }

    pub async fn resend_verification(&self, id: &str) -> Result<VerificationView, Error> {
        let id = session_id(id)?;
        let now = Instant::now();
        let (state, code) = self
            .lock_verifications()
            .resend(id, now, u32::from_be_bytes(self.random()))
            .map_err(refusal)?;
        self.sender.send(&state.handle, &code).await?;
        Ok(self.view(state, now))
    }

    /// Returns (handle, handle token).
    pub fn check_verification(&self, id: &str, code: &str) -> Result<(Handle, String), Error> {
        let id = session_id(id)?;
        let token: [u8; 32] = self.random();
        let handle = self
            .lock_verifications()
            .check(id, code.trim(), Instant::now(), token)
            .map_err(refusal)?;
        Ok((handle, B64.encode(token)))
    }

    /// Spends handle tokens; all or none.
    pub(super) fn redeem(&self, tokens: &[String]) -> Result<Vec<(Handle, [u8; 32])>, Error> {
        let now = Instant::now();
        let mut v = self.lock_verifications();
        let mut out = Vec::new();
        for t in tokens {
            let raw: Option<[u8; 32]> = B64.decode(t).ok().and_then(|b| b.try_into().ok());
            match raw.and_then(|r| v.redeem(&r, now).map(|h| (h, r))) {
                Some(x) => out.push(x),
                None => {
                    for (_, r) in out {
                        v.restore(r, now);
                    }
                    return Err(Error::Forbidden(
                        "a handle token is invalid, used or expired; verify the handle again"
                            .into(),
                    ));
                }
            }
        }
        Ok(out)
    }

    pub(super) fn restore(&self, tokens: Vec<(Handle, [u8; 32])>) {
        let now = Instant::now();
        let mut v = self.lock_verifications();
        for (_, r) in tokens {
            v.restore(r, now);
        }
    }

    /// Periodic housekeeping of in-memory state.
    pub fn tick(&self) {
        let now = Instant::now();
        self.lock_verifications().handle_timeout(now);
        self.lookups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prune(now);
    }
}
