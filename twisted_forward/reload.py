"""
SIGHUP: read the configuration again and serve new requests with it.

What a reload reads
    The ``.env`` file (``--env-file``) and every file a setting names, read
    again, merged with the options and the environment the process started
    with.  The environment of a running process cannot change: a setting the
    environment (or an option) gives keeps its value whatever the ``.env``
    file now says, and the reload says so in a warning.

All or nothing
    The new configuration is validated whole and its parts built (keys,
    forward keys, policies, IP lists, trusted proxies, routes, chat records,
    timeouts) before anything changes.  A configuration that fails, or that
    changes what only a restart can change (:data:`RESTART_ONLY`), is
    refused with one logged line, and the running one stays.

Open exchanges
    The site's resource tree is swapped in one assignment: a request already
    being answered keeps the tree, keys, chat recorder and upstream pool it
    started with, and finishes on them; the parts the new tree does not
    share are closed once the last such request has ended.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Mapping, Optional

from .config import SETTINGS, Config, ConfigError, load_config, read_env_file

#: Config fields only a restart can change: (field, setting, option).
RESTART_ONLY: tuple[tuple[str, str, str], ...] = (
    ("metrics_port", "METRICS_PORT", "--metrics-port"),
    ("admin_port", "ADMIN_PORT", "--admin-port"),
    # The usage ledger is one database connection for the process's life.
    ("ledger", "LEDGER", "--ledger"),
    ("database_url", "DATABASE_URL", "--database-url"),
    ("data_dir", "DATA_DIR", "--data-dir"),
)


class ConfigSource:
    """Where the configuration comes from; :meth:`load` reads it again.

    :param options: option name to value, None where not given (options
        win over everything).
    :param environ: the environment the process started with.
    :param env_file: the ``.env`` file's path.
    """

    def __init__(
        self,
        options: Mapping[str, Optional[str]],
        environ: Mapping[str, str],
        env_file: str,
    ) -> None:
        self.options = dict(options)
        self.environ = dict(environ)
        self.env_file = env_file
        self._file_values: dict[str, str] = {}

    def load(self) -> Config:
        """The validated configuration as the sources say now.

        :raises ConfigError: naming the first bad setting.
        """
        values = read_env_file(self.env_file)
        config = load_config(self.options, self.environ, values)
        self._file_values = values
        return config

    def unknown(self) -> list[tuple[str, str, str]]:
        """Unknown variables that look like ours (as of the last load):
        ``(name, where, closest known name or "")``."""
        from .migration import unknown_names

        return unknown_names((s.env for s in SETTINGS), self.environ, self._file_values)

    def given(self, env: str) -> bool:
        """Whether any source gives the setting ``env`` (as of the last load)."""
        option = next((s.option for s in SETTINGS if s.env == env), None)
        return (
            (option is not None and self.options.get(option) is not None)
            or env in self.environ
            or env in self._file_values
        )

    def shadowed_changes(self) -> list[str]:
        """Settings whose ``.env`` value differs from what the last
        :meth:`load` read, but that the environment or an option sets (so
        the change has no effect); reads the file without keeping it."""
        now = read_env_file(self.env_file)
        before = self._file_values
        names = []
        for setting in SETTINGS:
            if now.get(setting.env) == before.get(setting.env):
                continue
            if self.options.get(setting.option) is not None:
                names.append(f"{setting.env} (the option --{setting.option} sets it)")
            elif setting.env in self.environ:
                names.append(f"{setting.env} (the environment sets it)")
        return names


def restart_only_changes(old: Config, new: Config) -> None:
    """Refuse a new configuration that changes what needs a restart.

    :raises ConfigError: naming the setting.
    """
    for field_name, env, option in RESTART_ONLY:
        if getattr(old, field_name) != getattr(new, field_name):
            raise ConfigError(
                f"{env} ({option}) cannot change while the proxy runs: restart it to change that"
            )
    # The store shared with other processes lives as long as the process.
    for attr, env, option in (
        ("redis_url", "REDIS_URL", "--redis-url"),
        ("store_timeout", "LIMITS_STORE_TIMEOUT", "--limits-store-timeout"),
    ):
        if getattr(old.policy, attr) != getattr(new.policy, attr):
            raise ConfigError(
                f"{env} ({option}) cannot change while the proxy runs: restart it to change that"
            )
    if (old.admin_key is None) != (new.admin_key is None):
        raise ConfigError(
            "ADMIN_KEY (--admin-key): turning the admin page on or off needs a restart "
            "(a new admin key is fine)"
        )


def install_handler(signum: int, reactor: Any, callback: Callable[[], Any]) -> Callable[[], None]:
    """Call ``callback`` in the reactor's thread on each ``signum``.

    :returns: a function that puts the previous handler back.
    """

    def handler(_signum: int, _frame: Any) -> None:
        reactor.callFromThread(callback)

    previous = signal.signal(signum, handler)

    def restore() -> None:
        if signal.getsignal(signum) is handler:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    return restore
