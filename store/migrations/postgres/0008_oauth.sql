-- Sign-in through OAuth 2.0 / OpenID Connect providers.
--
-- `oauth_states`: a sign-in on its way through a provider. The row is keyed by the
-- SHA-256 of the `state` parameter, holds the PKCE verifier and the OIDC nonce, and is
-- spent (deleted) by the callback, so a state works once and only before it expires.
CREATE TABLE oauth_states (
    state_sha256   TEXT PRIMARY KEY NOT NULL,
    provider       TEXT NOT NULL,
    pkce_verifier  TEXT NOT NULL,
    nonce          TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    return_to      TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL
);
CREATE INDEX oauth_states_expiry ON oauth_states (expires_at_ms);

-- An account at a provider (its stable subject) linked to a maas user.
CREATE TABLE user_identities (
    provider            TEXT NOT NULL,
    subject             TEXT NOT NULL,
    user_id             TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email               TEXT,
    created_at_ms       BIGINT NOT NULL,
    last_sign_in_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (provider, subject)
);
CREATE INDEX user_identities_user ON user_identities (user_id);
