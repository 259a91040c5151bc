"""The authority: per-tenant CAs, attestation, short-lived certificates, revocation and CRLs."""
