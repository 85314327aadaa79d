//! Safe people: who is asking, and may they ask about this project?
//!
//! Tokens are never stored, only their SHA-256; the hash of the presented
//! token is compared with the stored one in constant time (`subtle`). An
//! unknown user, a missing token and a wrong token get the same answer, so
//! the refusal does not tell an attacker which researchers exist.

use subtle::ConstantTimeEq;

use super::error::Refusal;
use crate::policy::tre::{Project, TrePolicy};

/// Checks the researcher's token and approval for the project.
pub fn authorise<'p>(
    policy: &'p TrePolicy,
    user: &str,
    token: Option<&str>,
    project: &str,
) -> Result<&'p Project, Refusal> {
    let denied = || Refusal::new("authentication", "unknown user or wrong or missing token");
    let digest = ring::digest::digest(&ring::digest::SHA256, token.unwrap_or_default().as_bytes());
    let mut presented = [0u8; 32];
    presented.copy_from_slice(digest.as_ref());
    let researcher = policy.researchers.iter().find(|r| r.user == user);
    // Compare even when the user is unknown, so timing does not tell.
    let expected = researcher.map_or([0u8; 32], |r| r.token_sha256);
    let matches: bool = presented.ct_eq(&expected).into();
    let researcher = match (researcher, token, matches) {
        (Some(r), Some(t), true) if !t.is_empty() => r,
        _ => return Err(denied()),
    };
    let project_def = policy.projects.get(project).ok_or_else(|| {
        Refusal::new(
            "safe_projects",
            format!("there is no approved project {project:?}"),
        )
    })?;
    if !researcher.projects.iter().any(|p| p == project) {
        return Err(Refusal::new(
            "safe_people",
            format!("{user} is not approved for project {project}"),
        ));
    }
    Ok(project_def)
}

/// The researcher a token belongs to (for bearer tokens sent without a user
/// name). Every researcher's hash is compared, in constant time, whatever
/// matches.
pub fn researcher_of_token<'p>(policy: &'p TrePolicy, token: &str) -> Option<&'p str> {
    if token.is_empty() {
        return None;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut found = None;
    for r in &policy.researchers {
        let matches: bool = digest.as_ref().ct_eq(&r.token_sha256).into();
        if matches && found.is_none() {
            found = Some(r.user.as_str());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_approved_researcher_with_the_right_token_gets_in() {
        let policy = TrePolicy::load(None).unwrap();
        assert!(
            authorise(
                &policy,
                "alice",
                Some("demo-alice-token"),
                "demo-opensafely"
            )
            .is_ok()
        );
        for (user, token, project, rule) in [
            ("alice", Some("wrong"), "demo-opensafely", "authentication"),
            ("alice", None, "demo-opensafely", "authentication"),
            ("alice", Some(""), "demo-opensafely", "authentication"),
            (
                "mallory",
                Some("demo-alice-token"),
                "demo-opensafely",
                "authentication",
            ),
            // Another researcher's token.
            (
                "alice",
                Some("demo-dana-token"),
                "demo-opensafely",
                "authentication",
            ),
            (
                "bob",
                Some("demo-bob-token"),
                "demo-opensafely",
                "safe_people",
            ),
            // A researcher approved for another project only.
            (
                "alice",
                Some("demo-alice-token"),
                "demo-research",
                "safe_people",
            ),
            (
                "alice",
                Some("demo-alice-token"),
                "no-such-project",
                "safe_projects",
            ),
        ] {
            assert_eq!(
                authorise(&policy, user, token, project).unwrap_err().rule,
                rule,
                "{user} {token:?} {project}"
            );
        }
    }
}
