-- Platform-wide settings written at run time (not configuration): each key is set once
-- or updated by administrators. `first_admin` records which sign-up became the first
-- administrator; the primary key makes that decision atomic when sign-ups race.
CREATE TABLE platform_settings (
    key            TEXT PRIMARY KEY NOT NULL,
    value          TEXT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
