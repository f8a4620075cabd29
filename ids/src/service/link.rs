//! Linking a new device to an account with a short-lived code.

use super::*;

impl Ids {
    /// An existing device asks for a link code to show to the new device.
    pub async fn create_link(&self, me: &AuthedDevice) -> Result<(String, Duration), Error> {
        let code = link_code(&self.random::<10>());
        let ttl = self.config.link_ttl;
        self.store
            .insert_link(
                &link_hash(&code),
                &me.device.account_id,
                unix_now() + ttl.as_secs() as i64,
            )
            .await?;
        Ok((code, ttl))
    }

    /// The new device claims a link code with its key.
    pub async fn claim_link(
        &self,
        key: &PublicKey,
        code: &str,
        device_id: DeviceId,
        name: &str,
        capabilities: &[String],
        transfer_key: Option<&[u8]>,
    ) -> Result<(), Error> {
        if self.store.device_by_key(&key.0).await?.is_some() {
            return Err(Error::DeviceExists);
        }
        let hash = link_hash(&normalise_link_code(code));
        let now = unix_now();
        let link = self
            .store
            .link(&hash)
            .await?
            .filter(|l| l.expires_at > now)
            .ok_or_else(|| Error::NotFound("no such link code, or it expired".into()))?;
        if link.claim_key.is_some() {
            return Err(Error::Conflict("this link code was already used".into()));
        }
        let ok = self
            .store
            .claim_link(
                &hash,
                &crate::store::Claim {
                    device: device_id,
                    key: &key.0,
                    name: &clean_name(name)?,
                    capabilities: &caps_json(capabilities)?,
                    transfer_key,
                },
                now,
            )
            .await?;
        if !ok {
            return Err(Error::Conflict("this link code was already used".into()));
        }
        Ok(())
    }

    /// What the claiming device sees: pending, or approved with its
    /// certificate (and the sealed account key if the approver sent one).
    pub async fn link_status(
        &self,
        key: &PublicKey,
        code: &str,
    ) -> Result<(crate::store::LinkRow, Option<DeviceRow>), Error> {
        let link = self
            .store
            .link(&link_hash(&normalise_link_code(code)))
            .await?
            .filter(|l| l.claim_key.as_deref() == Some(&key.0[..]))
            .ok_or_else(|| Error::NotFound("no such link claim for this key".into()))?;
        let device = self
            .store
            .device_by_key(&key.0)
            .await?
            .filter(|d| d.revoked_at.is_none());
        Ok((link, device))
    }
}
