//! Consent per purpose and channel.
//!
//! A customer's consent is a grid of [`Purpose`] × [`Channel`]; each cell is
//! [`ConsentState::Granted`], [`ConsentState::Denied`] or unset. An unset
//! cell falls back to the purpose's default ([`Purpose::granted_by_default`]):
//! marketing and surveys need an explicit grant (opt-in), profiling and
//! personalisation are granted unless denied (legitimate interest, opt-out).

use crate::Violation;

/// Why the customer's data may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    /// Marketing messages and offers.
    Marketing,
    /// Building a profile from behaviour (scoring, segmentation).
    Profiling,
    /// Surveys and questionnaires.
    Surveys,
    /// Personalised content.
    Personalisation,
}

/// Every purpose.
pub const ALL_PURPOSES: [Purpose; 4] = [
    Purpose::Marketing,
    Purpose::Profiling,
    Purpose::Surveys,
    Purpose::Personalisation,
];

impl Purpose {
    /// Stable storage code.
    pub fn code(self) -> i16 {
        match self {
            Self::Marketing => 1,
            Self::Profiling => 2,
            Self::Surveys => 3,
            Self::Personalisation => 4,
        }
    }

    /// The purpose of a storage code.
    pub fn from_code(code: i16) -> Option<Self> {
        ALL_PURPOSES.into_iter().find(|p| p.code() == code)
    }

    /// Whether an unset consent for this purpose counts as granted.
    pub fn granted_by_default(self) -> bool {
        matches!(self, Self::Profiling | Self::Personalisation)
    }
}

/// How the customer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// E-mail.
    Email,
    /// Text message.
    Sms,
    /// Push notification.
    Push,
    /// Phone call.
    Phone,
    /// Inside the product.
    InApp,
}

/// Every channel.
pub const ALL_CHANNELS: [Channel; 5] = [
    Channel::Email,
    Channel::Sms,
    Channel::Push,
    Channel::Phone,
    Channel::InApp,
];

impl Channel {
    /// Stable storage code.
    pub fn code(self) -> i16 {
        match self {
            Self::Email => 1,
            Self::Sms => 2,
            Self::Push => 3,
            Self::Phone => 4,
            Self::InApp => 5,
        }
    }

    /// The channel of a storage code.
    pub fn from_code(code: i16) -> Option<Self> {
        ALL_CHANNELS.into_iter().find(|c| c.code() == code)
    }
}

/// What the customer said for one purpose and channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsentState {
    /// Never said, or reset: the purpose's default applies.
    Unset,
    /// Agreed.
    Granted,
    /// Refused or withdrew.
    Denied,
}

impl ConsentState {
    /// Stable storage code.
    pub fn code(self) -> i16 {
        match self {
            Self::Unset => 0,
            Self::Granted => 1,
            Self::Denied => 2,
        }
    }

    /// The state of a storage code.
    pub fn from_code(code: i16) -> Option<Self> {
        [Self::Unset, Self::Granted, Self::Denied]
            .into_iter()
            .find(|s| s.code() == code)
    }

    /// Whether the data may be used for `purpose` in this state.
    pub fn is_granted(self, purpose: Purpose) -> bool {
        match self {
            Self::Granted => true,
            Self::Denied => false,
            Self::Unset => purpose.granted_by_default(),
        }
    }

    /// The stricter of two states, as a merge of two profiles keeps it: a
    /// denial wins over anything, a grant over unset.
    pub fn strictest(self, other: Self) -> Self {
        match (self, other) {
            (Self::Denied, _) | (_, Self::Denied) => Self::Denied,
            (Self::Granted, _) | (_, Self::Granted) => Self::Granted,
            _ => Self::Unset,
        }
    }
}

/// Where a consent statement came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsentSource {
    /// A form the customer filled in.
    Form,
    /// A bulk import.
    Import,
    /// An API caller.
    Api,
    /// A support agent, on the customer's word.
    Support,
    /// A merge of duplicate profiles kept the strictest consent.
    Merge,
}

impl ConsentSource {
    /// Stable storage code.
    pub fn code(self) -> i16 {
        match self {
            Self::Form => 1,
            Self::Import => 2,
            Self::Api => 3,
            Self::Support => 4,
            Self::Merge => 5,
        }
    }

    /// The source of a storage code.
    pub fn from_code(code: i16) -> Option<Self> {
        [
            Self::Form,
            Self::Import,
            Self::Api,
            Self::Support,
            Self::Merge,
        ]
        .into_iter()
        .find(|s| s.code() == code)
    }
}

/// One statement of a SetConsent call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsentSetting {
    /// The purpose.
    pub purpose: Purpose,
    /// The channel.
    pub channel: Channel,
    /// The new state.
    pub state: ConsentState,
}

/// Refuses a list of settings that names one purpose and channel twice
/// (`field` names the list; the violation names the second entry).
pub fn distinct(field: &str, settings: &[ConsentSetting]) -> Result<(), Violation> {
    for (i, s) in settings.iter().enumerate() {
        if let Some(j) = settings[..i]
            .iter()
            .position(|o| o.purpose == s.purpose && o.channel == s.channel)
        {
            return Err(Violation::new(
                format!("{field}[{i}]"),
                format!("repeats the purpose and channel of {field}[{j}]"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_falls_back_to_the_purpose_default() {
        assert!(!ConsentState::Unset.is_granted(Purpose::Marketing));
        assert!(!ConsentState::Unset.is_granted(Purpose::Surveys));
        assert!(ConsentState::Unset.is_granted(Purpose::Profiling));
        assert!(ConsentState::Unset.is_granted(Purpose::Personalisation));
        assert!(ConsentState::Granted.is_granted(Purpose::Marketing));
        assert!(!ConsentState::Denied.is_granted(Purpose::Profiling));
    }

    #[test]
    fn a_denial_is_the_strictest() {
        use ConsentState::*;
        assert_eq!(Granted.strictest(Denied), Denied);
        assert_eq!(Unset.strictest(Denied), Denied);
        assert_eq!(Unset.strictest(Granted), Granted);
        assert_eq!(Unset.strictest(Unset), Unset);
    }

    #[test]
    fn codes_round_trip() {
        for p in ALL_PURPOSES {
            assert_eq!(Purpose::from_code(p.code()), Some(p));
        }
        for c in ALL_CHANNELS {
            assert_eq!(Channel::from_code(c.code()), Some(c));
        }
        assert_eq!(Purpose::from_code(9), None);
    }

    #[test]
    fn a_repeated_cell_is_named() {
        let s = ConsentSetting {
            purpose: Purpose::Marketing,
            channel: Channel::Email,
            state: ConsentState::Granted,
        };
        let other = ConsentSetting {
            channel: Channel::Sms,
            ..s
        };
        assert!(distinct("settings", &[s, other]).is_ok());
        assert_eq!(
            distinct("settings", &[s, other, s]).unwrap_err().field,
            "settings[2]"
        );
    }
}
