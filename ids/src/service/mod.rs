//! The identity service's operations, independent of HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use wire::device_list::{DirectoryValue, SignedDeviceList};
use wire::transparency::SignedRoot;
use wire::{DeviceId, Handle, PublicKey};

use crate::certs::DeviceCa;
use crate::core::verification::{
    Refusal, SessionId, SessionState, VerificationConfig, Verifications,
};
use crate::error::Error;
use crate::kt::{unix_now, Transparency};
use crate::record_cache::Cache;
use crate::sender::CodeSender;
use crate::store::{tx, AccountRow, DeviceRow, Store};
use wire::ratelimit::RateLimiter;

mod link;
mod lookup;
mod reset;
mod verification;

/// Identity service settings. Durations are `Duration`; defaults in
/// `Default`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Database URL: `sqlite://…/ids.db` (default in the data directory)
    /// or `postgres://…`.
    pub database_url: String,
    pub verification: VerificationConfig,
    /// How often queued changes are published as a new epoch. Default 2 s
    /// (the target is at most 10 s).
    pub publish_interval: Duration,
    /// Allowed clock skew of signed requests. Default 300 s.
    pub max_skew: Duration,
    /// Handles an account (all its devices together) may look up per
    /// minute, history reads included; a client address (IPv6: /64) may
    /// look up four times that. Default 600.
    pub lookups_per_minute: u32,
    /// Handles per lookup request. Default 64.
    pub max_lookup_handles: usize,
    /// Link code lifetime. Default 10 min.
    pub link_ttl: Duration,
    /// How long a reset of an account that still has devices waits before
    /// it takes effect, unless one of them approves (or cancels) it.
    /// Default 7 days (Signal's registration lock lasts as long).
    pub reset_delay: Duration,
    /// Devices per account. Default 16 (the format allows 32).
    pub max_devices: usize,
    /// Where the development sender writes codes.
    pub outbox: PathBuf,
    /// Short-lived relay credentials for devices.
    pub turn: TurnConfig,
}

/// What `ids` needs to hand devices coturn-style REST credentials for the
/// relay (the same shared secret as `stun-turn`).
#[derive(Clone, Default)]
pub struct TurnConfig {
    /// The relay's REST secret; `None`: no relay, credentials refused.
    pub secret: Option<String>,
    /// `turn:` / `turns:` URIs for the device.
    pub uris: Vec<String>,
    /// Lifetime of a credential. Default 1 h.
    pub ttl: Duration,
}

impl std::fmt::Debug for TurnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("uris", &self.uris)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// A relay credential: username `<expiry>:<device id>`, password
/// base64(HMAC-SHA1(secret, username)).
#[derive(Clone, Debug)]
pub struct TurnCredential {
    pub username: String,
    pub password: String,
    pub ttl: Duration,
    pub uris: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "sqlite://parley-data/ids.db".into(),
            verification: VerificationConfig::default(),
            publish_interval: Duration::from_secs(2),
            max_skew: Duration::from_secs(300),
            lookups_per_minute: 600,
            max_lookup_handles: 64,
            link_ttl: Duration::from_secs(600),
            reset_delay: Duration::from_secs(7 * 24 * 3600),
            max_devices: 16,
            outbox: PathBuf::from("parley-data/outbox"),
            turn: TurnConfig {
                ttl: Duration::from_secs(3600),
                ..TurnConfig::default()
            },
        }
    }
}

/// A device that signed its request and is registered and active.
#[derive(Debug, Clone)]
pub struct AuthedDevice {
    pub device: DeviceRow,
}

/// Result of starting or resending a verification.
#[derive(Debug, Clone)]
pub struct VerificationView {
    pub id: String,
    pub handle: Handle,
    pub expires_in: Duration,
    pub resend_in: Option<Duration>,
    pub checks_left: u32,
}

/// The result of registering a device.
#[derive(Debug, Clone)]
pub struct Registered {
    pub account_id: String,
    pub device_id: DeviceId,
    pub certificate: String,
    pub ca: String,
}

/// What a reset request became.
#[derive(Debug, Clone)]
pub enum ResetOutcome {
    /// Done at once: the old accounts had no device left.
    Done(Registered),
    /// Waiting until `effective_at` (unix seconds) for the old accounts'
    /// devices to approve or cancel it.
    Pending { id: String, effective_at: i64 },
    /// A device of the account cancelled it.
    Cancelled,
}

/// How an account is made: fresh, by a reset at once, or by a pending
/// reset `id` coming due (done once, in the account's transaction).
#[derive(Clone, Copy, Debug)]
enum Creation<'a> {
    New,
    Reset,
    PendingReset(&'a str),
}

/// One looked-up handle.
#[derive(Debug, Clone)]
pub enum LookupResult {
    Invalid(String),
    /// Never published; the proof says so.
    NotFound(crate::kt::Absence),
    Found {
        value: Vec<u8>,
        proof: Vec<u8>,
        root: SignedRoot,
        /// Routing data for each active device in the value.
        devices: Vec<DeviceRow>,
    },
}

pub struct Ids {
    pub config: Config,
    pub store: Store,
    pub kt: Transparency,
    ca: DeviceCa,
    sender: Box<dyn CodeSender>,
    verifications: Mutex<Verifications>,
    /// The core's times as stored (see `verification.rs`).
    clock: verification::WallClock,
    /// Lookups per account: a device id costs nothing to mint (link
    /// another device), an account needs a proven handle.
    lookups: Mutex<RateLimiter<String>>,
    /// Lookups per client address, for accounts made in bulk.
    lookups_by_source: Mutex<RateLimiter<std::net::IpAddr>>,
    /// Lookup budgets live in the database, shared by every instance on
    /// it (a cluster), rather than in `lookups` and `lookups_by_source`.
    shared_budgets: bool,
    rng: SystemRandom,
    notifier: OnceLock<Arc<dyn AccountNotifier>>,
    /// Active devices by identity key, as read for authentication. Cleared
    /// after every change this service commits to a device; an entry is
    /// trusted for [`DEVICE_CACHE_TTL`], which bounds how long a change
    /// made by another instance on a shared database goes unseen.
    devices: Cache<[u8; wire::keys::PUBLIC_KEY_LEN], (DeviceRow, Instant)>,
    /// The last CRL signed, for the revoked set it lists: `/v1/crl` signs
    /// anew only when that set changed or the list is an hour old.
    crl: Mutex<Option<SignedCrl>>,
    /// Audits running (each holds the directory's read lock): at most one.
    audits: tokio::sync::Semaphore,
}

struct SignedCrl {
    revoked: Vec<(String, i64)>,
    der: Vec<u8>,
    signed_at: Instant,
}

/// How long a signed CRL is served while nothing is revoked (it says it
/// is valid a day).
const CRL_REUSE: Duration = Duration::from_secs(3600);

/// How long an authenticated device is taken from memory instead of the
/// database (see [`Ids::device`]).
pub const DEVICE_CACHE_TTL: Duration = Duration::from_secs(2);

/// At most this many devices are held for authentication.
const DEVICE_CACHE_SIZE: usize = 65_536;

/// A change to an account, as its devices hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountEvent {
    /// `device_added`, `device_removed` or `account_reset`.
    pub kind: &'static str,
    pub device: Option<DeviceId>,
}

/// Tells an account's devices of a change besides the event stream they
/// can read (`GET /v1/device/events`): in `parley up`, a background push
/// through the courier to each device's [`wire::push::ACCOUNT_TOPIC`]
/// token. Called after the change is committed; must not block.
pub trait AccountNotifier: Send + Sync {
    /// `tokens`: the devices to tell and their courier tokens (hex) for
    /// [`wire::push::ACCOUNT_TOPIC`], as each device registered them; the
    /// courier delivers a token only to the device named with it.
    fn notify(&self, tokens: Vec<(DeviceId, String)>, event: AccountEvent);

    /// Devices whose certificates this service has just revoked (called
    /// after the commit): their courier links and SIP bindings close at
    /// once, on every node, rather than at the next reading of the
    /// revocation list.
    fn revoked(&self, _devices: Vec<Revoked>) {}
}

/// A device certificate revoked: the device and its certificate's serial
/// (hex, as in the revocation list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub device: DeviceId,
    pub serial: String,
}

impl Revoked {
    fn of(d: &DeviceRow) -> Revoked {
        Revoked {
            device: d.id,
            serial: d.cert_serial.clone(),
        }
    }
}

impl std::fmt::Debug for Ids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ids").finish_non_exhaustive()
    }
}

fn refusal(r: Refusal) -> Error {
    match r {
        Refusal::RetryAfter(d) => Error::RetryAfter(d),
        Refusal::NotFound => Error::NotFound("no such verification, or it expired".into()),
        Refusal::Exhausted => {
            Error::Gone("this verification has no attempts left; start a new one".into())
        }
        Refusal::WrongCode {
            checks_left,
            next_check_in,
        } => Error::BadRequest(format!(
            "wrong code; {checks_left} attempts left, next in {} s",
            next_check_in.as_secs()
        )),
        Refusal::Busy => Error::Busy,
    }
}

impl Ids {
    pub fn new(
        config: Config,
        store: Store,
        kt: Transparency,
        ca: DeviceCa,
        sender: Box<dyn CodeSender>,
    ) -> Result<Ids, Error> {
        let rng = SystemRandom::new();
        let mut key = [0u8; 32];
        rng.fill(&mut key)
            .map_err(|_| Error::Internal("random".into()))?;
        Ok(Ids {
            verifications: Mutex::new(Verifications::new(config.verification.clone(), &key)),
            clock: verification::WallClock::now(),
            lookups: Mutex::new(RateLimiter::new(
                config.lookups_per_minute,
                Duration::from_secs(60),
            )),
            lookups_by_source: Mutex::new(RateLimiter::new(
                config.lookups_per_minute.saturating_mul(4),
                Duration::from_secs(60),
            )),
            shared_budgets: false,
            config,
            store,
            kt,
            ca,
            sender,
            rng,
            notifier: OnceLock::new(),
            devices: Cache::new(DEVICE_CACHE_SIZE),
            crl: Mutex::new(None),
            audits: tokio::sync::Semaphore::new(1),
        })
    }

    /// The key verification codes are stored under. Every node of a
    /// deployment needs the same one, or a code sent through one is not
    /// taken at another; without it each process picks its own.
    pub fn with_code_key(self, key: &[u8; 32]) -> Ids {
        Ids {
            verifications: Mutex::new(Verifications::new(self.config.verification.clone(), key)),
            ..self
        }
    }

    /// Lookup budgets in the database, spent by every instance on it:
    /// for a cluster, where a client spreading its lookups over the nodes
    /// must not get one budget per node.
    pub fn with_shared_budgets(self) -> Ids {
        Ids {
            shared_budgets: true,
            ..self
        }
    }

    /// Where account changes are pushed (once; later calls are ignored).
    pub fn set_notifier(&self, n: Arc<dyn AccountNotifier>) {
        let _ = self.notifier.set(n);
    }

    /// Forgets the devices held for authentication, so the next request
    /// of each reads the database: another node changed devices.
    pub fn forget_devices(&self) {
        self.devices.clear();
    }

    /// Tells the notifier, if there is one, of certificates revoked.
    fn tell_revoked<'a>(&self, rows: impl IntoIterator<Item = &'a DeviceRow>) {
        let revoked: Vec<Revoked> = rows.into_iter().map(Revoked::of).collect();
        if let (Some(n), false) = (self.notifier.get(), revoked.is_empty()) {
            n.revoked(revoked);
        }
    }

    /// Tells the devices `to` of `events`, through the notifier if there
    /// is one.
    fn tell(&self, to: &[DeviceRow], events: Vec<AccountEvent>) {
        let Some(n) = self.notifier.get() else {
            return;
        };
        let tokens: Vec<(DeviceId, String)> = to
            .iter()
            .flat_map(|d| {
                account_tokens(&d.push_tokens)
                    .into_iter()
                    .map(|t| (d.id, t))
            })
            .collect();
        if tokens.is_empty() {
            return;
        }
        for e in events {
            n.notify(tokens.clone(), e);
        }
    }

    fn random<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        // The system RNG does not fail on Linux after boot.
        self.rng
            .fill(&mut b)
            .expect("system random number generator");
        b
    }

    fn lock_verifications(&self) -> std::sync::MutexGuard<'_, Verifications> {
        // A panic while holding this lock would be our bug; the state
        // stays usable.
        self.verifications.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn view(&self, s: SessionState, now: Instant) -> VerificationView {
        VerificationView {
            id: wire::keys::hex(&s.id.0),
            handle: s.handle,
            expires_in: s.expires_at.saturating_duration_since(now),
            resend_in: s.next_send_at.map(|t| t.saturating_duration_since(now)),
            checks_left: s.checks_left,
        }
    }

    // ---- authentication ----------------------------------------------

    /// Checks a signed request and returns the signing key.
    pub fn verify_request(
        &self,
        header: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<PublicKey, Error> {
        let h =
            header.ok_or_else(|| Error::Unauthorized("missing Authorization: Parley …".into()))?;
        let auth = wire::request_auth::RequestAuth::parse(h)
            .map_err(|e| Error::Unauthorized(e.to_string()))?;
        auth.verify(
            method,
            path,
            body,
            unix_now().max(0) as u64,
            self.config.max_skew.as_secs(),
        )
        .map_err(|e| Error::Unauthorized(e.to_string()))?;
        Ok(auth.key)
    }

    /// The registered, active device with this key. Every signed request
    /// asks, so an active device is remembered for [`DEVICE_CACHE_TTL`]
    /// or until this service changes any device.
    pub async fn device(&self, key: &PublicKey) -> Result<AuthedDevice, Error> {
        let ticket = match self.devices.get(&key.0) {
            Ok((d, at)) if at.elapsed() < DEVICE_CACHE_TTL => {
                return Ok(AuthedDevice { device: d });
            }
            Ok(_) => self.devices.ticket(),
            Err(t) => t,
        };
        match self.store.device_by_key(&key.0).await? {
            Some(d) if d.revoked_at.is_none() => {
                if self.devices.is_full() {
                    self.devices.clear();
                }
                self.devices
                    .fill(ticket, [(key.0, (d.clone(), Instant::now()))]);
                Ok(AuthedDevice { device: d })
            }
            Some(_) => Err(Error::Forbidden(
                "this device was removed from its account".into(),
            )),
            None => Err(Error::Unauthorized(
                "this key is not a registered device".into(),
            )),
        }
    }

    // ---- accounts and devices ------------------------------------------

    /// First device: creates an account for freshly proven handles.
    pub async fn create_account(
        &self,
        key: &PublicKey,
        handle_tokens: &[String],
        device_list: Submitted<'_>,
        name: &str,
        capabilities: &[String],
    ) -> Result<Registered, Error> {
        let lists = device_list.parse()?;
        let me = single_device(&lists.account, key)?;
        self.spending(handle_tokens, async |proven| {
            let uris: BTreeSet<String> = proven.iter().map(|(h, _)| h.uri()).collect();
            self.create_account_inner(&lists, me, &uris, name, capabilities, Creation::New)
                .await
        })
        .await
    }

    /// Spends `handle_tokens` for `run`, and gives them back if it fails.
    pub(super) async fn spending<T>(
        &self,
        handle_tokens: &[String],
        run: impl AsyncFnOnce(&[(Handle, [u8; 32])]) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let proven = self.redeem(handle_tokens).await?;
        let r = run(&proven).await;
        if r.is_err() {
            self.restore(proven).await;
        }
        r
    }

    async fn create_account_inner(
        &self,
        lists: &Lists,
        me: DeviceId,
        proven_uris: &BTreeSet<String>,
        name: &str,
        capabilities: &[String],
        how: Creation<'_>,
    ) -> Result<Registered, Error> {
        let list = &lists.account;
        check_proven(list, proven_uris)?;
        let listed: BTreeSet<String> = list.list.handles.iter().cloned().collect();
        let reset = !matches!(how, Creation::New);
        let now = unix_now();
        let account_id = wire::keys::hex(&self.random::<16>());
        let (serial, cert) =
            self.ca
                .issue(me, &list.list.devices[0].identity_key, self.random(), now)?;
        let mut t = self.store.begin().await?;
        // The old accounts' devices, to be told of the reset.
        let mut retired = Vec::new();
        if reset {
            let mut old_accounts = BTreeSet::new();
            for uri in &listed {
                if let Some(a) = self.store.account_of_handle(uri).await? {
                    old_accounts.insert(a);
                }
            }
            for old in old_accounts {
                let active: Vec<DeviceRow> = self
                    .store
                    .devices_of(&old)
                    .await?
                    .into_iter()
                    .filter(|d| d.revoked_at.is_none())
                    .collect();
                self.retire_account(&mut t, &old, &listed, now).await?;
                retired.extend(active);
            }
        }
        tx::upsert_account(&mut t, &account_row(&account_id, list), now).await?;
        for (uri, value) in &lists.values {
            tx::bind_handle(&mut t, uri, &account_id).await?;
            tx::queue_publish(&mut t, uri, value, now).await?;
        }
        tx::insert_device(
            &mut t,
            &DeviceRow {
                id: me,
                account_id: account_id.clone(),
                identity_key: list.list.devices[0].identity_key.0.to_vec(),
                name: clean_name(name)?,
                capabilities: caps_json(capabilities)?,
                push_tokens: "[]".into(),
                cert_serial: serial,
                certificate: cert.clone(),
                created_at: now,
                revoked_at: None,
            },
        )
        .await?;
        tx::event(
            &mut t,
            &account_id,
            "device_added",
            Some(&me.to_string()),
            now,
        )
        .await?;
        let registered = Registered {
            account_id: account_id.clone(),
            device_id: me,
            certificate: cert.clone(),
            ca: self.ca.ca_pem().to_owned(),
        };
        if let Creation::PendingReset(id) = how {
            // Once: a second request finishing the same reset finds it done.
            if !tx::finish_reset(&mut t, id, &registered_json(&registered)).await? {
                return Err(Error::Conflict("the reset is no longer pending".into()));
            }
        }
        t.commit().await.map_err(Error::db)?;
        self.devices.clear();
        tracing::info!(account = %&account_id[..8], reset, "account created");
        let reset = AccountEvent {
            kind: "account_reset",
            device: None,
        };
        self.tell_revoked(&retired);
        self.tell(&retired, vec![reset]);
        Ok(registered)
    }

    /// Removes an account's devices and handles (inside `t`); handles in
    /// `keep` are not tombstoned (they are about to be rebound).
    async fn retire_account(
        &self,
        t: &mut sqlx::AnyConnection,
        account_id: &str,
        keep: &BTreeSet<String>,
        now: i64,
    ) -> Result<(), Error> {
        for d in self.store.devices_of(account_id).await? {
            if d.revoked_at.is_none() {
                tx::revoke_device(t, &d.id.to_string(), now).await?;
                tx::event(
                    t,
                    account_id,
                    "device_removed",
                    Some(&d.id.to_string()),
                    now,
                )
                .await?;
            }
        }
        tx::event(t, account_id, "account_reset", None, now).await?;
        for uri in self.store.handles_of(account_id).await? {
            tx::unbind_handle(t, &uri).await?;
            if !keep.contains(&uri) {
                tx::queue_publish(t, &uri, &DirectoryValue::Tombstone.encode(), now).await?;
            }
        }
        Ok(())
    }

    /// Replaces the account's signed device list: approve claimed devices,
    /// remove devices, add freshly proven handles or drop handles.
    pub async fn update_device_list(
        &self,
        me: &AuthedDevice,
        device_list: Submitted<'_>,
        handle_tokens: &[String],
        sealed_account_keys: &HashMap<String, Vec<u8>>,
        rotated_account_keys: &HashMap<String, Vec<u8>>,
    ) -> Result<i64, Error> {
        let lists = device_list.parse()?;
        let list = &lists.account;
        let account_id = me.device.account_id.clone();
        let account = self
            .store
            .account(&account_id)
            .await?
            .ok_or_else(|| Error::NotFound("account".into()))?;
        let same_key = list.list.account_key.0[..] == account.account_key[..];
        let from_current = list
            .rotated_from()
            .is_some_and(|k| k.0[..] == account.account_key[..]);
        if !same_key && !from_current {
            return Err(Error::Forbidden(
                "the list is signed by another account key that the current one did not endorse"
                    .into(),
            ));
        }
        if same_key && list.rotation.is_some() {
            return Err(Error::BadRequest(
                "the list rotates from a key that is not the account's".into(),
            ));
        }
        if (list.list.seq as i64) <= account.seq {
            return Err(Error::Conflict(format!(
                "seq must be greater than the current {}",
                account.seq
            )));
        }
        if list.list.devices.len() > self.config.max_devices {
            return Err(Error::BadRequest(format!(
                "at most {} devices per account",
                self.config.max_devices
            )));
        }
        self.spending(handle_tokens, async |proven| {
            let sealed = Sealed {
                links: sealed_account_keys,
                rotated: rotated_account_keys,
            };
            self.update_inner(
                me.device.id,
                &account_id,
                account.seq,
                &lists,
                proven,
                sealed,
            )
            .await
        })
        .await
    }

    async fn update_inner(
        &self,
        sender: DeviceId,
        account_id: &str,
        prev_seq: i64,
        lists: &Lists,
        proven: &[(Handle, [u8; 32])],
        sealed: Sealed<'_>,
    ) -> Result<i64, Error> {
        let list = &lists.account;
        let now = unix_now();
        let current_handles: BTreeSet<String> = self
            .store
            .handles_of(account_id)
            .await?
            .into_iter()
            .collect();
        let proven_uris: BTreeSet<String> = proven.iter().map(|(h, _)| h.uri()).collect();
        let new_handles: BTreeSet<String> = list.list.handles.iter().cloned().collect();
        for h in &new_handles {
            if !current_handles.contains(h) && !proven_uris.contains(h) {
                return Err(Error::Forbidden(format!(
                    "handle {h} is not on this account; prove it with a handle token"
                )));
            }
        }
        let existing: HashMap<DeviceId, DeviceRow> = self
            .store
            .devices_of(account_id)
            .await?
            .into_iter()
            .filter(|d| d.revoked_at.is_none())
            .map(|d| (d.id, d))
            .collect();
        let links = self.store.links_of(account_id, now).await?;
        let mut added = Vec::new();
        for d in &list.list.devices {
            match existing.get(&d.id) {
                Some(row) if row.identity_key[..] == d.identity_key.0[..] => {}
                Some(_) => {
                    return Err(Error::BadRequest(format!(
                        "device {} is listed with a different key than it registered",
                        d.id
                    )))
                }
                None => {
                    let link = links
                        .iter()
                        .find(|l| {
                            l.claim_device.as_deref() == Some(&d.id.to_string())
                                && l.claim_key.as_deref() == Some(&d.identity_key.0[..])
                        })
                        .ok_or_else(|| {
                            Error::BadRequest(format!(
                                "device {} is neither registered nor waiting on a link code of this account",
                                d.id
                            ))
                        })?;
                    added.push((d.clone(), link.clone()));
                }
            }
        }
        let removed: Vec<&DeviceRow> = existing
            .values()
            .filter(|row| list.list.device(row.id).is_none())
            .collect();
        let rotated = rotation_seals(sender, &existing, list, &removed, sealed.rotated)?;
        let events: Vec<AccountEvent> = added
            .iter()
            .map(|(d, _)| AccountEvent {
                kind: "device_added",
                device: Some(d.id),
            })
            .chain(removed.iter().map(|row| AccountEvent {
                kind: "device_removed",
                device: Some(row.id),
            }))
            .chain(list.rotation.as_ref().map(|_| AccountEvent {
                kind: "account_key_rotated",
                device: Some(sender),
            }))
            .collect();

        let mut t = self.store.begin().await?;
        tx::advance_account(&mut t, &account_row(account_id, list), prev_seq).await?;
        for (d, link) in &added {
            let (serial, cert) = self.ca.issue(d.id, &d.identity_key, self.random(), now)?;
            tx::insert_device(
                &mut t,
                &DeviceRow {
                    id: d.id,
                    account_id: account_id.to_owned(),
                    identity_key: d.identity_key.0.to_vec(),
                    name: link.claim_name.clone().unwrap_or_default(),
                    capabilities: link
                        .claim_capabilities
                        .clone()
                        .unwrap_or_else(|| "[]".into()),
                    push_tokens: "[]".into(),
                    cert_serial: serial,
                    certificate: cert,
                    created_at: now,
                    revoked_at: None,
                },
            )
            .await?;
            let code_hex = wire::keys::hex(&link.code_hash);
            tx::approve_link(
                &mut t,
                &link.code_hash,
                sealed.links.get(&code_hex).map(Vec::as_slice),
            )
            .await?;
            tx::event(
                &mut t,
                account_id,
                "device_added",
                Some(&d.id.to_string()),
                now,
            )
            .await?;
        }
        for row in &removed {
            let id = row.id.to_string();
            tx::revoke_device(&mut t, &id, now).await?;
            tx::scrub_device(&mut t, &id).await?;
            tx::event(&mut t, account_id, "device_removed", Some(&id), now).await?;
        }
        for (device, blob) in &rotated {
            let seq = list.list.seq as i64;
            tx::seal_rotated_key(&mut t, &device.to_string(), account_id, seq, blob).await?;
        }
        if list.rotation.is_some() {
            // The sender made the new key; an older one sealed to it is stale.
            let by = sender.to_string();
            tx::forget_rotated_key(&mut t, &by).await?;
            tx::event(&mut t, account_id, "account_key_rotated", Some(&by), now).await?;
        }
        for (uri, value) in &lists.values {
            tx::bind_handle(&mut t, uri, account_id).await?;
            tx::queue_publish(&mut t, uri, value, now).await?;
            if !current_handles.contains(uri) {
                tx::event(&mut t, account_id, "handle_added", None, now).await?;
            }
        }
        for uri in current_handles.difference(&new_handles) {
            tx::unbind_handle(&mut t, uri).await?;
            tx::queue_publish(&mut t, uri, &DirectoryValue::Tombstone.encode(), now).await?;
            tx::event(&mut t, account_id, "handle_removed", None, now).await?;
        }
        t.commit().await.map_err(Error::db)?;
        self.devices.clear();
        self.tell_revoked(removed.iter().copied());
        // Every (active) device that was on the account before, and still is.
        let told: Vec<DeviceRow> = existing
            .into_values()
            .filter(|row| list.list.device(row.id).is_some())
            .collect();
        self.tell(&told, events);
        Ok(list.list.seq as i64)
    }

    /// Deletes the account: every handle becomes a tombstone in the
    /// directory, every device is revoked, personal data is removed.
    pub async fn delete_account(&self, me: &AuthedDevice) -> Result<(), Error> {
        let now = unix_now();
        let account_id = &me.device.account_id;
        let mut t = self.store.begin().await?;
        for uri in self.store.handles_of(account_id).await? {
            tx::unbind_handle(&mut t, &uri).await?;
            tx::queue_publish(&mut t, &uri, &DirectoryValue::Tombstone.encode(), now).await?;
        }
        let devices = self.store.devices_of(account_id).await?;
        for d in &devices {
            let id = d.id.to_string();
            tx::revoke_device(&mut t, &id, now).await?;
            tx::scrub_device(&mut t, &id).await?;
        }
        tx::delete_account_rows(&mut t, account_id).await?;
        t.commit().await.map_err(Error::db)?;
        self.devices.clear();
        self.tell_revoked(devices.iter().filter(|d| d.revoked_at.is_none()));
        Ok(())
    }

    /// Replaces the push tokens of the requesting device.
    pub async fn set_push_tokens(&self, me: &AuthedDevice, json: &str) -> Result<(), Error> {
        self.store.set_push_tokens(me.device.id, json).await?;
        self.devices.clear();
        Ok(())
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }
}

fn session_id(s: &str) -> Result<SessionId, Error> {
    wire::keys::unhex(s)
        .and_then(|b| b.try_into().ok())
        .map(SessionId)
        .ok_or_else(|| Error::NotFound("no such verification, or it expired".into()))
}

/// A device list as a device sends it: the list, and the lists for
/// single handles (handle URI → wire encoding); see [`Lists`].
#[derive(Debug, Clone, Copy)]
pub struct Submitted<'a> {
    pub list: &'a [u8],
    pub per_handle: &'a BTreeMap<String, Vec<u8>>,
}

impl Submitted<'_> {
    fn parse(self) -> Result<Lists, Error> {
        Lists::parse(self.list, self.per_handle)
    }
}

/// A device list as a device submits it, checked: the account's list
/// (every handle; ids keeps it for the account's devices) and the value
/// to publish under each handle. A list naming several handles comes with
/// a list per handle, signed by the same key and otherwise the same, that
/// names only that handle: a lookup of one handle must not reveal the
/// account's others (a phone number its owner's email addresses).
#[derive(Debug, Clone)]
pub struct Lists {
    pub account: SignedDeviceList,
    pub values: BTreeMap<String, Vec<u8>>,
}

impl Lists {
    /// `per_handle`: handle URI → that handle's list (wire encoding).
    pub fn parse(list: &[u8], per_handle: &BTreeMap<String, Vec<u8>>) -> Result<Lists, Error> {
        let account = parse_signed_list(list)?;
        if let Some(uri) = per_handle
            .keys()
            .find(|u| !account.list.handles.contains(u))
        {
            return Err(Error::BadRequest(format!(
                "handle_lists names {uri}, which the device list does not"
            )));
        }
        let mut values = BTreeMap::new();
        for uri in &account.list.handles {
            let value = match per_handle.get(uri) {
                Some(bytes) => {
                    let one = parse_signed_list(bytes)?;
                    let same = one.list.account_key == account.list.account_key
                        && one.list.seq == account.list.seq
                        && one.list.devices == account.list.devices
                        && one.rotated_from() == account.rotated_from();
                    if one.list.handles != [uri.clone()] || !same {
                        return Err(Error::BadRequest(format!(
                            "the list for {uri} must name only {uri} and otherwise be the device list"
                        )));
                    }
                    bytes.clone()
                }
                None if account.list.handles.len() == 1 => account.encode(),
                None => {
                    return Err(Error::BadRequest(format!(
                        "a device list naming several handles needs a list for each in \
                         handle_lists (missing {uri})"
                    )))
                }
            };
            values.insert(uri.clone(), value);
        }
        Ok(Lists { account, values })
    }
}

fn parse_signed_list(b: &[u8]) -> Result<SignedDeviceList, Error> {
    match DirectoryValue::decode(b) {
        Ok(DirectoryValue::Active(l)) => {
            l.verify()
                .map_err(|e| Error::BadRequest(format!("device list: {e}")))?;
            Ok(l)
        }
        Ok(DirectoryValue::Tombstone) => Err(Error::BadRequest(
            "device list: a tombstone is not a device list".into(),
        )),
        Err(e) => Err(Error::BadRequest(format!("device list: {e}"))),
    }
}

/// A new account's list holds exactly the registering device.
/// The account row that holds `list`.
/// The account keys a device-list update hands on: to devices approved
/// through a link (by link code hash), and, when the list rotates the
/// key, to the devices that stay (by device id).
#[derive(Clone, Copy)]
struct Sealed<'a> {
    links: &'a HashMap<String, Vec<u8>>,
    rotated: &'a HashMap<String, Vec<u8>>,
}

/// Largest sealed account key accepted (65-byte ephemeral key, a PKCS#8
/// P-256 key of ~140 bytes, 16-byte tag).
const MAX_SEALED_KEY: usize = 512;

/// Checks a rotation's sealed keys: removing a device must rotate the
/// account key (the removed device holds the old one), and a rotation
/// must seal the new key to every device that stays but the sender, and
/// to no one else. Returns them by device.
fn rotation_seals<'a>(
    sender: DeviceId,
    existing: &HashMap<DeviceId, DeviceRow>,
    list: &SignedDeviceList,
    removed: &[&DeviceRow],
    rotated: &'a HashMap<String, Vec<u8>>,
) -> Result<Vec<(DeviceId, &'a [u8])>, Error> {
    if list.rotation.is_none() {
        if !removed.is_empty() {
            return Err(Error::BadRequest(
                "removing a device rotates the account key: sign the list with a new key \
                 that the current one endorses, and seal the new key to every device that stays"
                    .into(),
            ));
        }
        if !rotated.is_empty() {
            return Err(Error::BadRequest(
                "rotated_account_keys without a key rotation".into(),
            ));
        }
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for id in existing.keys() {
        if *id == sender || list.list.device(*id).is_none() {
            continue;
        }
        let blob = rotated.get(&id.to_string()).ok_or_else(|| {
            Error::BadRequest(format!("the new account key is not sealed to device {id}"))
        })?;
        if blob.len() > MAX_SEALED_KEY {
            return Err(Error::BadRequest(format!(
                "a sealed account key is at most {MAX_SEALED_KEY} bytes"
            )));
        }
        out.push((*id, blob.as_slice()));
    }
    if out.len() != rotated.len() {
        return Err(Error::BadRequest(
            "rotated_account_keys names a device that does not stay on the account".into(),
        ));
    }
    Ok(out)
}

fn account_row(id: &str, list: &SignedDeviceList) -> AccountRow {
    AccountRow {
        id: id.to_owned(),
        account_key: list.list.account_key.0.to_vec(),
        seq: list.list.seq as i64,
        list: list.encode(),
    }
}

/// The device list must name exactly the handles the tokens proved.
fn check_proven(list: &SignedDeviceList, proven_uris: &BTreeSet<String>) -> Result<(), Error> {
    let listed: BTreeSet<String> = list.list.handles.iter().cloned().collect();
    if *proven_uris != listed {
        return Err(Error::BadRequest(
            "the device list must name exactly the handles proven by the handle tokens".into(),
        ));
    }
    Ok(())
}

/// A registration as stored with a finished reset.
fn registered_json(r: &Registered) -> String {
    serde_json::json!({
        "account_id": r.account_id,
        "device_id": r.device_id.to_string(),
        "certificate": r.certificate,
        "ca": r.ca,
    })
    .to_string()
}

fn registered_of(row: &crate::store::ResetRow) -> Result<Registered, Error> {
    let bad = || Error::Internal("stored reset result".into());
    let v: serde_json::Value =
        serde_json::from_str(row.result.as_deref().ok_or_else(bad)?).map_err(|_| bad())?;
    let s = |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(bad);
    Ok(Registered {
        account_id: s("account_id")?,
        device_id: wire::keys::unhex(&s("device_id")?)
            .and_then(|b| b.try_into().ok())
            .map(DeviceId)
            .ok_or_else(bad)?,
        certificate: s("certificate")?,
        ca: s("ca")?,
    })
}

fn single_device(list: &SignedDeviceList, key: &PublicKey) -> Result<DeviceId, Error> {
    match &list.list.devices[..] {
        [d] if d.identity_key == *key => Ok(d.id),
        _ => Err(Error::BadRequest(
            "a new account's device list must hold exactly the registering device".into(),
        )),
    }
}

fn clean_name(name: &str) -> Result<String, Error> {
    let n = name.trim();
    if n.chars().count() > 64 || n.chars().any(char::is_control) {
        return Err(Error::BadRequest(
            "device name: at most 64 characters, no control characters".into(),
        ));
    }
    Ok(n.to_owned())
}

fn caps_json(caps: &[String]) -> Result<String, Error> {
    if caps.len() > 32 || caps.iter().any(|c| c.is_empty() || c.len() > 32) {
        return Err(Error::BadRequest(
            "capabilities: at most 32 names of 1 to 32 characters".into(),
        ));
    }
    serde_json::to_string(caps).map_err(|e| Error::Internal(e.to_string()))
}

const LINK_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// 16 Crockford base32 characters (80 bits), shown as 4 groups of 4.
fn link_code(random: &[u8; 10]) -> String {
    let mut bits: u128 = 0;
    for b in random {
        bits = (bits << 8) | *b as u128;
    }
    let chars: String = (0..16)
        .map(|i| LINK_ALPHABET[((bits >> (75 - 5 * i)) & 31) as usize] as char)
        .collect();
    format!(
        "{}-{}-{}-{}",
        &chars[0..4],
        &chars[4..8],
        &chars[8..12],
        &chars[12..16]
    )
}

/// Upper-cases, drops separators and maps the look-alikes Crockford allows.
pub fn normalise_link_code(code: &str) -> String {
    let c: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        })
        .collect();
    if c.len() == 16 {
        format!("{}-{}-{}-{}", &c[0..4], &c[4..8], &c[8..12], &c[12..16])
    } else {
        c
    }
}

fn link_hash(code: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, code.as_bytes())
        .as_ref()
        .to_vec()
}

/// A device's courier tokens for [`wire::push::ACCOUNT_TOPIC`], from the
/// JSON it registered (`[{"topic": …, "token": …}]`).
fn account_tokens(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["topic"] == wire::push::ACCOUNT_TOPIC)
        .filter_map(|t| t["token"].as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_codes_are_readable_and_normalise() {
        let c = link_code(&[0xff; 10]);
        assert_eq!(c, "ZZZZ-ZZZZ-ZZZZ-ZZZZ");
        let c = link_code(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(c.len(), 19);
        assert_eq!(normalise_link_code(&c.to_lowercase().replace('-', " ")), c);
        assert_eq!(
            normalise_link_code("o0il-0000-0000-0000"),
            "0011-0000-0000-0000"
        );
    }
}
