//! Delivering verification codes. The development default writes each
//! message as a file in an outbox directory.

use std::path::PathBuf;

use wire::Handle;

use crate::core::verification::Code;
use crate::error::Error;

/// Something that can deliver a code to a handle.
pub trait CodeSender: Send + Sync + std::fmt::Debug {
    fn send(&self, to: &Handle, code: &Code) -> Result<(), Error>;
}

/// Writes `<outbox>/<unix-nanos>-<handle>.txt` containing a mail-like
/// message. For development and tests only: codes land on disk.
#[derive(Debug, Clone)]
pub struct OutboxSender {
    pub dir: PathBuf,
}

impl OutboxSender {
    /// The file name used for a handle (characters other than
    /// `[A-Za-z0-9@.+-]` become `_`).
    pub fn file_stem(to: &Handle) -> String {
        to.as_str()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "@.+-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

impl CodeSender for OutboxSender {
    fn send(&self, to: &Handle, code: &Code) -> Result<(), Error> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Internal(format!("outbox {}: {e}", self.dir.display())))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = self
            .dir
            .join(format!("{nanos}-{}.txt", Self::file_stem(to)));
        let body = format!(
            "To: {to}\nSubject: Your Parley code\n\nYour Parley verification code is {}.\nIt expires in 10 minutes. Never share it.\n",
            code.0
        );
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::Internal(format!("outbox {}: {e}", path.display())))
    }
}
