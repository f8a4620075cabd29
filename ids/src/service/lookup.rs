//! Lookups: relay credentials, handle lookups with their budgets, the
//! revocation list and the transparency audit.

use super::*;

impl Ids {
    /// Relay credentials for a registered device, valid `turn.ttl`.
    pub fn turn_credential(&self, me: &AuthedDevice) -> Result<TurnCredential, Error> {
        let t = &self.config.turn;
        let secret = t
            .secret
            .as_deref()
            .ok_or_else(|| Error::Unavailable("this deployment has no relay configured".into()))?;
        let expiry = crate::kt::unix_now().max(0) as u64 + t.ttl.as_secs();
        let username = format!("{expiry}:{}", me.device.id);
        Ok(TurnCredential {
            password: stun_turn::core::auth::rest_password(secret, &username),
            username,
            ttl: t.ttl,
            uris: t.uris.clone(),
        })
    }

    /// Spends `n` lookups of the account's budget and of the client
    /// address's (all or none of each); a refusal says when to retry. On
    /// a shared database ([`Ids::with_shared_budgets`]) the budgets are
    /// rows every instance spends from; otherwise they are this
    /// instance's.
    pub async fn spend_lookups(
        &self,
        me: &AuthedDevice,
        source: std::net::IpAddr,
        n: usize,
    ) -> Result<(), Error> {
        let source = wire::net::source_key(source);
        let account = &me.device.account_id;
        if self.shared_budgets {
            let per_minute = f64::from(self.config.lookups_per_minute.max(1));
            let budget = |key: String, capacity: f64| crate::store::Budget {
                key,
                capacity,
                per_token: Duration::from_secs_f64(60.0 / capacity),
            };
            let budgets = [
                budget(format!("lookup:account:{account}"), per_minute),
                budget(format!("lookup:source:{source}"), per_minute * 4.0),
            ];
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            return match self
                .store
                .spend_budgets(&budgets, n, crate::kt::unix_now_ms())
                .await?
            {
                None => Ok(()),
                Some(wait) => Err(Error::RetryAfter(wait)),
            };
        }
        let now = Instant::now();
        let mut a = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = self
            .lookups_by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Each bucket refills evenly; n lookups fit if the n-th would.
        for _ in 0..n {
            let wait = a.wait_time(account, now).max(s.wait_time(&source, now));
            if !wait.is_zero() {
                return Err(Error::RetryAfter(wait));
            }
            a.take(account.clone(), now);
            s.take(source, now);
        }
        Ok(())
    }

    pub async fn lookup(
        &self,
        me: &AuthedDevice,
        source: std::net::IpAddr,
        handles: &[String],
    ) -> Result<Vec<(String, LookupResult)>, Error> {
        if handles.is_empty() || handles.len() > self.config.max_lookup_handles {
            return Err(Error::BadRequest(format!(
                "look up 1 to {} handles at a time",
                self.config.max_lookup_handles
            )));
        }
        self.spend_lookups(me, source, handles.len()).await?;
        let mut out = Vec::with_capacity(handles.len());
        for input in handles {
            let h = match Handle::parse(input) {
                Ok(h) => h,
                Err(e) => {
                    out.push((input.clone(), LookupResult::Invalid(e.to_string())));
                    continue;
                }
            };
            let uri = h.uri();
            let r = match self.kt.lookup(&uri).await? {
                crate::kt::Looked::Absent(a) => LookupResult::NotFound(a),
                crate::kt::Looked::Found(crate::kt::Proven { proof, value, root }) => {
                    let devices = match DirectoryValue::decode(&value) {
                        Ok(DirectoryValue::Active(list)) => {
                            let rows = self.store.devices_of_handle(&uri).await?;
                            rows.into_iter()
                                .filter(|r| {
                                    r.revoked_at.is_none() && list.list.device(r.id).is_some()
                                })
                                .collect()
                        }
                        _ => Vec::new(),
                    };
                    LookupResult::Found {
                        value,
                        proof,
                        root,
                        devices,
                    }
                }
            };
            out.push((uri, r));
        }
        Ok(out)
    }

    /// The CRL for `revoked`: the one signed last if it lists the same
    /// serials and is less than an hour old, else a new one.
    pub fn crl(&self, revoked: &[(String, i64)]) -> Result<Vec<u8>, Error> {
        let now = Instant::now();
        let mut cached = self.crl.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            if c.revoked == revoked && now.duration_since(c.signed_at) < CRL_REUSE {
                return Ok(c.der.clone());
            }
        }
        let der = self.ca.crl(revoked, unix_now())?;
        *cached = Some(SignedCrl {
            revoked: revoked.to_vec(),
            der: der.clone(),
            signed_at: now,
        });
        Ok(der)
    }

    /// An append-only proof between two epochs, one audit at a time (the
    /// proofs are work for anyone to ask: the endpoint is public); another
    /// gets 429.
    pub async fn audit(
        &self,
        start: u64,
        end: u64,
    ) -> Result<(Vec<u8>, Vec<(u64, Vec<u8>)>), Error> {
        let Ok(_one) = self.audits.try_acquire() else {
            return Err(Error::RetryAfter(Duration::from_secs(1)));
        };
        self.kt.audit(start, end).await
    }
}
