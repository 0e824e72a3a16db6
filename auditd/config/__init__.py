"""Config files: the rules file and the web config, checked once into frozen dataclasses.

Modules: ``errors`` (ConfigError), ``durations``, ``files`` (safe reading of any config
file), ``nodes`` (the YAML node toolkit: typed values with line and key path), ``ruleset``
(the rules' dataclasses), ``rules`` (the rules file's schema), ``tls`` and ``web`` (the
``--web.config.file``). Nothing here imports the audit, the kernel layer, the CLI or the
daemon. This module only hands the public names on.
"""

from auditd.config.durations import parse_duration
from auditd.config.errors import ConfigError
from auditd.config.files import MAX_CONFIG_BYTES, read_config_file, read_config_text
from auditd.config.rules import (
    DEFAULT_CONFIG_PATH,
    KNOWN_SYSCTLS,
    RESERVED_RULE_NAMES,
    load_rules,
    load_rules_or_default,
    parse_rules,
)
from auditd.config.ruleset import (
    BUILTIN_SOURCE,
    IPNetwork,
    Match,
    Rule,
    RuleSet,
    SysctlBound,
    Thresholds,
    builtin_rules,
)
from auditd.config.tls import TlsSettings
from auditd.config.web import WebConfig, load_web_config, parse_web_config

__all__ = [
    "BUILTIN_SOURCE",
    "DEFAULT_CONFIG_PATH",
    "KNOWN_SYSCTLS",
    "MAX_CONFIG_BYTES",
    "RESERVED_RULE_NAMES",
    "ConfigError",
    "IPNetwork",
    "Match",
    "Rule",
    "RuleSet",
    "SysctlBound",
    "Thresholds",
    "TlsSettings",
    "WebConfig",
    "builtin_rules",
    "load_rules",
    "load_rules_or_default",
    "load_web_config",
    "parse_duration",
    "parse_rules",
    "parse_web_config",
    "read_config_file",
    "read_config_text",
]
