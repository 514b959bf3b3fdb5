//! Bearer-token authentication and per-rpc role checks.
//!
//! The server layer ([`crate::server`]) verifies the `authorization: Bearer
//! <jwt>` header of every call (health checks excepted) and stores the
//! [`Principal`] in the request extensions, with the [`RpcName`] being
//! served. Each rpc then calls [`authorize`] (or
//! [`crate::error::respond`]) with its service's [`Policy`]: the one role
//! × rpc table of that service, which the role table of docs/security.md is generated
//! from (`clm roles --markdown`). `admin` is allowed everywhere; an rpc
//! missing from its table is refused to everyone else.
//!
//! Tokens must carry `exp`, a non-empty `sub` and the configured `aud`, and
//! `iss` when `auth.issuer` is set; a present `nbf` is enforced. A refused
//! token is answered UNAUTHENTICATED with a short reason and logged at warn
//! by the server layer through a rate-limited [`RefusalLog`].
//!
//! Fail closed: [`authorize`] refuses a request that carries no
//! [`Principal`] (UNAUTHENTICATED). Without auth configured the server layer
//! gives every call the local principal (all roles) explicitly, and both the
//! config and the server itself refuse a non-loopback listener in that case
//! unless `--insecure` is given.
//!
//! Resource-level checks: an rpc that changes one resource with an owner
//! and a team (a segment) calls [`authorize_owned`] inside its write
//! transaction, with the resource as read there. Roles are then either
//! unrestricted for that permission (admin always) or *owner-scoped*: the
//! caller must be the resource's owner (`sub`) or a member of its team (the
//! token's `teams` claim, a list of team names).
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
    /// Teams the principal belongs to (the `teams` claim): an owner-scoped
    /// role may change resources of these teams.
    pub teams: Vec<String>,
}

impl Principal {
    /// The caller when auth is off: all roles.
    pub fn local() -> Self {
        Self {
            subject: "local".into(),
            roles: vec![Role::Admin],
            teams: Vec::new(),
        }
    }

    /// A principal with `roles` and no team.
    pub fn new(subject: impl Into<String>, roles: Vec<Role>) -> Self {
        Self {
            subject: subject.into(),
            roles,
            teams: Vec::new(),
        }
    }

    /// Whether the principal owns a resource of `owner` and `team`, or is in
    /// that team.
    pub fn answers_for(&self, owner: &str, team: &str) -> bool {
        self.subject == owner || (!team.is_empty() && self.teams.iter().any(|t| t == team))
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
    /// Required (`set_required_spec_claims`); defaulted here so a missing
    /// one is reported as such, not as malformed claims.
    #[serde(default)]
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    teams: Vec<String>,
}

/// Reads and parses an RS256 public key (PEM); the error names the file.
/// Config validation calls it, so a bad key stops the process (exit 64)
/// before anything starts.
pub fn read_rs256_key(path: &std::path::Path) -> Result<DecodingKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    DecodingKey::from_rsa_pem(&pem)
        .map_err(|e| format!("{} is not an RSA public key in PEM: {e}", path.display()))
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

/// Why a token was refused: a short, fixed phrase (never the token or a
/// claim's value), for the caller's status and the warn log.
fn refusal(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired (exp)".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "wrong audience (aud)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer (iss)".into(),
        ErrorKind::InvalidSubject => "wrong subject (sub)".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "algorithm not accepted".into()
        }
        ErrorKind::Json(_) => "claims of the wrong type".into(),
        _ => "malformed token".into(),
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
            (
                read_rs256_key(path)
                    .map_err(|e| anyhow::anyhow!("auth.rs256_public_key_file: {e}"))?,
                Algorithm::RS256,
            )
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(alg);
        // jsonwebtoken checks `iss` only when present unless it is required,
        // and leaves `nbf` off by default: a configured issuer must be
        // carried, and a post-dated token waits for its time.
        let mut required = vec!["exp", "sub", "aud"];
        if let Some(iss) = c.issuer.as_deref().filter(|i| !i.is_empty()) {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
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
            .map_err(|e| Error::Unauthenticated(format!("invalid token: {}", refusal(&e))))?;
        if data.claims.sub.trim().is_empty() {
            return Err(Error::Unauthenticated(
                "invalid token: missing or empty subject (sub)".into(),
            ));
        }
        let roles = data
            .claims
            .roles
            .iter()
            .filter_map(|r| Role::parse(r))
            .collect();
        Ok(Principal {
            subject: data.claims.sub,
            roles,
            teams: data.claims.teams,
        })
    }
}

/// Logs refused tokens at warn, at most [`RefusalLog::PER_MINUTE`] lines a
/// minute per server (a flood of bad tokens must not flood the log); the
/// next line after a quiet spell says how many were left out.
#[derive(Debug, Default)]
pub struct RefusalLog {
    window: std::sync::Mutex<(Option<std::time::Instant>, u32, u64)>,
}

impl RefusalLog {
    /// Lines logged per minute at most.
    pub const PER_MINUTE: u32 = 20;

    /// Records one refusal: `reason` (never the token), the rpc, the peer.
    pub fn refused(
        &self,
        service: &str,
        reason: &str,
        rpc: &str,
        peer: Option<std::net::SocketAddr>,
    ) {
        let now = std::time::Instant::now();
        let mut w = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, logged, suppressed) = &mut *w;
        if start.is_none_or(|s| now.duration_since(s) >= std::time::Duration::from_secs(60)) {
            *start = Some(now);
            *logged = 0;
        }
        if *logged >= Self::PER_MINUTE {
            *suppressed += 1;
            return;
        }
        *logged += 1;
        let left_out = std::mem::take(suppressed);
        drop(w);
        let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        tracing::warn!(
            service,
            reason,
            rpc,
            peer,
            suppressed_before = left_out,
            "token refused"
        );
    }
}

/// One service's role × rpc table: the one place that says who may call
/// what. Each rpc handler passes the table to [`authorize`] (or
/// [`crate::error::respond`]), which looks up the rpc being served (the
/// server layer names it); `clm roles --markdown` prints every table, and
/// docs/security.md's role table is that output (a test keeps them equal).
/// `admin` may call everything and is not listed.
#[derive(Debug)]
pub struct Policy {
    /// Fully qualified gRPC service (`clm.customer.v1.CustomerService`).
    pub service: &'static str,
    /// Each rpc (method name) and the roles, besides admin, that may call it.
    pub rules: &'static [(&'static str, &'static [Role])],
}

impl Policy {
    /// The table of a service that serves only the platform's rpcs (a test
    /// service, a relay): it names no service and allows nothing of its own.
    pub const PLATFORM_ONLY: Policy = Policy {
        service: "",
        rules: &[],
    };

    /// The roles allowed to call `method`, if it is in the table.
    pub fn roles(&self, method: &str) -> Option<&'static [Role]> {
        self.rules
            .iter()
            .find(|(m, _)| *m == method)
            .map(|(_, roles)| *roles)
    }
}

/// Every role, in the order of the role table's columns.
pub const ROLES: [Role; 6] = [
    Role::Admin,
    Role::Marketer,
    Role::SegmentOwner,
    Role::Analyst,
    Role::DataSteward,
    Role::Service,
];

/// `policies` as Markdown: one table per service, a row per rpc, a column
/// per role. docs/security.md's role table is this text.
pub fn policy_markdown(policies: &[&Policy]) -> String {
    let mut out = String::new();
    for (i, p) in policies.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("`{}`\n\n| rpc |", p.service));
        for r in ROLES {
            out.push_str(&format!(" {} |", r.as_str()));
        }
        out.push_str("\n|---|");
        for _ in ROLES {
            out.push_str(":-:|");
        }
        out.push('\n');
        for (method, roles) in p.rules {
            out.push_str(&format!("| {method} |"));
            for r in ROLES {
                let yes = r == Role::Admin || roles.contains(&r);
                out.push_str(if yes { " ✓ |" } else { "   |" });
            }
            out.push('\n');
        }
    }
    out
}

/// Checks that `policy` lists every rpc of its service in the CLM protos,
/// and nothing else: the error names what is missing or extra.
pub fn check_policy(policy: &Policy) -> Result<(), String> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(clm_proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| format!("descriptor set: {e}"))?;
    let methods: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| {
            let package = f.package.clone().unwrap_or_default();
            f.service
                .iter()
                .filter(move |s| format!("{package}.{}", s.name()) == policy.service)
                .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
        })
        .collect();
    if methods.is_empty() {
        return Err(format!(
            "{} is not a service in the CLM protos",
            policy.service
        ));
    }
    let listed: Vec<&str> = policy.rules.iter().map(|(m, _)| *m).collect();
    let missing: Vec<&str> = methods
        .iter()
        .map(String::as_str)
        .filter(|m| !listed.contains(m))
        .collect();
    let extra: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|m| !methods.iter().any(|x| x == m))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|m| !seen.insert(*m))
        .collect();
    if missing.is_empty() && extra.is_empty() && twice.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: missing rpcs {missing:?}, unknown rpcs {extra:?}, listed twice {twice:?}",
            policy.service
        ))
    }
}

/// The rpc a call is for, as the server layer saw it (request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcName {
    /// Fully qualified service (`clm.customer.v1.CustomerService`).
    pub service: std::borrow::Cow<'static, str>,
    /// Method (`CreateCustomer`).
    pub method: std::borrow::Cow<'static, str>,
}

/// Who may call an rpc: a [`Policy`] (looked up by the rpc being served)
/// or, for code not yet on a table, a list of roles.
pub trait Access {
    /// The roles, besides admin, allowed to call `rpc`.
    fn allowed(&self, rpc: Option<&RpcName>) -> Result<&[Role], Error>;
}

impl Access for [Role] {
    fn allowed(&self, _: Option<&RpcName>) -> Result<&[Role], Error> {
        Ok(self)
    }
}

impl<const N: usize> Access for [Role; N] {
    fn allowed(&self, _: Option<&RpcName>) -> Result<&[Role], Error> {
        Ok(self)
    }
}

impl Access for Policy {
    fn allowed(&self, rpc: Option<&RpcName>) -> Result<&[Role], Error> {
        // Fail closed: an rpc missing from its table is nobody's but admin's.
        let Some(rpc) = rpc else {
            tracing::error!(
                table = self.service,
                "a call without an rpc name reached a role table"
            );
            return Ok(&[]);
        };
        if rpc.service != self.service {
            tracing::error!(table = self.service, rpc.service = %rpc.service, "an rpc was checked against another service's role table");
            return Ok(&[]);
        }
        Ok(self.roles(&rpc.method).unwrap_or_else(|| {
            tracing::error!(table = self.service, rpc.method = %rpc.method, "an rpc is missing from its service's role table");
            &[]
        }))
    }
}

/// The audience tokens are minted for and checked against under `c`.
pub fn audience(c: &AuthConfig) -> &str {
    c.audience
        .as_deref()
        .filter(|a| !a.is_empty())
        .unwrap_or(DEFAULT_AUDIENCE)
}

/// Checks that the caller of `request` holds one of the roles `access`
/// allows for this rpc (admin always passes) and returns it. A request without a [`Principal`] (one that did not come through the
/// server layer) is UNAUTHENTICATED, never admin.
pub fn authorize<T, A: Access + ?Sized>(
    request: &tonic::Request<T>,
    access: &A,
) -> Result<Principal, Error> {
    let Some(principal) = request.extensions().get::<Principal>().cloned() else {
        return Err(Error::Unauthenticated(
            "no authenticated caller for this call".into(),
        ));
    };
    let allowed = access.allowed(request.extensions().get::<RpcName>())?;
    if principal.has_any(allowed) {
        Ok(principal)
    } else {
        let names: Vec<&str> = std::iter::once("admin")
            .chain(allowed.iter().map(|r| r.as_str()))
            .collect();
        let permission = request
            .extensions()
            .get::<RpcName>()
            .map(|r| format!("missing permission {}/{}: ", r.service, r.method))
            .unwrap_or_default();
        Err(Error::PermissionDenied(format!(
            "{permission}this rpc needs one of the roles: {}",
            names.join(", ")
        )))
    }
}

/// A resource that has an owner and a team, as read in the write's
/// transaction (for [`authorize_owned`]).
#[derive(Debug, Clone, Copy)]
pub struct Owned<'a> {
    /// Its name (`segments/abc`).
    pub name: &'a str,
    /// Its owner (a principal's subject).
    pub owner: &'a str,
    /// Its team (may be empty).
    pub team: &'a str,
}

/// The resource-level check: `principal` (already allowed to call the rpc
/// by its [`Policy`]) may use `permission` on `resource` if it is admin,
/// holds one of `unrestricted`, or owns the resource or is in its team.
/// Otherwise PERMISSION_DENIED naming the permission, the resource and
/// who answers for it. Call it inside the write's transaction, on the row
/// read there, so a concurrent transfer cannot slip between check and write.
pub fn authorize_owned(
    principal: &Principal,
    permission: &str,
    unrestricted: &[Role],
    resource: Owned<'_>,
) -> Result<(), Error> {
    if principal.has_any(unrestricted) || principal.answers_for(resource.owner, resource.team) {
        return Ok(());
    }
    let team = if resource.team.is_empty() {
        "no team".to_owned()
    } else {
        format!("team {}", resource.team)
    };
    Err(Error::PermissionDenied(format!(
        "missing permission {permission} on {}: it is owned by {} ({team}), and {} is neither its owner nor in its team",
        resource.name, resource.owner, principal.subject
    )))
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

/// Mints an HS256 token for [`DEFAULT_AUDIENCE`] whose `teams` claim
/// lists `teams` (owner-scoped roles act on those teams' resources).
pub fn mint_hs256_in_teams(
    secret: &str,
    subject: &str,
    roles: &[Role],
    teams: &[&str],
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    mint_claims(secret, DEFAULT_AUDIENCE, None, subject, roles, teams, ttl)
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
    mint_claims(secret, audience, issuer, subject, roles, &[], ttl)
}

fn mint_claims(
    secret: &str,
    audience: &str,
    issuer: Option<&str>,
    subject: &str,
    roles: &[Role],
    teams: &[&str],
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        sub: &'a str,
        aud: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
        roles: Vec<&'static str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        teams: &'a [&'a str],
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
        teams,
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
        analyst
            .extensions_mut()
            .insert(Principal::new("ana", vec![Role::Analyst]));
        assert!(matches!(
            authorize(&analyst, &[Role::Marketer]),
            Err(Error::PermissionDenied(_))
        ));
    }

    #[test]
    fn owner_scoped_checks_follow_owner_and_teams() {
        let ttl = std::time::Duration::from_secs(60);
        let t = mint_hs256_in_teams(SECRET, "ada", &[Role::SegmentOwner], &["growth"], ttl)
            .expect("mint");
        let ada = auth()
            .authenticate(Some(&format!("Bearer {t}")))
            .expect("valid");
        assert_eq!(ada.teams, vec!["growth".to_owned()]);
        let seg = |owner: &'static str, team: &'static str| Owned {
            name: "segments/s",
            owner,
            team,
        };
        assert!(authorize_owned(&ada, "segments.update", &[], seg("ada", "")).is_ok());
        assert!(authorize_owned(&ada, "segments.update", &[], seg("bob", "growth")).is_ok());
        let Err(Error::PermissionDenied(m)) =
            authorize_owned(&ada, "segments.update", &[], seg("bob", "retention"))
        else {
            panic!("another team's segment must be refused");
        };
        assert!(
            m.contains("missing permission segments.update on segments/s"),
            "{m}"
        );
        assert!(
            authorize_owned(
                &ada,
                "segments.update",
                &[Role::SegmentOwner],
                seg("bob", "x")
            )
            .is_ok()
        );
        assert!(
            authorize_owned(&Principal::local(), "segments.update", &[], seg("bob", "x")).is_ok()
        );
    }

    #[test]
    fn refusal_lines_are_rate_limited() {
        let log = RefusalLog::default();
        for _ in 0..RefusalLog::PER_MINUTE + 5 {
            log.refused("test", "bad signature", "x.v1.S/M", None);
        }
        let w = log.window.lock().expect("window");
        assert_eq!(w.1, RefusalLog::PER_MINUTE, "lines logged this minute");
        assert_eq!(w.2, 5, "refusals left out, counted for the next line");
    }

    #[test]
    fn policies_answer_by_rpc_and_fail_closed() {
        const P: Policy = Policy {
            service: "x.v1.S",
            rules: &[("Read", &[Role::Analyst])],
        };
        let rpc = |m: &str| RpcName {
            service: "x.v1.S".into(),
            method: m.to_owned().into(),
        };
        assert_eq!(P.allowed(Some(&rpc("Read"))).expect("ok"), &[Role::Analyst]);
        assert!(P.allowed(Some(&rpc("Write"))).expect("ok").is_empty());
        assert!(P.allowed(None).expect("ok").is_empty());
        let mut other = rpc("Read");
        other.service = "y.v1.T".into();
        assert!(P.allowed(Some(&other)).expect("ok").is_empty());
        let mut req = tonic::Request::new(());
        req.extensions_mut()
            .insert(Principal::new("ana", vec![Role::Analyst]));
        req.extensions_mut().insert(rpc("Write"));
        assert!(matches!(
            authorize(&req, &P),
            Err(Error::PermissionDenied(_))
        ));
        req.extensions_mut().insert(rpc("Read"));
        assert!(authorize(&req, &P).is_ok());
        assert!(check_policy(&P).is_err(), "x.v1.S is no CLM service");
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
