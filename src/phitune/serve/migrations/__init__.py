"""The service database's schema history (Alembic): `db.connect` brings any database to the newest
revision at start-up, so a release that changes a table runs on a database an older one wrote."""
