//! Bearer-token authentication and per-rpc role checks.
//!
//! The server layer ([`crate::server`]) verifies the `authorization: Bearer
//! <jwt>` header of every call (health checks excepted) and stores the
//! [`Principal`] in the request extensions. Each rpc then calls
//! [`authorize`] with the roles it allows. `admin` is allowed everywhere.
//!
//! Fail closed: [`authorize`] refuses a request that carries no
//! [`Principal`] (UNAUTHENTICATED). Without auth configured the server layer
//! gives every call the local principal (all roles) explicitly, and both the
//! config and the server itself refuse a non-loopback listener in that case
//! unless `--insecure` is given.
//!
//! Tokens carry an audience (`aud`, [`DEFAULT_AUDIENCE`] unless
//! `auth.audience` says otherwise) and verification requires it, so a token
//! minted for another system is refused. Exactly one of an HS256 secret and
//! an RS256 public key may be configured.

use crate::config::AuthConfig;
use crate::error::Error;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;

/// The audience (`aud`) tokens are minted for and checked against when
/// `auth.audience` is not configured.
pub const DEFAULT_AUDIENCE: &str = "clm";

/// A role a token may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Runs campaigns, manages customers and segments.
    Marketer,
    /// Owns segments.
    SegmentOwner,
    /// Reads reports and data.
    Analyst,
    /// Manages data quality, consent and erasure.
    DataSteward,
    /// Another CLM service or an internal platform.
    Service,
}

impl Role {
    /// Parses the claim spelling (`segment_owner`).
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "marketer" => Role::Marketer,
            "segment_owner" => Role::SegmentOwner,
            "analyst" => Role::Analyst,
            "data_steward" => Role::DataSteward,
            "service" => Role::Service,
            _ => return None,
        })
    }

    /// Claim spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Marketer => "marketer",
            Role::SegmentOwner => "segment_owner",
            Role::Analyst => "analyst",
            Role::DataSteward => "data_steward",
            Role::Service => "service",
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token subject (`sub`), used as the actor in audit records.
    pub subject: String,
    /// Roles granted.
    pub roles: Vec<Role>,
}

impl Principal {
    /// The caller when auth is off: all roles.
    pub fn local() -> Self {
        Self {
            subject: "local".into(),
            roles: vec![Role::Admin],
        }
    }

    /// Whether any of `allowed` (or admin) is held.
    pub fn has_any(&self, allowed: &[Role]) -> bool {
        self.roles
            .iter()
            .any(|r| *r == Role::Admin || allowed.contains(r))
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

impl Authenticator {
    /// Builds a verifier from config; `None` when auth is off.
    pub fn from_config(c: &AuthConfig) -> anyhow::Result<Option<Self>> {
        if c.hs256_secret.is_some() && c.rs256_public_key_file.is_some() {
            anyhow::bail!(
                "auth: configure either auth.hs256_secret or auth.rs256_public_key_file, not both"
            );
        }
        let (key, alg) = if let Some(secret) = &c.hs256_secret {
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &c.rs256_public_key_file {
            let pem = std::fs::read(path)?;
            (DecodingKey::from_rsa_pem(&pem)?, Algorithm::RS256)
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        if let Some(iss) = &c.issuer {
            validation.set_issuer(&[iss]);
        }
        validation.set_audience(&[audience(c)]);
        Ok(Some(Self { key, validation }))
    }

    /// Verifies an `authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal, Error> {
        let header = header.ok_or_else(|| {
            Error::Unauthenticated("missing authorization: Bearer <token>".into())
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Error::Unauthenticated("authorization must be 'Bearer <token>'".into())
            })?;
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Error::Unauthenticated(format!("invalid token: {e}")))?;
        let roles = data
            .claims
            .roles
            .iter()
            .filter_map(|r| Role::parse(r))
            .collect();
        Ok(Principal {
            subject: data.claims.sub,
            roles,
        })
    }
}

/// The audience tokens are minted for and checked against under `c`.
pub fn audience(c: &AuthConfig) -> &str {
    c.audience
        .as_deref()
        .filter(|a| !a.is_empty())
        .unwrap_or(DEFAULT_AUDIENCE)
}

/// Checks that the caller of `request` holds one of `allowed` and returns
/// it. A request without a [`Principal`] (one that did not come through the
/// server layer) is UNAUTHENTICATED, never admin.
pub fn authorize<T>(request: &tonic::Request<T>, allowed: &[Role]) -> Result<Principal, Error> {
    let Some(principal) = request.extensions().get::<Principal>().cloned() else {
        return Err(Error::Unauthenticated(
            "no authenticated caller for this call".into(),
        ));
    };
    if principal.has_any(allowed) {
        Ok(principal)
    } else {
        let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        Err(Error::PermissionDenied(format!(
            "this rpc needs one of the roles: admin, {}",
            names.join(", ")
        )))
    }
}

/// Mints an HS256 token for [`DEFAULT_AUDIENCE`] (for tests, scripts and
/// service-to-service calls). Use [`mint`] to follow a configured audience
/// and issuer.
pub fn mint_hs256(
    secret: &str,
    subject: &str,
    roles: &[Role],
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    mint_hs256_with(secret, DEFAULT_AUDIENCE, None, subject, roles, ttl)
}

/// Mints an HS256 token that `config` verifies: its secret, its audience
/// and (if set) its issuer. Fails when no HS256 secret is configured.
pub fn mint(
    config: &AuthConfig,
    subject: &str,
    roles: &[Role],
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    let Some(secret) = &config.hs256_secret else {
        anyhow::bail!("auth.hs256_secret is not configured: cannot mint tokens");
    };
    mint_hs256_with(
        secret,
        audience(config),
        config.issuer.as_deref(),
        subject,
        roles,
        ttl,
    )
}

/// Mints an HS256 token for `audience`, with an `iss` claim when `issuer` is given.
pub fn mint_hs256_with(
    secret: &str,
    audience: &str,
    issuer: Option<&str>,
    subject: &str,
    roles: &[Role],
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        sub: &'a str,
        aud: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
        roles: Vec<&'static str>,
        exp: u64,
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + ttl.as_secs();
    let claims = Out {
        sub: subject,
        aud: audience,
        iss: issuer,
        roles: roles.iter().map(|r| r.as_str()).collect(),
        exp,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth() -> Authenticator {
        let c = AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..Default::default()
        };
        Authenticator::from_config(&c)
            .expect("config")
            .expect("enabled")
    }

    #[test]
    fn valid_token_yields_principal() {
        let t = mint_hs256(
            SECRET,
            "ada",
            &[Role::Marketer],
            std::time::Duration::from_secs(60),
        )
        .expect("mint");
        let p = auth()
            .authenticate(Some(&format!("Bearer {t}")))
            .expect("valid");
        assert_eq!(p.subject, "ada");
        assert!(p.has_any(&[Role::Marketer]));
        assert!(!p.has_any(&[Role::DataSteward]));
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let private = std::fs::read(dir.join("rs256-test-private.pem")).expect("test key");
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 60;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::RS256),
            &serde_json::json!({"sub": "svc-scoring", "roles": ["service"], "exp": exp, "iss": "clm-test", "aud": "clm"}),
            &jsonwebtoken::EncodingKey::from_rsa_pem(&private).expect("private key"),
        )
        .expect("sign");
        let c = AuthConfig {
            rs256_public_key_file: Some(dir.join("rs256-test-public.pem")),
            issuer: Some("clm-test".into()),
            ..Default::default()
        };
        let auth = Authenticator::from_config(&c)
            .expect("config")
            .expect("enabled");
        let p = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .expect("valid");
        assert_eq!(p.subject, "svc-scoring");
        assert_eq!(p.roles, vec![Role::Service]);
        // An HS256 token is refused by an RS256 verifier.
        let hs = mint_hs256(
            SECRET,
            "x",
            &[Role::Admin],
            std::time::Duration::from_secs(60),
        )
        .expect("mint");
        assert!(auth.authenticate(Some(&format!("Bearer {hs}"))).is_err());
    }

    #[test]
    fn the_audience_is_required_and_checked() {
        let ttl = std::time::Duration::from_secs(60);
        let other =
            mint_hs256_with(SECRET, "billing", None, "ada", &[Role::Admin], ttl).expect("mint");
        assert!(matches!(
            auth().authenticate(Some(&format!("Bearer {other}"))),
            Err(Error::Unauthenticated(_))
        ));
        // A token without any `aud` is refused too.
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 60;
        let bare = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "ada", "roles": ["admin"], "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign");
        assert!(matches!(
            auth().authenticate(Some(&format!("Bearer {bare}"))),
            Err(Error::Unauthenticated(_))
        ));
        // A configured audience and issuer: `mint` follows them.
        let c = AuthConfig {
            hs256_secret: Some(SECRET.into()),
            audience: Some("crm-eu".into()),
            issuer: Some("clm-test".into()),
            ..Default::default()
        };
        let verifier = Authenticator::from_config(&c)
            .expect("config")
            .expect("enabled");
        let t = mint(&c, "svc", &[Role::Service], ttl).expect("mint");
        let p = verifier
            .authenticate(Some(&format!("Bearer {t}")))
            .expect("valid");
        assert_eq!(p.roles, vec![Role::Service]);
        let default_aud = mint_hs256(SECRET, "svc", &[Role::Service], ttl).expect("mint");
        assert!(
            verifier
                .authenticate(Some(&format!("Bearer {default_aud}")))
                .is_err()
        );
    }

    #[test]
    fn both_keys_configured_is_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let c = AuthConfig {
            hs256_secret: Some(SECRET.into()),
            rs256_public_key_file: Some(dir.join("rs256-test-public.pem")),
            ..Default::default()
        };
        assert!(Authenticator::from_config(&c).is_err());
    }

    #[test]
    fn no_principal_is_unauthenticated_never_admin() {
        let bare = tonic::Request::new(());
        assert!(matches!(
            authorize(&bare, &[Role::Analyst]),
            Err(Error::Unauthenticated(_))
        ));
        let mut local = tonic::Request::new(());
        local.extensions_mut().insert(Principal::local());
        assert_eq!(
            authorize(&local, &[Role::Analyst]).expect("admin"),
            Principal::local()
        );
        let mut analyst = tonic::Request::new(());
        analyst.extensions_mut().insert(Principal {
            subject: "ana".into(),
            roles: vec![Role::Analyst],
        });
        assert!(matches!(
            authorize(&analyst, &[Role::Marketer]),
            Err(Error::PermissionDenied(_))
        ));
    }

    #[test]
    fn bad_tokens_are_unauthenticated() {
        let wrong = mint_hs256(
            &"x".repeat(32),
            "ada",
            &[Role::Admin],
            std::time::Duration::from_secs(60),
        )
        .expect("mint");
        for h in [
            None,
            Some("Basic abc".to_owned()),
            Some(format!("Bearer {wrong}")),
        ] {
            assert!(matches!(
                auth().authenticate(h.as_deref()),
                Err(Error::Unauthenticated(_))
            ));
        }
    }
}
