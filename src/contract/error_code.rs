//! Error codes of SPEC §3.4 and the status ↔ code rules.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Final status of a step (SPEC §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The block produced outputs.
    Success,
    /// The block failed; `error_code` says how.
    Error,
    /// A deadline or attempt timeout ended the step.
    Timeout,
    /// A cancel request or shutdown ended the step.
    Cancelled,
}

impl Status {
    /// The wire spelling, also used as the `execution_status` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Cancelled => "cancelled",
        }
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $num:literal, $name:literal;)*) => {
        /// A failure code of SPEC §3.4.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The wire spelling (`"NETWORK_ERROR"`).
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// The numeric code of the table (`3001`).
            pub fn number(self) -> u16 {
                match self { $(ErrorCode::$variant => $num,)* }
            }
        }

        impl FromStr for ErrorCode {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($name => Ok(ErrorCode::$variant),)* _ => Err(()) }
            }
        }
    };
}

error_codes! {
    /// A payload value is wrong.
    InvalidInput = 1001, "INVALID_INPUT";
    /// A payload field is missing.
    MissingRequiredField = 1002, "MISSING_REQUIRED_FIELD";
    /// A payload field has the wrong type or format.
    InvalidFormat = 1003, "INVALID_FORMAT";
    /// The block failed for another reason.
    ExecutionFailed = 2001, "EXECUTION_FAILED";
    /// A resource (file, helper slot) is not available.
    ResourceUnavailable = 2002, "RESOURCE_UNAVAILABLE";
    /// Path outside the FS root, EACCES.
    PermissionDenied = 2003, "PERMISSION_DENIED";
    /// A quota was exceeded.
    QuotaExceeded = 2004, "QUOTA_EXCEEDED";
    /// Refused, reset, DNS or TLS failure.
    NetworkError = 3001, "NETWORK_ERROR";
    /// Connect did not finish in time.
    ConnectionTimeout = 3002, "CONNECTION_TIMEOUT";
    /// A non-2xx HTTP response.
    HttpError = 3003, "HTTP_ERROR";
    /// A worker bug or a caught panic in a block.
    InternalError = 4001, "INTERNAL_ERROR";
    /// The worker is overloaded.
    SystemOverload = 4002, "SYSTEM_OVERLOAD";
    /// Cancel request or shutdown.
    CancelledByUser = 5001, "CANCELLED_BY_USER";
    /// Deadline or attempt timeout.
    CancelledByTimeout = 5002, "CANCELLED_BY_TIMEOUT";
}

impl ErrorCode {
    /// The status a step ending with this code has (SPEC §3.4).
    pub fn status(self) -> Status {
        match self {
            ErrorCode::CancelledByTimeout => Status::Timeout,
            ErrorCode::CancelledByUser => Status::Cancelled,
            _ => Status::Error,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("unknown error code {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_numbers_match_the_table() {
        assert_eq!(ErrorCode::ALL.len(), 14);
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(*code));
        }
        assert_eq!(ErrorCode::InvalidInput.number(), 1001);
        assert_eq!(ErrorCode::HttpError.number(), 3003);
        assert_eq!(ErrorCode::CancelledByTimeout.number(), 5002);
    }

    #[test]
    fn status_follows_code() {
        assert_eq!(ErrorCode::CancelledByTimeout.status(), Status::Timeout);
        assert_eq!(ErrorCode::CancelledByUser.status(), Status::Cancelled);
        assert_eq!(ErrorCode::HttpError.status(), Status::Error);
    }
}
