//! Account resets: a handle proven again on a new device, with a delay
//! the old account's devices may cut short (approve) or stop (cancel).

use super::*;

impl Ids {
    /// Lost every device: prove a handle again and start over with a new
    /// account key. Every device of the old account is removed and told so;
    /// the old account's other handles are deleted.
    ///
    /// Proving a handle is not proving you are its owner (a SIM swap, a
    /// stolen mailbox): while the old account still has devices, the reset
    /// waits [`Config::reset_delay`], and those devices are told at once
    /// and may approve it (it is done then) or cancel it — what Signal's
    /// registration lock and WhatsApp's new-device notices do.
    pub async fn reset_account(
        &self,
        key: &PublicKey,
        handle_tokens: &[String],
        device_list: Submitted<'_>,
        name: &str,
        capabilities: &[String],
    ) -> Result<ResetOutcome, Error> {
        let lists = device_list.parse()?;
        let me = single_device(&lists.account, key)?;
        self.spending(handle_tokens, async |proven| {
            self.reset_inner(&lists, me, proven, name, capabilities)
                .await
        })
        .await
    }

    pub(super) async fn reset_inner(
        &self,
        lists: &Lists,
        me: DeviceId,
        proven: &[(Handle, [u8; 32])],
        name: &str,
        capabilities: &[String],
    ) -> Result<ResetOutcome, Error> {
        let list = &lists.account;
        let proven_uris: BTreeSet<String> = proven.iter().map(|(h, _)| h.uri()).collect();
        check_proven(list, &proven_uris)?;
        let mut guarded = Vec::new();
        let mut active = Vec::new();
        for uri in &proven_uris {
            let Some(a) = self.store.account_of_handle(uri).await? else {
                continue;
            };
            if guarded.contains(&a) {
                continue; // another of its handles brought it in
            }
            let devices: Vec<DeviceRow> = self
                .store
                .devices_of(&a)
                .await?
                .into_iter()
                .filter(|d| d.revoked_at.is_none())
                .collect();
            if !devices.is_empty() {
                guarded.push(a);
                active.extend(devices);
            }
        }
        if guarded.is_empty() {
            let r = self
                .create_account_inner(lists, me, &proven_uris, name, capabilities, Creation::Reset)
                .await?;
            return Ok(ResetOutcome::Done(r));
        }
        let now = unix_now();
        let row = crate::store::ResetRow {
            id: wire::keys::hex(&self.random::<16>()),
            device_key: list.list.devices[0].identity_key.0.to_vec(),
            list: list.encode(),
            name: clean_name(name)?,
            capabilities: caps_json(capabilities)?,
            accounts: guarded.clone(),
            created_at: now,
            effective_at: now + self.config.reset_delay.as_secs() as i64,
            state: crate::store::ResetState::Pending,
            result: None,
        };
        self.store.insert_reset(&row, &lists.values).await?;
        let mut t = self.store.begin().await?;
        for a in &guarded {
            tx::event(&mut t, a, "reset_requested", None, now).await?;
        }
        t.commit().await.map_err(Error::db)?;
        tracing::info!(accounts = guarded.len(), "account reset requested; waiting");
        self.tell(
            &active,
            vec![AccountEvent {
                kind: "reset_requested",
                device: None,
            }],
        );
        Ok(ResetOutcome::Pending {
            id: row.id,
            effective_at: row.effective_at,
        })
    }

    /// The new device asks how its reset is doing; a reset whose delay is
    /// over is done now.
    pub async fn reset_status(&self, key: &PublicKey, id: &str) -> Result<ResetOutcome, Error> {
        let row = self
            .store
            .reset(id)
            .await?
            .filter(|r| r.device_key[..] == key.0[..])
            .ok_or_else(|| Error::NotFound("no such reset for this key".into()))?;
        match row.state {
            crate::store::ResetState::Cancelled => Ok(ResetOutcome::Cancelled),
            crate::store::ResetState::Done => Ok(ResetOutcome::Done(registered_of(&row)?)),
            crate::store::ResetState::Pending if unix_now() >= row.effective_at => {
                Ok(ResetOutcome::Done(self.finish_reset(&row).await?))
            }
            crate::store::ResetState::Pending => Ok(ResetOutcome::Pending {
                id: row.id,
                effective_at: row.effective_at,
            }),
        }
    }

    /// Pending resets that would retire this device's account.
    pub async fn resets_for(
        &self,
        me: &AuthedDevice,
    ) -> Result<Vec<crate::store::ResetRow>, Error> {
        self.store.resets_of(&me.device.account_id).await
    }

    /// A device of the account lets the reset happen now.
    pub async fn approve_reset(&self, me: &AuthedDevice, id: &str) -> Result<(), Error> {
        let row = self.reset_of_my_account(me, id).await?;
        self.finish_reset(&row).await.map(|_| ())
    }

    /// A device of the account stops the reset.
    pub async fn cancel_reset(&self, me: &AuthedDevice, id: &str) -> Result<(), Error> {
        let row = self.reset_of_my_account(me, id).await?;
        if !self.store.cancel_reset(&row.id).await? {
            return Err(Error::Conflict("the reset is no longer pending".into()));
        }
        let now = unix_now();
        let mut t = self.store.begin().await?;
        for a in &row.accounts {
            tx::event(&mut t, a, "reset_cancelled", None, now).await?;
        }
        t.commit().await.map_err(Error::db)?;
        tracing::info!("account reset cancelled by a device of the account");
        Ok(())
    }

    pub(super) async fn reset_of_my_account(
        &self,
        me: &AuthedDevice,
        id: &str,
    ) -> Result<crate::store::ResetRow, Error> {
        let row = self
            .store
            .reset(id)
            .await?
            .filter(|r| r.accounts.contains(&me.device.account_id))
            .ok_or_else(|| Error::NotFound("no such reset of this account".into()))?;
        if row.state != crate::store::ResetState::Pending {
            return Err(Error::Conflict("the reset is no longer pending".into()));
        }
        Ok(row)
    }

    /// Carries out a pending reset (once, whoever asks first).
    pub(super) async fn finish_reset(
        &self,
        row: &crate::store::ResetRow,
    ) -> Result<Registered, Error> {
        let lists = Lists::parse(&row.list, &self.store.reset_values(&row.id).await?)?;
        let list = &lists.account;
        let key = PublicKey(
            row.device_key
                .clone()
                .try_into()
                .map_err(|_| Error::Internal("stored reset key".into()))?,
        );
        let me = single_device(list, &key)?;
        let uris: BTreeSet<String> = list.list.handles.iter().cloned().collect();
        let caps: Vec<String> = serde_json::from_str(&row.capabilities).unwrap_or_default();
        match self
            .create_account_inner(
                &lists,
                me,
                &uris,
                &row.name,
                &caps,
                Creation::PendingReset(&row.id),
            )
            .await
        {
            Ok(r) => Ok(r),
            // Another request finished it first: its result stands.
            Err(Error::Conflict(_)) => match self.store.reset(&row.id).await? {
                Some(r) if r.state == crate::store::ResetState::Done => registered_of(&r),
                _ => Err(Error::Conflict("the reset is no longer pending".into())),
            },
            Err(e) => Err(e),
        }
    }
}
