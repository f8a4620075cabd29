//! Handles: the phone numbers and email addresses people are reached by.
//!
//! A handle has one canonical form, used everywhere: as the key
//! transparency label, in the database and in SIP URIs.
//!
//! - **Phone numbers** are E.164: `+` followed by the country code and the
//!   national number, no spaces (`+14155550123`). Input may carry spaces,
//!   dashes, dots and parentheses, but must start with `+`; the number must
//!   be valid for its country's numbering plan (libphonenumber metadata).
//! - **Email addresses** are case-folded as a whole: the address is trimmed
//!   and lower-cased (Unicode simple lower-casing). Many providers treat
//!   the local part case-sensitively in theory; none do in practice, and
//!   folding prevents two accounts for `Alice@x` and `alice@x`. No other
//!   rewriting (dots, `+tags`) is done: those are provider-specific. The
//!   domain must be a DNS name of letters, digits and hyphens (IDNs in
//!   their `xn--` form); the local part is 1–64 characters of printable
//!   non-space characters other than `<>()[]\,;:@"`; the whole address is at
//!   most 254 characters.

use std::fmt;

/// A canonical handle.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Handle {
    /// E.164, with the leading `+`.
    Phone(String),
    /// Case-folded email address.
    Email(String),
}

/// Why a handle was refused. The message is meant for the person typing it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    #[error("a phone number must start with + and the country code, like +14155550123")]
    PhoneNeedsPlus,
    #[error("not a valid phone number for its country: {0}")]
    PhoneInvalid(String),
    #[error("an email address needs exactly one @")]
    EmailAt,
    #[error("email address is longer than 254 characters")]
    EmailTooLong,
    #[error("the part of the email address before @ must be 1 to 64 characters without spaces or <>()[]\\,;:\"")]
    EmailLocal,
    #[error("the email domain must be a DNS name such as example.com")]
    EmailDomain,
    #[error("a handle must be a phone number (+14155550123) or an email address")]
    Unknown,
}

impl Handle {
    /// Parses user input into a canonical handle. Anything containing `@`
    /// is an email address; anything starting with `+` is a phone number.
    pub fn parse(input: &str) -> Result<Handle, HandleError> {
        let s = input.trim();
        if let Some(rest) = s.strip_prefix("tel:") {
            return Self::parse_phone(rest);
        }
        if let Some(rest) = s.strip_prefix("mailto:") {
            return Self::parse_email(rest);
        }
        if s.contains('@') {
            Self::parse_email(s)
        } else if s.starts_with('+') || s.starts_with(|c: char| c.is_ascii_digit()) {
            Self::parse_phone(s)
        } else {
            Err(HandleError::Unknown)
        }
    }

    fn parse_phone(s: &str) -> Result<Handle, HandleError> {
        let s = s.trim();
        if !s.starts_with('+') {
            return Err(HandleError::PhoneNeedsPlus);
        }
        if s.len() > 32
            || !s[1..]
                .chars()
                .all(|c| c.is_ascii_digit() || " -.()".contains(c))
        {
            return Err(HandleError::PhoneInvalid(
                "only digits, spaces, dashes, dots and parentheses may follow +".into(),
            ));
        }
        let n =
            phonenumber::parse(None, s).map_err(|e| HandleError::PhoneInvalid(e.to_string()))?;
        if !phonenumber::is_valid(&n) {
            return Err(HandleError::PhoneInvalid(
                "no such number in the country's numbering plan".into(),
            ));
        }
        Ok(Handle::Phone(
            n.format().mode(phonenumber::Mode::E164).to_string(),
        ))
    }

    fn parse_email(s: &str) -> Result<Handle, HandleError> {
        let folded = s.trim().to_lowercase();
        if folded.chars().count() > 254 {
            return Err(HandleError::EmailTooLong);
        }
        let mut parts = folded.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(HandleError::EmailAt);
        };
        let local_ok = (1..=64).contains(&local.chars().count())
            && local
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && !"<>()[]\\,;:\"".contains(c))
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..");
        if !local_ok {
            return Err(HandleError::EmailLocal);
        }
        let domain_ok = domain.len() <= 253
            && domain.contains('.')
            && domain.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !domain_ok {
            return Err(HandleError::EmailDomain);
        }
        Ok(Handle::Email(folded))
    }

    /// The canonical text without a scheme: `+14155550123` or `alice@example.com`.
    pub fn as_str(&self) -> &str {
        match self {
            Handle::Phone(s) | Handle::Email(s) => s,
        }
    }

    /// The URI form, `tel:+14155550123` or `mailto:alice@example.com`,
    /// which is also the key transparency label.
    pub fn uri(&self) -> String {
        match self {
            Handle::Phone(s) => format!("tel:{s}"),
            Handle::Email(s) => format!("mailto:{s}"),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Handle::Phone(_) => "phone",
            Handle::Email(_) => "email",
        }
    }

    /// A form safe for logs at `info`: the kind and the last two characters.
    pub fn redacted(&self) -> String {
        let s = self.as_str();
        let tail: String = s
            .chars()
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("{}:…{tail}", self.kind())
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_normalise_to_e164() {
        for input in [
            "+1 415 555 0123",
            "+1 (415) 555-0123",
            "+1.415.555.0123",
            "tel:+14155550123",
        ] {
            assert_eq!(
                Handle::parse(input),
                Ok(Handle::Phone("+14155550123".into())),
                "{input}"
            );
        }
        assert_eq!(
            Handle::parse("+44 20 7946 0958"),
            Ok(Handle::Phone("+442079460958".into()))
        );
    }

    #[test]
    fn invalid_phone_numbers_are_refused_clearly() {
        assert_eq!(
            Handle::parse("4155550123"),
            Err(HandleError::PhoneNeedsPlus)
        );
        assert!(matches!(
            Handle::parse("+1 415"),
            Err(HandleError::PhoneInvalid(_))
        ));
        assert!(matches!(
            Handle::parse("+999 1234567"),
            Err(HandleError::PhoneInvalid(_))
        ));
        assert!(matches!(
            Handle::parse("+1 415 555 0123 ext"),
            Err(HandleError::PhoneInvalid(_))
        ));
    }

    #[test]
    fn emails_are_case_folded() {
        assert_eq!(
            Handle::parse("  Alice.Smith@Example.COM "),
            Ok(Handle::Email("alice.smith@example.com".into()))
        );
        assert_eq!(
            Handle::parse("mailto:Bob+tag@xn--bcher-kva.example"),
            Ok(Handle::Email("bob+tag@xn--bcher-kva.example".into()))
        );
        assert_eq!(
            Handle::parse("ÉLODIE@example.fr"),
            Ok(Handle::Email("élodie@example.fr".into()))
        );
    }

    #[test]
    fn invalid_emails_are_refused_clearly() {
        assert_eq!(Handle::parse("a@b@c.com"), Err(HandleError::EmailAt));
        assert_eq!(Handle::parse("@example.com"), Err(HandleError::EmailLocal));
        assert_eq!(
            Handle::parse("a b@example.com"),
            Err(HandleError::EmailLocal)
        );
        assert_eq!(
            Handle::parse("a..b@example.com"),
            Err(HandleError::EmailLocal)
        );
        assert_eq!(
            Handle::parse("alice@localhost"),
            Err(HandleError::EmailDomain)
        );
        assert_eq!(Handle::parse("alice@-x.com"), Err(HandleError::EmailDomain));
        assert_eq!(
            Handle::parse("alice@exa_mple.com"),
            Err(HandleError::EmailDomain)
        );
        let long = format!("{}@example.com", "a".repeat(65));
        assert_eq!(Handle::parse(&long), Err(HandleError::EmailLocal));
        assert_eq!(Handle::parse("alice"), Err(HandleError::Unknown));
    }

    #[test]
    fn uri_and_redaction() {
        let h = Handle::parse("+14155550123").unwrap();
        assert_eq!(h.uri(), "tel:+14155550123");
        assert_eq!(h.redacted(), "phone:…23");
        assert!(!h.redacted().contains("4155"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_is_idempotent(s in "\\PC{0,80}") {
            if let Ok(h) = Handle::parse(&s) {
                proptest::prop_assert_eq!(Handle::parse(&h.uri()), Ok(h.clone()));
                proptest::prop_assert_eq!(Handle::parse(h.as_str()), Ok(h));
            }
        }
    }
}
