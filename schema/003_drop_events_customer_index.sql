-- The events → customer index cost every insert a second B-tree write but served only tenant
-- mapping, which is rare and may scan. Ingest speed matters more.
DROP INDEX IF EXISTS events_customer;
