"""The ledger's settings: DATA_DIR, DATABASE_URL, LEDGER, LEDGER_RETENTION_DAYS."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_forward.config import Config, ConfigError, load_config


def config(**env: str) -> Config:
    return load_config({}, env)


class LedgerSettingsTests(SynchronousTestCase):
    """Each setting parses, defaults and refuses as documented."""

    def test_defaults(self) -> None:
        """On by default, SQLite in ``data`` beside LOG_DIR, rows kept forever."""
        c = config(LOG_DIR="/var/log/tf/chat")
        self.assertTrue(c.ledger)
        self.assertEqual(c.ledger_dir, "/var/log/tf/data")
        self.assertIsNone(c.database_url)
        self.assertEqual(c.ledger_retention_days, 0)
        self.assertEqual(config().ledger_dir, os.path.abspath("data"))

    def test_data_dir(self) -> None:
        """DATA_DIR wins over the default; empty is refused."""
        self.assertEqual(config(DATA_DIR="/srv/tf").ledger_dir, "/srv/tf")
        self.assertRaises(ConfigError, config, DATA_DIR="")

    def test_retention(self) -> None:
        """A whole number of days, 0 or more."""
        self.assertEqual(config(LEDGER_RETENTION_DAYS="90").ledger_retention_days, 90)
        for bad in ("-1", "1.5", "a week"):
            e = self.assertRaises(ConfigError, config, LEDGER_RETENTION_DAYS=bad)
            self.assertIn("LEDGER_RETENTION_DAYS (--ledger-retention-days)", str(e))

    def test_database_url_secret(self) -> None:
        """The URL is kept but never shown: not in repr, not in an error."""
        url = "postgresql://tf:s3cret-pw@db.internal:5432/ledger"
        c = config(DATABASE_URL=url)
        self.assertEqual(c.database_url, url)
        self.assertNotIn("s3cret-pw", repr(c))
        e = self.assertRaises(ConfigError, config, DATABASE_URL="mysql://tf:s3cret-pw@db/x")
        self.assertNotIn("s3cret-pw", str(e))
        e = self.assertRaises(ConfigError, config,
                              DATABASE_URL="postgresql://tf:s3cret-pw@db/x?nosuchoption=1")
        self.assertNotIn("s3cret-pw", str(e))

    def test_off(self) -> None:
        """LEDGER=false turns it off."""
        self.assertFalse(config(LEDGER="false").ledger)
