//! Allocation quotas shared by all workers: per user, per client IP, total.

use crate::config::Config;
use crate::message::ErrorCode;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Default)]
pub(super) struct Quotas {
    total: u32,
    per_user: HashMap<String, u32>,
    per_ip: HashMap<IpAddr, u32>,
}

impl Quotas {
    /// Counts one more allocation, or says which limit it hits: 508 when the
    /// server is full, 486 for a user's or an address's quota (RFC 8656 §7.2).
    pub fn acquire(&mut self, user: &str, ip: IpAddr, cfg: &Config) -> Result<(), ErrorCode> {
        if self.total >= cfg.max_allocations {
            return Err(ErrorCode::INSUFFICIENT_CAPACITY);
        }
        let u = self.per_user.get(user).copied().unwrap_or(0);
        let i = self.per_ip.get(&ip).copied().unwrap_or(0);
        if u >= cfg.max_allocations_per_user || i >= cfg.max_allocations_per_ip {
            return Err(ErrorCode::ALLOCATION_QUOTA_REACHED);
        }
        self.total += 1;
        *self.per_user.entry(user.to_owned()).or_default() += 1;
        *self.per_ip.entry(ip).or_default() += 1;
        Ok(())
    }

    pub fn release(&mut self, user: &str, ip: IpAddr) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_user.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}
