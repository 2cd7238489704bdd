"""Errors the command line turns into one line on stderr and exit code 2."""


class ConfigError(ValueError):
    """Bad input: an unknown option, key or value. The message names it and the valid choices."""
