"""TLS contexts built from the configuration, and their check before anything uses them.

The master checks them at start (`--check-config` too) and before a reload, so a
certificate, key or CA file that cannot be used stops the start, or the reload, with one
clear line instead of making every worker crash in a loop.
"""

from __future__ import annotations

import ssl

from amqproxy_mp.config import Config, ConfigError


def upstream_tls_context(config: Config) -> ssl.SSLContext | None:
    """Verify the broker's certificate against the system CAs unless told otherwise."""
    if not any(node.tls for node in config.upstream.nodes):
        return None
    context = ssl.create_default_context(cafile=config.upstream_tls_ca_file)
    if config.upstream_tls_cert_file:
        context.load_cert_chain(config.upstream_tls_cert_file, config.upstream_tls_key_file)
    if config.upstream_tls_insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def listener_tls_context(config: Config) -> ssl.SSLContext:
    """The AMQPS listener's context; with a client CA, clients must present a certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert config.tls_cert_file and config.tls_key_file  # enforced by the config
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_client_ca_file:
        context.load_verify_locations(config.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_tls_files(config: Config) -> None:
    """Load every certificate, key and CA file the configuration names; ConfigError if one
    cannot be used (unreadable, not PEM, a key that does not match its certificate)."""
    try:
        upstream_tls_context(config)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"upstream_tls_ca_file/upstream_tls_cert_file/upstream_tls_key_file unusable: {exc}"
        ) from None
    if config.tls_port:
        try:
            listener_tls_context(config)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls_cert_file/tls_key_file/tls_client_ca_file unusable: {exc}"
            ) from None
