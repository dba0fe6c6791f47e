-- The seed README's tables, publication and replica identity.
CREATE TABLE IF NOT EXISTS user_account (
    id         serial PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS todo (
    id              serial PRIMARY KEY,
    user_account_id int NOT NULL REFERENCES user_account (id) ON DELETE CASCADE,
    title           text NOT NULL,
    status          text NOT NULL DEFAULT 'open',
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Old rows on update and delete, so that event.changes is known.
ALTER TABLE user_account REPLICA IDENTITY FULL;
ALTER TABLE todo REPLICA IDENTITY FULL;
